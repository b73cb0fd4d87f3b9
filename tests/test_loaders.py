"""The UltraFeedback, TL;DR and unpaired (KTO) loaders, on fixtures made here and a fake hub."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import datasets
import pytest

from preference_datasets import (
    LOADERS,
    DataError,
    LabelledResponse,
    PreferencePair,
    load_capybara_unpaired,
    load_datasets,
    load_gemma2_armorm,
    load_kto_jsonl,
    load_llama3_armorm,
    load_tldr,
    load_ultrafeedback,
    load_ultrafeedback_unpaired,
)

NEW_LOADERS = ("ultrafeedback", "llama3_armorm", "gemma2_armorm", "ultrafeedback_unpaired", "capybara_unpaired", "tldr", "kto_jsonl")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_lines(path, records):
    """JSON Lines, gzip-compressed where the name ends in .gz; a string record is written as it is."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def hub(monkeypatch):
    """A fake `datasets.load_dataset` serving `hub.rows[(name, config, split)]`; it records each call."""
    fake = SimpleNamespace(rows={}, calls=[])

    def load_dataset(path, name=None, split=None):
        fake.calls.append((path, name, split))
        return fake.rows[(path, name, split)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return fake


def test_new_loaders_are_registered_and_configured(make_cfg):
    assert set(NEW_LOADERS) <= set(LOADERS)
    for name in NEW_LOADERS:
        options = make_cfg(f"datasets=[{name}]").datasets[name]
        assert {"holdout", "max_train_examples", "max_test_examples"} <= set(options)
        assert ("train_path" in options) if name == "kto_jsonl" else ("hub_name" in options and "path" in options)


# ------------------------------------------------------------------------------ UltraFeedback

UF_OPTIONS = {"hub_name": "HuggingFaceH4/ultrafeedback_binarized", "path": None, "holdout": 2}


def test_ultrafeedback_local_folder_of_flat_strings_and_messages(tmp_path, capsys):
    write_lines(
        tmp_path / "train.jsonl.gz",
        [
            {"prompt": "p1", "chosen": "good", "rejected": "bad", "source_index": 7},
            {"prompt": "p2", "chosen": "same", "rejected": "same"},
            {"prompt": "p3", "chosen": "", "rejected": "bad"},
            {"prompt": user("p4"), "chosen": assistant("kind"), "rejected": "rude"},
        ],
    )
    write_lines(tmp_path / "test.jsonl", [{"prompt": "t", "chosen": "c", "rejected": "r"}])
    splits = load_ultrafeedback({**UF_OPTIONS, "path": str(tmp_path)})
    assert splits["train"] == [
        PreferencePair(user("p1"), "good", "bad", "ultrafeedback"),
        PreferencePair(user("p4"), "kind", "rude", "ultrafeedback"),
    ]
    assert splits["test"] == [PreferencePair(user("t"), "c", "r", "ultrafeedback")]
    assert "ultrafeedback: skipped 2 rows (identical responses: 1, an empty response: 1)" in capsys.readouterr().out


def test_ultrafeedback_hub_prompt_is_every_turn_before_the_response(hub, capsys):
    context = user("first?") + assistant("an answer") + user("and then?")
    for split in ("train_prefs", "test_prefs"):
        hub.rows[(UF_OPTIONS["hub_name"], None, split)] = [
            {"prompt": "first?", "chosen": context + assistant(f"good {split}"), "rejected": context + assistant("bad")},
            {"prompt": "x", "chosen": user("x") + assistant("a"), "rejected": user("y") + assistant("b")},
        ]
    splits = load_ultrafeedback(UF_OPTIONS)
    assert hub.calls == [(UF_OPTIONS["hub_name"], None, "train_prefs"), (UF_OPTIONS["hub_name"], None, "test_prefs")]
    assert splits["train"] == [PreferencePair(context, "good train_prefs", "bad", "ultrafeedback")]
    assert splits["test"][0].chosen == "good test_prefs"
    assert "skipped 2 rows (different prompts: 2)" in capsys.readouterr().out


def test_ultrafeedback_local_folder_with_test_file_only_is_split(tmp_path):
    write_lines(tmp_path / "test.jsonl", [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": "r"} for i in range(10)])
    splits = load_ultrafeedback({**UF_OPTIONS, "path": str(tmp_path), "holdout": 3})
    assert len(splits["test"]) == 3 and len(splits["train"]) == 7
    assert not {p.chosen for p in splits["test"]} & {p.chosen for p in splits["train"]}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="datasets.ultrafeedback.path: no train/test"):
        load_ultrafeedback({**UF_OPTIONS, "path": str(tmp_path / "empty")})


@pytest.mark.parametrize(("loader", "name"), [(load_llama3_armorm, "llama3_armorm"), (load_gemma2_armorm, "gemma2_armorm")])
def test_armorm_sets_read_train_and_test_splits_of_message_lists(hub, tmp_path, loader, name):
    """SimPO's armorm sets: the hub's `train` / `test` splits (not UltraFeedback's `*_prefs`), rows with
    extra columns (all responses, ArmoRM scores) and message-list responses; or the same rows in a folder."""
    hub_name = f"princeton-nlp/{name.removesuffix('_armorm')}-ultrafeedback-armorm"
    rows = {split: [{"prompt_id": "0", "prompt": f"{split}?", "all_generated_responses": ["a", "b"], "all_rm_scores": [0.1, 0.2],
                     "chosen": user(f"{split}?") + assistant("best"), "rejected": user(f"{split}?") + assistant("worst")}]
            for split in ("train", "test")}
    for split, split_rows in rows.items():
        hub.rows[(hub_name, None, split)] = split_rows
    options = {"hub_name": hub_name, "path": None, "holdout": 2}
    splits = loader(options)
    assert hub.calls == [(hub_name, None, "train"), (hub_name, None, "test")]
    assert splits == {split: [PreferencePair(user(f"{split}?"), "best", "worst", name)] for split in ("train", "test")}
    for split, split_rows in rows.items():
        write_lines(tmp_path / f"{split}.jsonl.gz", split_rows)
    assert loader({**options, "path": str(tmp_path)}) == splits
    with pytest.raises(DataError, match=f"datasets.{name}.path: .* is not a folder"):
        loader({**options, "path": str(tmp_path / "train.jsonl.gz")})


# ------------------------------------------------------------------------------ unpaired (KTO)

UNPAIRED = [
    (load_ultrafeedback_unpaired, "argilla/ultrafeedback-binarized-preferences-cleaned-kto"),
    (load_capybara_unpaired, "argilla/distilabel-capybara-kto-15k-binarized"),
]


@pytest.mark.parametrize(("loader", "hub_name"), UNPAIRED)
def test_unpaired_hub_train_split_is_held_out(hub, loader, hub_name, capsys):
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(8)]
    hub.rows[(hub_name, None, "train")] = [*rows, {"prompt": "q", "completion": " ", "label": True}]
    splits = loader({"hub_name": hub_name, "path": None, "holdout": 3})
    assert hub.calls == [(hub_name, None, "train")]
    assert len(splits["test"]) == 3 and len(splits["train"]) == 5
    assert sorted(r.response for r in splits["train"] + splits["test"]) == [f"answer {i}" for i in range(8)]
    assert all(r.desirable == (int(r.response[-1]) % 2 == 0) for r in splits["train"] + splits["test"])
    assert "skipped 1 rows (an empty response: 1)" in capsys.readouterr().out


@pytest.mark.parametrize(("loader", "hub_name"), UNPAIRED)
def test_unpaired_local_file_takes_strings_and_messages(tmp_path, loader, hub_name):
    conversation = [{"role": "system", "content": "be brief"}, *user("hi"), *assistant("hello"), *user("and?")]
    rows = [
        {"prompt": "plain?", "completion": "plain answer", "label": True},
        {"prompt": conversation, "completion": assistant("chat answer"), "label": False},
    ]
    path = write_lines(tmp_path / "kto.jsonl.gz", rows * 3)
    splits = loader({"hub_name": hub_name, "path": str(path), "holdout": 2})
    examples = splits["train"] + splits["test"]
    source = loader.__name__.removeprefix("load_")
    assert LabelledResponse(user("plain?"), "plain answer", True, source) in examples
    assert LabelledResponse(conversation, "chat answer", False, source) in examples
    assert len(splits["test"]) == 3 and len(examples) == 6  # holding out 2 takes a whole prompt: its 3 responses


# ------------------------------------------------------------------------------ TL;DR comparisons

TLDR_HUB = "openai/summarize_from_feedback"


def comparison(post_id: str, split: str, texts: tuple[str, str], choice: int) -> dict:
    return {
        "info": {"id": post_id, "post": f"Body of {post_id}.\n", "title": f"Title {post_id}", "subreddit": "tifu"},
        "split": split,
        "summaries": [{"text": f" {texts[0]}", "policy": "ref"}, {"text": texts[1], "policy": "sup"}],
        "choice": choice,
        "worker": "w",
    }


def test_tldr_prompt_format_choice_and_splits(tmp_path, capsys):
    write_lines(tmp_path / "batch3.json", [comparison("a", "train", ("first", "second"), 1), comparison("b", "valid1", ("x", "x"), 0)])
    write_lines(tmp_path / "batch13.json.gz", [comparison("c", "valid2", ("good", "bad"), 0)])
    splits = load_tldr({"hub_name": TLDR_HUB, "path": str(tmp_path), "holdout": 1})
    prompt = user("SUBREDDIT: r/tifu\nTITLE: Title a\nPOST: Body of a.\nTL;DR:")
    assert splits["train"] == [PreferencePair(prompt, "second", "first", "tldr")]
    assert [(p.chosen, p.rejected) for p in splits["test"]] == [("good", "bad")]
    assert "tldr: skipped 1 rows (identical responses: 1)" in capsys.readouterr().out


def test_tldr_validation_files_only_are_held_out(tmp_path):
    write_lines(tmp_path / "batch18.json", [comparison(f"p{i}", f"valid{1 + i % 2}", (f"s{i}", "t"), 0) for i in range(9)])
    splits = load_tldr({"hub_name": TLDR_HUB, "path": str(tmp_path), "holdout": 4})
    assert len(splits["test"]) == 4 and len(splits["train"]) == 5
    assert not {p.chosen for p in splits["test"]} & {p.chosen for p in splits["train"]}


def test_tldr_hub_comparisons_config_skips_news_articles(hub, capsys):
    article = {**comparison("cnn", "valid2", ("a", "b"), 0), "info": {"id": "cnn", "post": None, "article": "News.", "title": "T"}}
    hub.rows[(TLDR_HUB, "comparisons", "train")] = [comparison("a", "train", ("one", "two"), 0)]
    hub.rows[(TLDR_HUB, "comparisons", "validation")] = [comparison("b", "valid1", ("three", "four"), 1), article]
    splits = load_tldr({"hub_name": TLDR_HUB, "path": None, "holdout": 1})
    assert hub.calls == [(TLDR_HUB, "comparisons", "train"), (TLDR_HUB, "comparisons", "validation")]
    assert [(p.chosen, p.rejected) for p in splits["train"] + splits["test"]] == [("one", "two"), ("four", "three")]
    assert "skipped 1 rows (a news article, not a Reddit post: 1)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ local KTO files


def test_kto_jsonl_reads_llama_factory_json_arrays(tmp_path):
    rows = [
        {"messages": user("q1") + assistant("a1") + user("q2") + assistant("judged"), "label": True},
        {"messages": user("q3") + assistant("bad one"), "label": False},
    ]
    train = tmp_path / "kto_en_demo.json"
    train.write_text(json.dumps(rows, indent=2))
    test = write_lines(tmp_path / "test.jsonl", [{"prompt": "t?", "completion": "t!", "label": True}])
    splits = load_kto_jsonl({"train_path": str(train), "test_path": str(test), "holdout": 1})
    assert splits["train"] == [
        LabelledResponse(user("q1") + assistant("a1") + user("q2"), "judged", True, "kto_jsonl"),
        LabelledResponse(user("q3"), "bad one", False, "kto_jsonl"),
    ]
    assert splits["test"] == [LabelledResponse(user("t?"), "t!", True, "kto_jsonl")]


def test_kto_jsonl_without_test_path_is_held_out_and_mixes_with_pairs(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}", "label": i < 5} for i in range(10)])
    cfg = {"kto_jsonl": {"train_path": str(path), "test_path": None, "holdout": 3, "max_train_examples": 4}}
    mixed = load_datasets({**cfg, "demo": {"seed": 0, "train_size": 2, "test_size": 2}})
    assert [type(e) for e in mixed["train"]] == [LabelledResponse] * 4 + [PreferencePair] * 2
    assert len(mixed["test"]) == 3 + 2


def test_kto_jsonl_needs_a_train_path():
    with pytest.raises(DataError, match="datasets.kto_jsonl.train_path: set it"):
        load_kto_jsonl({"train_path": None, "test_path": None, "holdout": 1})


def test_kto_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "kto.json"
    good = {"messages": user("q") + assistant("a"), "label": True}
    path.write_text(json.dumps([good, good, {"messages": user("q") + assistant("a"), "label": "yes"}], indent=1))
    line = [number for number, text in enumerate(path.read_text().split("\n"), start=1) if text == " {"][2]  # the third item
    with pytest.raises(DataError, match=f"kto.json, line {line}: 'label' must be true or false, got 'yes'"):
        load_kto_jsonl({"train_path": str(path), "test_path": None, "holdout": 1})
    path.write_text('[\n {"messages": [], "label": true},\n oops\n]')
    with pytest.raises(DataError, match="kto.json, line 3: invalid JSON"):
        load_kto_jsonl({"train_path": str(path), "test_path": None, "holdout": 1})


# ------------------------------------------------------------------------------ bad rows, every loader

GOOD_ROWS = {
    "ultrafeedback": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "tldr": comparison("a", "valid1", ("x", "y"), 0),
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
}


def local_options(name: str, tmp_path, bad: str) -> tuple[dict, str]:
    """Options reading a local file in `name`'s layout whose second line is `bad`; the file's name."""
    kind = name if name in GOOD_ROWS else "unpaired"
    file = {"ultrafeedback": "test.jsonl", "tldr": "batch1.json"}.get(kind, "data.jsonl")
    path = write_lines(tmp_path / file, [GOOD_ROWS[kind], bad])
    if name == "kto_jsonl":
        return {"train_path": str(path), "test_path": None, "holdout": 1}, file
    return {"hub_name": "unused", "path": str(path if kind == "unpaired" else tmp_path), "holdout": 1}, file


BAD_ROWS = [
    ("ultrafeedback", '{"prompt": "p", "chosen": "c"}', r"missing key\(s\) \['rejected'\]"),
    ("ultrafeedback", json.dumps({"prompt": "p", "chosen": user("c"), "rejected": "r"}), "'chosen' must be a string or a message list"),
    ("ultrafeedback", "[1, 2]", "expected a JSON object, got list"),
    ("tldr", json.dumps({**GOOD_ROWS["tldr"], "choice": 2}), "need two summaries and a choice of 0 or 1, got 2 and 2"),
    ("tldr", json.dumps({**GOOD_ROWS["tldr"], "info": {"post": "p"}}), "need info.subreddit/title/post"),
    ("tldr", json.dumps({**GOOD_ROWS["tldr"], "split": None}), "'split' must be a string"),
    ("ultrafeedback_unpaired", '{"prompt": "p", "completion": "c", "label": "true"}', "'label' must be true or false, got 'true'"),
    ("capybara_unpaired", '{"prompt": [], "completion": "c", "label": true}', "'prompt' must be a string or a non-empty list"),
    ("capybara_unpaired", json.dumps({"prompt": "p", "completion": user("c"), "label": False}), "'completion' must be a string or"),
    ("kto_jsonl", '{"prompt": "p", "completion": "c", "label": 1}', "'label' must be true or false, got 1"),
    ("kto_jsonl", '{"messages": [{"role": "assistant", "content": "a"}], "label": true}', "'messages' must list the prompt turns"),
    ("kto_jsonl", '{"prompt": "p", "label": true}', r"missing key\(s\) \['completion'\]"),
    ("kto_jsonl", "{oops", "invalid JSON"),
]


@pytest.mark.parametrize(("name", "bad", "message"), BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, name, bad, message):
    options, file = local_options(name, tmp_path, bad)
    with pytest.raises(DataError, match=f"{file}, line 2: {message}"):
        LOADERS[name](options)
