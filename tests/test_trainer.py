"""The training loop on the `tiny` model: log-probs, accumulation, reference cache, end to end, resume."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from preference_datasets import collate
from tests.conftest import ROOT, build
from tests.test_loop_values import perturbed
from trainers.basic import TIMING_KEYS, BasicTrainer, NonFiniteLoss, Stopped
from utils import checksum_path, load_or_compute, response_logps


def test_response_logps_equal_full_vocabulary_log_softmax(make_cfg, tmp_path):
    trainer = build(make_cfg(), tmp_path, stage="sft")
    batch = collate(trainer.train_set[:5], range(5), trainer.pad_id)
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    logps, counts = response_logps(trainer.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = trainer.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, (per_token * mask).sum(-1), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(-1).tolist()


ACCUMULATED = {"dpo": ["loss=dpo"], "ipo": ["loss=ipo"], "sft": ["loss=sft"], "simpo": ["loss=simpo"], "sr_dpo": ["loss=sr_dpo"],
               "sr_ipo naive": ["loss=sr_ipo", "loss.sr_delta=naive"]}


@pytest.mark.parametrize("overrides", ACCUMULATED.values(), ids=ACCUMULATED.keys())
def test_gradient_accumulation_equals_the_whole_batch(make_cfg, tmp_path, overrides):
    stage = "sft" if overrides == ["loss=sft"] else "align"
    updated = []
    for steps in (1, 3):
        # SGD: the update is the gradient itself (RMSprop would amplify rounding in near-zero gradients)
        cfg = make_cfg(*overrides, f"train.gradient_accumulation_steps={steps}", "train.batch_size=7", "train.optimizer=sgd")
        trainer = perturbed(build(cfg, tmp_path / f"acc{steps}", stage))  # Sr: a margin far from zero
        record = trainer.train_step(trainer.sampler.take(7))
        updated.append((record, {k: v.clone() for k, v in trainer.policy.state_dict().items()}))
    (whole, whole_weights), (accumulated, accumulated_weights) = updated
    assert accumulated.keys() == whole.keys()
    # the same sums of log-probs in another order and layout: 1e-6 absolute allows for fp32 rounding
    for key in accumulated.keys() - set(TIMING_KEYS) - {"tokens"}:
        assert accumulated[key] == pytest.approx(whole[key], rel=1e-5 if key == "loss" else 1e-4, abs=1e-6), key
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    for key in whole_weights:
        torch.testing.assert_close(accumulated_weights[key], whole_weights[key], rtol=1e-5, atol=1e-6)


def test_reference_logps_are_cached_and_equal_a_live_reference(make_cfg, tmp_path, monkeypatch, shared_cache):
    cfg = make_cfg("seed=12345")  # a seed no other test uses: fresh weights, so a fresh cache key
    before = set((shared_cache / "reference_logps").glob("*.pt"))
    trainer = build(cfg, tmp_path / "a")
    cache_files = set((shared_cache / "reference_logps").glob("*.pt")) - before
    assert len(cache_files) == 2  # one file a table: train, test
    live = build(make_cfg(f"seed={cfg.seed}", "reference.precompute=false"), tmp_path / "b")
    assert live.reference_model is not None and live.reference_logps is None
    batch = trainer.make_batch(trainer.train_set, range(6))
    cached, fresh = trainer.reference_batch_logps(batch, "train"), live.reference_batch_logps(batch, "train")
    torch.testing.assert_close(torch.stack(cached), torch.stack(fresh), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(BasicTrainer, "all_logps", lambda *a, **k: pytest.fail("recomputed cached reference log-probs"))
    again = build(cfg, tmp_path / "c")
    torch.testing.assert_close(again.reference_logps["test"], trainer.reference_logps["test"])


COMPUTE_LOGPS = BasicTrainer.all_logps


def counting_passes(monkeypatch) -> list[str]:
    """The reference passes `all_logps` runs from now on, by their progress bars' names."""
    passes = []

    def counted(self, model, examples, desc, stoppable=False):
        passes.append(desc)
        return COMPUTE_LOGPS(self, model, examples, desc, stoppable)

    monkeypatch.setattr(BasicTrainer, "all_logps", counted)
    return passes


def test_each_reference_table_is_cached_alone_and_shared(make_cfg, tmp_path, monkeypatch):
    """Sr-DPO after DPO on the same weights and data computes only its p + x tables (its plain ones
    are DPO's); a run stopped during its test pass keeps its train table."""
    dpo = build(make_cfg("seed=2468"), tmp_path / "dpo")  # a seed no other test uses: fresh cache keys
    passes = counting_passes(monkeypatch)
    sr = build(make_cfg("seed=2468", "loss=sr_dpo"), tmp_path / "sr")
    assert passes == ["reference log-probs (train, p + x)", "reference log-probs (test, p + x)"]
    for split in ("train", "test"):
        assert torch.equal(sr.reference_logps[split], dpo.reference_logps[split])

    def stopped_at_test(self, model, examples, desc, stoppable=False):
        if desc == "reference log-probs (test)":
            raise Stopped(f"SIGTERM received during the {desc} pass", "SIGTERM")
        return COMPUTE_LOGPS(self, model, examples, desc, stoppable)

    monkeypatch.setattr(BasicTrainer, "all_logps", stopped_at_test)
    with pytest.raises(Stopped):
        build(make_cfg("seed=1357"), tmp_path / "stopped")
    passes = counting_passes(monkeypatch)
    again = build(make_cfg("seed=1357"), tmp_path / "again")
    assert passes == ["reference log-probs (test)"]
    assert set(again.reference_logps) == {"train", "test"}


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_live_reference_trains_like_the_precomputed_one(make_cfg, tmp_path, loss):
    """reference.precompute=false: a frozen copy scored every step. Over several steps (the policy
    moving away from it) the losses, rewards and weights equal those with the cached log-probs."""
    runs = []
    for precompute in (True, False):
        cfg = make_cfg(f"loss={loss}", f"reference.precompute={str(precompute).lower()}", "train.optimizer=sgd", "align.lr=0.5")
        trainer = build(cfg, tmp_path / str(precompute))
        assert (trainer.reference_model is None) == precompute
        records = [trainer.train_step(trainer.sampler.take(4)) for _ in range(4)]
        runs.append((records, trainer.evaluate(), {k: v.clone() for k, v in trainer.policy.state_dict().items()}))
    (cached, cached_eval, cached_weights), (live, live_eval, live_weights) = runs
    assert abs(live[-1]["rewards/margin"]) > 1e-3  # the policy has moved away from the reference
    for cached_record, live_record in zip(cached, live, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "grad_norm"):
            assert live_record[key] == pytest.approx(cached_record[key], rel=1e-4, abs=1e-6), key
    assert live_eval == pytest.approx(cached_eval, rel=1e-4, abs=1e-6)
    for key in cached_weights:
        torch.testing.assert_close(live_weights[key], cached_weights[key], rtol=1e-4, atol=1e-6)


def test_sft_then_dpo_end_to_end(make_cfg, tmp_path, capsys):
    cfg = make_cfg("loss=dpo")
    summary = train.run(cfg, tmp_path / "run")
    progress = capsys.readouterr().err
    assert "sft: held-out evaluation" in progress and "align: held-out evaluation" in progress  # evaluations take minutes at scale
    final = tmp_path / "run" / "align" / "final"
    assert summary["final_model"] == str(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sft_steps = [r for r in records if r["stage"] == "sft" and "loss" in r]
    align_steps = [r for r in records if r["stage"] == "align" and "loss" in r]
    assert len(sft_steps) == 16 // 4 and len(align_steps) == 24 // 4
    assert {"rewards/accuracy", "rewards/margin", "lr", "grad_norm", "tokens_per_s", "logps/rejected"} <= align_steps[0].keys()
    evals = [r for r in records if r["stage"] == "align" and "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval/rewards/margin"] == 0.0  # the start: policy == reference
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # alignment lowers the held-out loss
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").loss.name == "dpo"
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["logp_accuracy"].keys() == {
        "start", "after sft", "after align"
    }


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, stage: str, steps: int):
    original = BasicTrainer.train_step
    calls = {"n": 0}

    def train_step(self, indices):
        if self.stage == stage:
            calls["n"] += 1
            if calls["n"] > steps:
                raise Interrupt
        return original(self, indices)

    monkeypatch.setattr(BasicTrainer, "train_step", train_step)


def without_timing(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# Dropout draws random numbers in every training forward: a resume that did not restore the RNG differs.
DROPOUT = "+model.random_init.attention_dropout=0.1"


# 4 SFT and 6 alignment steps, a checkpoint every 2 steps: what is left to run after each interruption.
@pytest.mark.parametrize(
    ("stage", "steps", "steps_left"),
    [("sft", 3, {"sft": 2, "align": 6}), ("align", 3, {"align": 4}), ("align", 4, {"align": 2})],
)
def test_resume_equals_an_uninterrupted_run(make_cfg, tmp_path, monkeypatch, stage, steps, steps_left):
    cfg = make_cfg(DROPOUT)
    train.run(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        interrupt_after(patch, stage, steps)
        with pytest.raises(Interrupt):
            train.run(cfg, tmp_path / "killed")
    original, executed = BasicTrainer.train_step, {}

    def counting_train_step(self, indices):
        executed[self.stage] = executed.get(self.stage, 0) + 1
        return original(self, indices)

    monkeypatch.setattr(BasicTrainer, "train_step", counting_train_step)
    train.run(make_cfg(DROPOUT, f"resume={tmp_path / 'killed'}"), tmp_path / "unused")
    assert executed == steps_left  # it continued from the checkpoint rather than starting over
    straight = load_file(tmp_path / "straight" / "align" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "align" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert without_timing(tmp_path / "killed" / "metrics.jsonl") == without_timing(tmp_path / "straight" / "metrics.jsonl")
    assert not (tmp_path / "killed" / "align" / "checkpoint").exists()


def test_resume_true_finds_the_latest_unfinished_run(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg()
    with monkeypatch.context() as patch:
        interrupt_after(patch, "align", 2)
        with pytest.raises(Interrupt):
            train.run(cfg, tmp_path / "runs" / "dpo_tiny" / "first")
    def loaded_cfg(*overrides):  # as train.run builds it: with the held-out record resume compares
        cfg = make_cfg(*overrides)
        train.load_examples(cfg)
        return cfg

    assert train.resolve_run_dir(loaded_cfg("resume=true"), tmp_path / "new") == tmp_path / "runs" / "dpo_tiny" / "first"
    with pytest.raises(train.ConfigError, match="no unfinished run with this config"):
        train.resolve_run_dir(loaded_cfg("resume=true", "loss.beta=0.3"), tmp_path / "new")
    with pytest.raises(train.ConfigError, match=r"resume needs the saved config, this one differs in loss.beta: 0.1 -> 0.3"):
        train.resolve_run_dir(loaded_cfg(f"resume={tmp_path / 'runs' / 'dpo_tiny' / 'first'}", "loss.beta=0.3"), tmp_path)
    with pytest.raises(train.ConfigError, match="is not a run directory"):
        train.resolve_run_dir(loaded_cfg(f"resume={tmp_path}"), tmp_path)


def test_resume_refuses_a_run_whose_held_out_set_changed(make_cfg, tmp_path, hh_folder):
    """The same config over data that changed on disk: resuming would evaluate on other examples."""
    overrides = ["loss=dpo", "sft.enabled=false", "datasets=[hh]", f"datasets.hh.path={hh_folder}", "datasets.hh.holdout=4"]
    train.run(make_cfg(*overrides, "align.max_examples=4"), tmp_path / "run")
    for test_file in hh_folder.glob("*/test.jsonl.gz"):
        test_file.write_bytes(gzip.compress(gzip.decompress(test_file.read_bytes()).replace(b"good answer", b"fine answer")))
    cfg = make_cfg(*overrides, "align.max_examples=4", f"resume={tmp_path / 'run'}")
    train.load_examples(cfg)
    with pytest.raises(train.ConfigError, match=r"this one differs in heldout.evaluated_fingerprint: "):
        train.resolve_run_dir(cfg, tmp_path / "unused")


def test_sft_only_and_alignment_from_an_archive(make_cfg, tmp_path):
    summary = train.run(make_cfg("loss=sft"), tmp_path / "sft_run")
    archive = tmp_path / "sft_run" / "sft" / "final"
    assert summary["final_model"] == str(archive) and not (tmp_path / "sft_run" / "align").exists()
    summary = train.run(make_cfg("loss=ipo", f"model.archive={archive}", "sft.enabled=false"), tmp_path / "ipo_run")
    assert list(summary["stages"]) == ["align"]
    with pytest.raises(train.ConfigError, match="trainer='nope': choose one of basic, fsdp"):
        train.run(make_cfg("trainer=nope"), tmp_path / "bad")
    with pytest.raises(train.ConfigError, match=r"model.archive='/nowhere': not a Hugging Face model folder \(no config.json in it\)"):
        train.run(make_cfg("model.archive=/nowhere", "sft.enabled=false"), tmp_path / "bad")


def run_cli(tmp_path, cache, *overrides):
    command = [sys.executable, "train.py", f"runs_root={tmp_path / 'runs'}", f"cache_dir={cache}", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_hub_model_offline_fails_clearly(tmp_path, shared_cache, hh_folder):
    result = run_cli(tmp_path, shared_cache, "loss=dpo", "model=mistral7b", "datasets=[hh]", f"datasets.hh.path={hh_folder}",
                     "datasets.hh.holdout=8")
    assert result.returncode == 2
    assert "Cannot load model 'mistralai/Mistral-7B-v0.1'. Tried:" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr


def test_wandb_offline_needs_no_account(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train.run(make_cfg("wandb.enabled=true", "sft.max_examples=4", "align.max_examples=4"), tmp_path / "run")
    logs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0


def test_bf16_model_trains_fp32_master_weights_with_bf16_compute(make_cfg, tmp_path):
    """model.dtype=bfloat16 (the 7B presets): at lr 5e-7 a bf16 weight of scale 0.02 would round most
    RMSprop updates away; the parameters and optimizer state are fp32, the forward runs in bf16."""
    cfg = make_cfg("loss=dpo", "model.dtype=bfloat16", "align.lr=5e-7", "align.warmup_steps=0")
    trainer = build(cfg, tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    matmul_dtypes = set()
    trainer.policy.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: matmul_dtypes.add(out.dtype))
    for _ in range(3):
        trainer.train_step(trainer.sampler.take(4))
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in trainer.policy.named_parameters())
    assert changed / sum(p.numel() for p in before.values()) > 0.9
    assert matmul_dtypes == {torch.bfloat16} and all(p.dtype == torch.float32 for p in before.values())
    assert all(v.dtype == torch.float32 for state in trainer.optimizer.state.values() for v in state.values() if v.ndim)
    trainer.save_final({}, {})
    assert {t.dtype for t in load_file(trainer.stage_dir / "final" / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(trainer.stage_dir / "final").dtype == torch.bfloat16
    checkpoint_state = trainer.exported_state(final=False)  # checkpoints keep the master weights
    assert checkpoint_state is None and trainer.policy.model.embed_tokens.weight.dtype == torch.float32


def test_sft_evaluation_weights_each_metric_by_what_it_averages(make_cfg, tmp_path):
    """The loss is a mean over response tokens; the preference accuracy a share of pairs (k / n)."""
    trainer = build(make_cfg("train.max_eval_examples=13", "train.eval_batch_size=4"), tmp_path, stage="sft")
    result = trainer.evaluate()
    batch = collate(trainer.test_set, range(13), trainer.pad_id)
    with torch.no_grad():
        logps, counts = response_logps(trainer.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    (chosen, rejected), (chosen_counts, _) = logps.view(2, -1), counts.view(2, -1)
    wins = int((chosen > rejected).sum())
    assert 0 < wins < 13 and result["logp_accuracy"] == pytest.approx(wins / 13, abs=1e-12)
    assert result["loss"] == pytest.approx((-chosen.sum() / chosen_counts.sum()).item(), rel=1e-5)
    assert result["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)


def test_an_error_at_the_end_of_a_stage_loses_no_training(make_cfg, tmp_path, monkeypatch):
    """The final evaluation fails (a bad held-out batch, an OOM): the trained weights are in a
    checkpoint, and resuming only evaluates and exports."""
    cfg = make_cfg("loss=dpo", "sft.enabled=false")
    original_evaluate, original_step = BasicTrainer.evaluate, BasicTrainer.train_step

    def failing_final_evaluation(self):
        if self.examples == self.total_examples:
            raise Interrupt
        return original_evaluate(self)

    with monkeypatch.context() as patch:
        patch.setattr(BasicTrainer, "evaluate", failing_final_evaluation)
        with pytest.raises(Interrupt):
            train.run(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "align" / "checkpoint"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["counters"] == [6, 24, 0]  # steps, examples, skipped
    trained = load_file(checkpoint / "model.safetensors")
    steps = []
    monkeypatch.setattr(BasicTrainer, "train_step", lambda self, indices: steps.append(indices) or original_step(self, indices))
    train.run(make_cfg("loss=dpo", "sft.enabled=false", f"resume={tmp_path / 'run'}"), tmp_path / "unused")
    final = load_file(tmp_path / "run" / "align" / "final" / "model.safetensors")
    assert steps == [] and all(torch.equal(final[k], trained[k]) for k in trained)


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """Dropout on a GPU draws from the CUDA generator: a resumed run must continue its sequence."""
    import utils

    cuda_state = {"now": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value: cuda_state.update(now=value))
    saved = utils.rng_state()
    cuda_state["now"] = torch.tensor([9], dtype=torch.uint8)
    utils.set_rng_state(saved)
    assert cuda_state["now"].tolist() == [7]


def test_reference_cache_is_keyed_by_compute_precision(make_cfg, tmp_path, shared_cache):
    """The same weights computed in bf16 (FSDP's mixed precision) and in fp32 give different log-probs."""
    from utils import state_fingerprint

    trainer = build(make_cfg("seed=4242"), tmp_path)  # a seed no other test uses: a fresh cache entry
    cached = set((shared_cache / "reference_logps").glob("*.pt"))
    trainer.compute_dtype = torch.bfloat16
    bf16 = trainer.precomputed_reference_logps(state_fingerprint(trainer.policy))
    assert len(set((shared_cache / "reference_logps").glob("*.pt")) - cached) == 2
    assert not torch.equal(bf16["train"], trainer.reference_logps["train"])
    torch.testing.assert_close(bf16["train"], trainer.reference_logps["train"], rtol=0.05, atol=0.5)



def test_skip_nonfinite_skips_and_counts_the_step_and_applies_the_others(make_cfg, tmp_path, monkeypatch):
    """train.skip_nonfinite=true: a batch whose loss is NaN changes no weight and is counted; the run goes on."""
    original = BasicTrainer.batch_loss
    calls = []

    def nan_on_the_second_batch(self, batch, split, groups=None):
        loss, stats = original(self, batch, split, groups)
        calls.append(split)
        return (loss * float("nan"), stats) if calls.count("train") == 2 and split == "train" else (loss, stats)

    monkeypatch.setattr(BasicTrainer, "batch_loss", nan_on_the_second_batch)
    cfg = make_cfg("loss=dpo", "sft.enabled=false", "train.skip_nonfinite=true", "train.micro_batch_size=4", "train.save_every=null")
    trainer = build(cfg, tmp_path)
    trainer.micro_batches()
    trainer.train_step(trainer.sampler.take(4))
    before = {name: value.clone() for name, value in trainer.policy.state_dict().items()}
    record = trainer.train_step(trainer.sampler.take(4))
    assert record["skipped_nonfinite"] == 1 and not math.isfinite(record["grad_norm"])
    assert all(torch.equal(before[name], value) for name, value in trainer.policy.state_dict().items())
    assert trainer.train_step(trainer.sampler.take(4))["skipped_nonfinite"] == 1
    assert any(not torch.equal(before[name], value) for name, value in trainer.policy.state_dict().items())
    trainer.cfg.train.skip_nonfinite = False
    calls.clear()
    trainer.train_step(trainer.sampler.take(4))
    with pytest.raises(NonFiniteLoss, match=r"align step 1 \(examples 0-3 of the stage\): loss nan"):
        trainer.train_step(trainer.sampler.take(4))


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "no checksum"])
def test_a_damaged_cache_file_is_computed_again_and_named(tmp_path, capsys, damage):
    path = tmp_path / "cache" / "table.pt"
    assert load_or_compute(path, lambda: {"x": torch.arange(1000.0)})["x"].sum() == 499500
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "zeroed":
        path.write_bytes(path.read_bytes()[:-300] + bytes(300))
    else:
        checksum_path(path).unlink()
    recomputed = load_or_compute(path, lambda: {"x": torch.ones(3)})
    assert recomputed["x"].tolist() == [1.0, 1.0, 1.0] and f"cache {path}:" in capsys.readouterr().out
    assert load_or_compute(path, lambda: pytest.fail("a sound cache is computed again"))["x"].tolist() == [1.0, 1.0, 1.0]


def logged_learning_rates(run_dir, stage: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r["stage"] == stage and "lr" in r]


def test_cosine_schedule_with_warmup_ratio_is_hugging_faces(make_cfg, tmp_path):
    """SimPO's recipe (`lr_schedule=cosine`, `warmup_ratio=0.1`) logs, step by step, the rates of
    transformers' `get_cosine_schedule_with_warmup`; SFT keeps the constant schedule after its warmup."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = make_cfg("loss=dpo", "align.max_examples=40", "align.lr_schedule=cosine", "align.warmup_ratio=0.25", "sft.warmup_steps=2")
    train.run(cfg, tmp_path / "run")
    steps = 40 // 4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.align.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=math.ceil(0.25 * steps), num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert logged_learning_rates(tmp_path / "run", "align") == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected[0] == 0 and max(expected) == cfg.align.lr  # a warmup from 0, then the decay
    assert logged_learning_rates(tmp_path / "run", "sft") == pytest.approx([cfg.sft.lr * min(1, (k + 1) / 3) for k in range(16 // 4)])


def test_a_stage_batch_size_sizes_that_stage_only(make_cfg, tmp_path):
    """`align.batch_size` (RPO's contrast-group rows) changes the alignment batch, not SFT's, and the
    messages about the batch name the key that set it."""
    cfg = make_cfg("loss=rpo", "train.batch_size=4", "align.batch_size=8", "sft.max_examples=16", "align.max_examples=24")
    sft, align = build(cfg, tmp_path, "sft"), build(cfg, tmp_path, "align")
    assert (sft.cfg.train.batch_size, sft.planned_steps(), sft.batch_key) == (4, 4, "train.batch_size")
    assert (align.cfg.train.batch_size, align.planned_steps(), align.batch_key) == (8, 3, "align.batch_size")
    assert cfg.train.batch_size == 4  # the run's config is left as composed


def test_an_unpaired_row_takes_the_sft_of_a_paired_row_on_the_same_pairs(make_cfg, tmp_path, capsys):
    """Unpaired RPO on pairs (Table 1's `unpaired` row) trains SFT on the pairs' chosen responses, in
    the order a paired row does: it takes the paired row's SFT model, bit for bit the one it would
    train itself (the key is the SFT's token ids in order: another seed, data or SFT setting trains its
    own, as the test below checks)."""
    small = ("sft.reuse=true", "align.max_examples=8", "seed=7")  # a seed of its own: the cache is shared between tests
    train.run(make_cfg("loss=dpo", *small), tmp_path / "paired")
    train.run(make_cfg("loss=rpo_unpaired", *small), tmp_path / "reused")
    assert "Stage sft: the same SFT (model, data, SFT settings, seed) finished in" in capsys.readouterr().out
    train.run(make_cfg("loss=rpo_unpaired", "sft.reuse=false", "align.max_examples=8", "seed=7"), tmp_path / "trained")
    reused, trained = (load_file(tmp_path / name / "sft" / "final" / "model.safetensors") for name in ("reused", "trained"))
    assert all(torch.equal(reused[key], trained[key]) for key in trained)


def test_a_run_takes_the_sft_stage_of_an_earlier_run_with_the_same_sft(make_cfg, tmp_path, capsys):
    """`sft.reuse`: a sweep over alignment keys trains SFT once. The reused stage equals training it
    again (the same weights, so the same aligned model); another SFT setting or seed trains its own."""
    first = train.run(make_cfg("loss=dpo", "sft.reuse=true"), tmp_path / "first")
    reused = train.run(make_cfg("loss=rpo", "sft.reuse=true", "align.batch_size=8"), tmp_path / "reused")  # alignment keys only
    assert "Stage sft: the same SFT (model, data, SFT settings, seed) finished in" in capsys.readouterr().out
    train.run(make_cfg("loss=rpo", "sft.reuse=false", "align.batch_size=8"), tmp_path / "trained")
    assert reused["stages"]["sft"] == first["stages"]["sft"]
    for stage in ("sft", "align"):
        reused_weights = load_file(tmp_path / "reused" / stage / "final" / "model.safetensors")
        trained_weights = load_file(tmp_path / "trained" / stage / "final" / "model.safetensors")
        assert all(torch.equal(reused_weights[k], trained_weights[k]) for k in trained_weights), stage
    first_model, reused_model = (tmp_path / name / "sft" / "final" / "model.safetensors" for name in ("first", "reused"))
    assert reused_model.stat().st_ino == first_model.stat().st_ino  # a hard link, not a copy
    sft_lines = [line for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines() if '"stage": "sft"' in line]
    assert (tmp_path / "reused" / "metrics.jsonl").read_text().splitlines()[: len(sft_lines)] == sft_lines
    train.run(make_cfg("loss=dpo", "sft.reuse=true", "align.max_examples=8", "train.save_every=4"), tmp_path / "saving")
    assert "Stage sft: the same SFT" in capsys.readouterr().out  # how often a run checkpoints changes nothing it computes
    for overrides in (["seed=1"], ["sft.lr=2e-3"], ["sft.batch_size=8"]):
        train.run(make_cfg("loss=dpo", "sft.reuse=true", "align.max_examples=8", *overrides), tmp_path / overrides[0])
        assert "Stage sft: the same SFT" not in capsys.readouterr().out, overrides
    first_model.unlink()  # the recorded model no longer verifies; the run that linked it keeps its own
    key = "model.embed_tokens.weight"
    assert torch.equal(load_file(reused_model)[key], load_file(tmp_path / "trained" / "sft" / "final" / "model.safetensors")[key])
    train.run(make_cfg("loss=ipo", "sft.reuse=true", "align.max_examples=8"), tmp_path / "after_change")
    assert "is gone or changed; training SFT" in capsys.readouterr().out
