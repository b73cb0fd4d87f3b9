"""The contrast and unpaired losses in the training loop: every preset end to end on the demo data,
the embedding cache, balanced unpaired batches, KTO's mismatched pairs, resume of unpaired runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from preference_datasets import BalancedSampler, DataError, LabelledResponse, PairTokenizer, PreferencePair, as_items
from tests.test_trainer import Interrupt, interrupt_after, without_timing


@pytest.mark.parametrize("loss", ["rpo", "rpo_unpaired", "rpo_uniform", "rpo_diagonal", "simpo", "rpo_simpo", "kto"])
def test_every_preset_trains_end_to_end(make_cfg, tmp_path, loss):
    summary = train.run(make_cfg(f"loss={loss}", "sft.max_examples=8"), tmp_path / "run")
    final = summary["stages"]["align"]["final_eval"]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= final.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in final.values())
    # unpaired losses on the demo pairs: each held-out batch holds both answers of its prompts
    assert ("rewards/accuracy_same_prompt" in final) == (loss in ("rpo_unpaired", "kto"))
    sft = load_file(tmp_path / "run" / "sft" / "final" / "model.safetensors")
    aligned = load_file(tmp_path / "run" / "align" / "final" / "model.safetensors")
    assert any(not torch.equal(sft[k], aligned[k]) for k in sft)  # the loss moved the policy
    if loss == "kto":
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert all("kl" in r for r in records if r["stage"] == "align" and "loss" in r)


def test_prompt_embeddings_are_encoded_once_and_cached(make_cfg, tmp_path, monkeypatch, shared_cache):
    import sentence_transformers

    calls = []
    original = sentence_transformers.SentenceTransformer.encode

    def counting_encode(self, sentences, **kwargs):
        calls.append(len(sentences))
        return original(self, sentences, **kwargs)

    monkeypatch.setattr(sentence_transformers.SentenceTransformer, "encode", counting_encode)
    cfg = make_cfg("loss=rpo", "sft.enabled=false", "datasets.demo.seed=77")  # data no other test embeds
    train.run(cfg, tmp_path / "first")
    assert calls == [256, 8]  # train and evaluated held-out prompts, each once, none during training
    train.run(cfg, tmp_path / "second")
    assert calls == [256, 8]  # the second run reads the cache
    assert len(list((shared_cache / "embeddings").glob("*.pt"))) >= 2


def test_prompt_response_embeddings_differ_per_side(make_cfg, tmp_path):
    examples = train.prepare_examples(make_cfg("loss=rpo"), train.load_datasets(make_cfg().datasets))
    cfg = make_cfg("loss=rpo", "loss.embedding.input=prompt_response")
    chosen, rejected = train.contrast_embeddings(cfg, examples)["test"]
    assert chosen.shape == rejected.shape and not torch.equal(chosen, rejected)
    shared = train.contrast_embeddings(make_cfg("loss=rpo"), examples)["test"]
    assert shared[0] is shared[1]
    with pytest.raises(train.ConfigError, match="loss.embedding.input='response'"):
        train.contrast_embeddings(make_cfg("loss=rpo", "loss.embedding.input=response"), examples)


def tiny_sentence_model(folder, architecture: str, tokenizer) -> str:
    """A random sentence-transformers model (mean pooling, normalized) over a T5 encoder or a RoBERTa."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import RobertaConfig, RobertaModel, T5Config, T5EncoderModel

    if architecture == "t5":
        encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    else:
        encoder = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=600))
    encoder.save_pretrained(folder / "encoder")
    tokenizer.save_pretrained(folder / "encoder")
    modules = [models.Transformer(str(folder / "encoder")), models.Pooling(16, "mean"), models.Normalize()]
    SentenceTransformer(modules=modules).save(str(folder / "sentence"))
    return str(folder / "sentence")


@pytest.mark.parametrize("architecture", ["t5", "roberta"])
def test_the_embedding_model_is_the_configured_one_of_any_architecture(make_cfg, tmp_path, smollm2_tokenizer, architecture):
    """RPO's Table 2 swaps MiniLM for a T5 encoder (sentence-t5-large) or a distilroberta: the weights
    come from the configured sentence model, whatever its architecture (tiny random ones here)."""
    from sentence_transformers import SentenceTransformer

    model = tiny_sentence_model(tmp_path, architecture, smollm2_tokenizer)
    cfg = make_cfg("loss=rpo", f"loss.embedding.model={model}")
    examples = train.prepare_examples(cfg, train.load_datasets(cfg.datasets))
    chosen, rejected = train.contrast_embeddings(cfg, examples)["test"]
    expected = SentenceTransformer(model, device="cpu").encode([train.prompt_text(e) for e in examples["test"]], convert_to_tensor=True)
    assert chosen.shape == (len(examples["test"]), 16) and chosen is rejected
    torch.testing.assert_close(chosen, expected.float(), rtol=1e-5, atol=1e-6)


def test_balanced_batches_always_hold_both_sides():
    desirable = [True] * 3 + [False] * 10
    sampler = BalancedSampler(desirable, seed=0)
    for _ in range(20):
        batch = sampler.take(4)
        sides = [desirable[i] for i in batch]
        assert sides.count(True) == 1 and sides.count(False) == 3 and sides == sorted(sides, reverse=True)
    restored = BalancedSampler(desirable, seed=0)
    restored.load(sampler.state())
    assert restored.take(8) == sampler.take(8)
    with pytest.raises(DataError, match="got 0 and 2"):
        BalancedSampler([False, False], seed=0)
    with pytest.raises(DataError, match="batch of 1"):
        BalancedSampler(desirable, seed=0).take(1)


def test_accumulation_keeps_both_sides_in_every_micro_batch(make_cfg, tmp_path):
    cfg = make_cfg("loss=rpo_unpaired", "train.gradient_accumulation_steps=2", "sft.enabled=false")
    summary = train.run(cfg, tmp_path / "ok")
    assert summary["stages"]["align"]["steps"] == 24 // 4
    with pytest.raises(train.ConfigError, match="holds 3 desirable and 3 undesirable ones, too few for 6 micro-batches"):
        train.run(make_cfg("loss=rpo_unpaired", "train.batch_size=6", "train.gradient_accumulation_steps=6", "sft.enabled=false"),
                  tmp_path / "x")


def test_items_and_mismatched_pairs(smollm2_tokenizer):
    pairs = [PreferencePair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}") for i in range(5)]
    items = as_items(pairs)
    assert [item.desirable for item in items[:2]] == [True, False] and items[1].response == "bad 0"
    tokenized = PairTokenizer(smollm2_tokenizer, 64, 32).items(items, seed=0)
    responses = [t.response for t in tokenized]
    for item in tokenized:
        assert item.mismatched in responses and item.mismatched != item.response
    assert len({tuple(t.mismatched) for t in tokenized}) == len(tokenized)  # a permutation of the responses
    many = as_items([PreferencePair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}") for i in range(40)])
    for seed in range(5):  # never the other response of the same prompt
        for item, tokens in zip(many, PairTokenizer(smollm2_tokenizer, 64, 32).items(many, seed=seed), strict=True):
            number = item.response.split()[1]
            own = {tuple(smollm2_tokenizer(f"{side} {number}", add_special_tokens=False).input_ids) for side in ("good", "bad")}
            assert tuple(tokens.mismatched[:-1]) not in own


def test_paired_losses_refuse_single_responses(make_cfg):
    single = {"train": [LabelledResponse([{"role": "user", "content": "q"}], "a", True, "kto_jsonl")], "test": []}
    with pytest.raises(DataError, match=r"datasets \['kto_jsonl'\] hold single labelled responses: use loss=rpo_unpaired"):
        train.prepare_examples(make_cfg("loss=rpo"), single)
    with pytest.raises(train.ConfigError, match="loss.weighting=diagonal contrasts the two responses of one prompt"):
        train.prepare_examples(make_cfg("loss=dpo", "loss.paired=false"), single)
    with pytest.raises(train.ConfigError, match="loss.paired=true: KTO judges responses one at a time, it needs loss.paired=false"):
        train.prepare_examples(make_cfg("loss=kto", "loss.paired=true"), single)


@pytest.mark.parametrize("loss", ["rpo_unpaired", "kto"])
def test_unpaired_resume_equals_an_uninterrupted_run(make_cfg, tmp_path, monkeypatch, loss):
    cfg = make_cfg(f"loss={loss}", "sft.enabled=false")
    train.run(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        interrupt_after(patch, "align", 3)
        with pytest.raises(Interrupt):
            train.run(cfg, tmp_path / "killed")
    train.run(make_cfg(f"loss={loss}", "sft.enabled=false", f"resume={tmp_path / 'killed'}"), tmp_path / "unused")
    straight = load_file(tmp_path / "straight" / "align" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "align" / "final" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert without_timing(tmp_path / "killed" / "metrics.jsonl") == without_timing(tmp_path / "straight" / "metrics.jsonl")


@pytest.mark.parametrize(("loss", "examples", "steps", "trained"), [("rpo_unpaired", 25, 1, 24), ("kto", 27, 2, 24), ("kto", 26, 1, 26)])
def test_a_last_unpaired_batch_that_cannot_hold_both_sides_is_skipped(make_cfg, tmp_path, capsys, loss, examples, steps, trained):
    """25 = 6 batches of 4 + 1 response; 27 = 6 x 4 + 3, whose 2 + 1 sides cannot fill 2 micro-batches;
    26 = 6 x 4 + 2: one of each side, trained."""
    cfg = make_cfg(f"loss={loss}", "sft.enabled=false", f"align.max_examples={examples}", f"train.gradient_accumulation_steps={steps}")
    summary = train.run(cfg, tmp_path / "run")
    assert summary["stages"]["align"]["examples"] == trained
    assert (tmp_path / "run" / "align" / "final" / "model.safetensors").exists()
    assert ("skipping the last" in capsys.readouterr().out) == (trained < examples)


def write_kto_jsonl(path, labels):
    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}", "label": label} for i, label in enumerate(labels)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_unpaired_held_out_slice_keeps_both_sides(make_cfg, tmp_path):
    """A test file whose first responses are all desirable: the evaluated slice still holds both sides."""
    train_file = write_kto_jsonl(tmp_path / "train.jsonl", [True, False] * 12)
    test_file = write_kto_jsonl(tmp_path / "test.jsonl", [True] * 10 + [False] * 6)
    data = [f"datasets.kto_jsonl.train_path={train_file}", f"datasets.kto_jsonl.test_path={test_file}"]
    summary = train.run(make_cfg("loss=kto", "datasets=[kto_jsonl]", *data, "train.max_eval_examples=8"), tmp_path / "run")
    final = summary["stages"]["align"]["final_eval"]
    assert all(torch.isfinite(torch.tensor(v)) for v in final.values())
    one_sided = write_kto_jsonl(tmp_path / "one_sided.jsonl", [True] * 6)
    with pytest.raises(train.DataError, match=r"test split: 6 desirable and 0 undesirable responses; unpaired training needs both"):
        train.run(make_cfg("loss=kto", "datasets=[kto_jsonl]", data[0], f"datasets.kto_jsonl.test_path={one_sided}"), tmp_path / "bad")
