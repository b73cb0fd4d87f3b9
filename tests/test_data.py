"""Loaders on small fixtures made here, the demo set, and tokenization with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import datasets
import pytest

from preference_datasets import (
    DEMO_TOPICS,
    DataError,
    PairTokenizer,
    PreferencePair,
    collate,
    epoch_order,
    load_datasets,
    load_demo,
    load_hh,
    load_jsonl,
    split_hh_dialogue,
)
from tests.conftest import hh_dialogue

HH_OPTIONS = {"hub_name": "Anthropic/hh-rlhf", "path": None, "subsets": None, "holdout": 4}


def test_hh_split_keeps_every_turn():
    text = hh_dialogue(["Hi?", "Hello! How can I help?", "Tell me a joke."], "Why did the chicken cross the road?")
    prompt, response = split_hh_dialogue(text)
    assert prompt == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert response == "Why did the chicken cross the road?"


def test_hh_local_folder_with_test_files_only_is_split(hh_folder):
    splits = load_hh({**HH_OPTIONS, "path": str(hh_folder)})
    assert len(splits["test"]) == 4 and len(splits["train"]) == 20
    assert not {p.chosen for p in splits["test"]} & {p.chosen for p in splits["train"]}
    multi_turn = [p for p in splits["train"] + splits["test"] if len(p.prompt) == 3]
    assert len(multi_turn) == 12


def test_hh_skips_rows_with_different_prompts_or_equal_responses(tmp_path, capsys):
    import gzip

    rows = [
        {"chosen": hh_dialogue(["a?"], "yes"), "rejected": hh_dialogue(["b?"], "no")},
        {"chosen": hh_dialogue(["a?"], "same"), "rejected": hh_dialogue(["a?"], "same")},
        {"chosen": hh_dialogue(["a?"], "yes"), "rejected": hh_dialogue(["a?"], "no")},
    ]
    (tmp_path / "helpful-base").mkdir()
    for split in ("train", "test"):
        with gzip.open(tmp_path / "helpful-base" / f"{split}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    splits = load_hh({**HH_OPTIONS, "path": str(tmp_path)})
    assert [p.chosen for p in splits["train"]] == ["yes"]
    assert "skipped 4 rows" in capsys.readouterr().out


def test_hh_from_the_hub_name(monkeypatch):
    calls = []

    def fake_load_dataset(name, data_dir, split):
        calls.append((name, data_dir, split))
        return [{"chosen": hh_dialogue([f"{data_dir} {split}?"], "good"), "rejected": hh_dialogue([f"{data_dir} {split}?"], "bad")}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_hh({**HH_OPTIONS, "subsets": ["helpful-base", "harmless-base"]})
    assert ("Anthropic/hh-rlhf", "harmless-base", "test") in calls
    assert len(splits["train"]) == 2 and splits["train"][0].prompt[0]["content"] == "helpful-base train?"


def test_hh_bad_file_names_file_and_line(tmp_path):
    import gzip

    (tmp_path / "helpful-base").mkdir()
    with gzip.open(tmp_path / "helpful-base" / "test.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"chosen": hh_dialogue(["q"], "a"), "rejected": hh_dialogue(["q"], "b")}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"test.jsonl.gz, line 2: invalid JSON"):
        load_hh({**HH_OPTIONS, "path": str(tmp_path)})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_accepts_strings_and_chat_messages(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "plain?", "chosen": "good", "rejected": "bad"},
            {
                "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "chat?"}],
                "chosen": [{"role": "user", "content": "chat?"}, {"role": "assistant", "content": "kind"}],
                "rejected": [{"role": "user", "content": "chat?"}, {"role": "assistant", "content": "rude"}],
            },
        ],
    )
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "t?", "chosen": "c", "rejected": "r"}])
    splits = load_jsonl({"train_path": str(train), "test_path": str(test), "holdout": 1})
    assert splits["train"][0] == PreferencePair([{"role": "user", "content": "plain?"}], "good", "bad", "jsonl")
    assert splits["train"][1].prompt[0] == {"role": "system", "content": "be nice"}
    assert (splits["train"][1].chosen, splits["train"][1].rejected) == ("kind", "rude")
    assert len(splits["test"]) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "c"}', r"line 2: missing key\(s\) \['rejected'\]"),
        ('{"prompt": 3, "chosen": "c", "rejected": "r"}', "line 2: 'prompt' must be a string"),
        ('{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}', "line 2: 'chosen' must be"),
        ("not json", "line 2: invalid JSON"),
    ],
)
def test_jsonl_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' + line + "\n")
    with pytest.raises(DataError, match="bad.jsonl, " + message):
        load_jsonl({"train_path": str(path), "test_path": None, "holdout": 1})


def test_demo_is_deterministic_held_out_and_topical():
    options = {"seed": 0, "train_size": 64, "test_size": 16}
    first, second = load_demo(options), load_demo(options)
    assert first == second
    train_prompts = {p.prompt[0]["content"] for p in first["train"]}
    assert not train_prompts & {p.prompt[0]["content"] for p in first["test"]}
    assert all(p.chosen != p.rejected for p in first["train"] + first["test"])
    capitals = [p for p in first["train"] if "capital" in p.prompt[0]["content"]]
    assert len(capitals) == 64 // len(DEMO_TOPICS)
    assert len({p.prompt[0]["content"].split()[-1] for p in capitals}) < len(capitals)  # countries repeat


def test_datasets_are_mixed_and_capped(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)])
    cfg = {
        "demo": {"seed": 0, "train_size": 8, "test_size": 4},
        "jsonl": {"train_path": str(train), "test_path": None, "holdout": 2, "max_train_examples": 5},
    }
    mixed = load_datasets(cfg)
    assert [p.source for p in mixed["train"]].count("jsonl") == 5 and len(mixed["train"]) == 13
    assert len(mixed["test"]) == 6
    with pytest.raises(DataError, match="datasets.nope: no loader named 'nope'"):
        load_datasets({"nope": {}})


# ------------------------------------------------------------------------------ tokenization


def test_smollm2_tokenization_is_exact(smollm2_tokenizer):
    tok = smollm2_tokenizer
    encode = PairTokenizer(tok, max_length=128, max_prompt_length=64)
    pair = PreferencePair([{"role": "user", "content": "What is 2 plus 2?"}], "2 plus 2 equals 4.", "It is 5.")
    tokens = encode(pair)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    rendered = tok.decode(tokens.prompt)
    assert rendered.startswith("<|im_start|>system\n") and not rendered.startswith("<|im_start|><|im_start|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokens.chosen[-1] == im_end == tok.eos_token_id and tokens.rejected[-1] == im_end
    assert tok.decode(tokens.chosen[:-1]) == "2 plus 2 equals 4."
    # The whole sequence is exactly what the chat template renders for the full conversation.
    conversation = pair.prompt + [{"role": "assistant", "content": pair.chosen}]
    full = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
    assert tokens.prompt + tokens.chosen == full[: len(tokens.prompt) + len(tokens.chosen)]
    assert (tokens.prompt + tokens.chosen).count(im_start) == 3  # system, user, assistant: no extra BOS

    batch = collate([tokens], [0], pad_id=tok.pad_token_id)
    chosen_labels, rejected_labels = batch["labels"]
    assert (chosen_labels[: len(tokens.prompt)] == -100).all() and (rejected_labels[: len(tokens.prompt)] == -100).all()
    assert chosen_labels[len(tokens.prompt) : len(tokens.prompt) + len(tokens.chosen)].tolist() == tokens.chosen
    assert batch["input_ids"].shape[1] == len(tokens.prompt) + len(tokens.chosen)  # padded to the longest, not max_length
    assert batch["attention_mask"][1].sum() == len(tokens.prompt) + len(tokens.rejected)


def test_truncation_keeps_the_prompt_end_and_fits_max_length(smollm2_tokenizer):
    encode = PairTokenizer(smollm2_tokenizer, max_length=40, max_prompt_length=24)
    long_question = " ".join(f"word{i}" for i in range(60)) + " final question?"
    tokens = encode(PreferencePair([{"role": "user", "content": long_question}], "answer " * 40, "short."))
    assert len(tokens.prompt) == 24
    assert smollm2_tokenizer.decode(tokens.prompt).endswith("final question?<|im_end|>\n<|im_start|>assistant\n")
    assert len(tokens.prompt) + len(tokens.chosen) == 40
    assert tokens.chosen[-1] != smollm2_tokenizer.eos_token_id  # cut short: it did not end
    assert tokens.rejected[-1] == smollm2_tokenizer.eos_token_id


def test_plain_text_format_and_single_bos(smollm2_tokenizer):
    """Without a chat template: HH text format; a tokenizer that adds BOS gets exactly one."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    assert tok("a").input_ids[0] == bos
    encode = PairTokenizer(tok, max_length=64, max_prompt_length=32)
    tokens = encode(PreferencePair([{"role": "user", "content": "Hi"}], "Hello", "Go away"))
    assert tokens.prompt[0] == bos and tokens.prompt.count(bos) == 1
    assert tok.decode(tokens.prompt[1:]) == "\n\nHuman: Hi\n\nAssistant:"
    assert tok.decode(tokens.chosen) == " Hello" + tok.eos_token


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))
