"""FSDPTrainer on CPU with 2 gloo processes against BasicTrainer on the same global batch.

Tolerance: float32 rounding only. Each process pads its own half of a batch, so the matrix
products differ in shape from one process's. Summed log-probs (order 100) then agree to about
1e-5 absolute, so rewards (beta times their differences), losses and gradient norms are compared
to 1e-5 (relative and absolute), and weights after three SGD steps (lr 0.5, updates of order
1e-2) to 1e-5 relative plus 5e-6 absolute.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train
from tests.conftest import ROOT, build
from tests.distributed import spawn
from tests.test_trainer import Interrupt, without_timing
from trainers.basic import BasicTrainer, load_weights
from trainers.fsdp import FSDPTrainer
from utils import ConfigError, is_main_process

STEPS = 3
# SGD: the update is the gradient itself, so the comparison sees the loss's gradient directly.
STEP_OVERRIDES = ["train.batch_size=8", "train.optimizer=sgd", "align.lr=0.5", "align.warmup_steps=0"]
CASES = {  # name: (overrides, the BasicTrainer overrides it must equal)
    "dpo, 2 micro-batches": (["loss=dpo", "train.gradient_accumulation_steps=2"], ["loss=dpo", "train.gradient_accumulation_steps=2"]),
    "dpo, activation checkpointing": (["loss=dpo", "fsdp.activation_checkpointing=true"], ["loss=dpo"]),
    "ipo, sharded live reference": (["loss=ipo", "reference.precompute=false"], ["loss=ipo"]),
    # one contrast group of 8 pairs (the preset's) across both processes: gradient caching over the gathered log-probs
    "rpo + sr, a group across processes": (["loss=rpo", "loss.sr_lambda=0.5"], ["loss=rpo", "loss.sr_lambda=0.5"]),
    # groups of 4: one whole group per process, one pass
    "rpo + sr, a group per process": (
        ["loss=rpo", "loss.sr_lambda=0.5", "loss.contrast_group=4"],
        ["loss=rpo", "loss.sr_lambda=0.5", "loss.contrast_group=4"],
    ),
    # one matrix over 16 unpaired responses in 2 micro-batches x 2 processes
    "rpo_unpaired, the whole batch in 4 parts": (
        ["loss=rpo_unpaired", "loss.contrast_group=null", "train.batch_size=16", "train.gradient_accumulation_steps=2"],
        ["loss=rpo_unpaired", "loss.contrast_group=null", "train.batch_size=16"],
    ),
    # 5 desirable and 5 undesirable responses: 3 + 2 on one process, 2 + 3 on the other
    "kto, uneven sides": (["loss=kto", "train.batch_size=10"], ["loss=kto", "train.batch_size=10"]),
}


def steps_job(configs: dict, folder: Path) -> None:
    """Per config: a fresh FSDP trainer, STEPS optimizer steps, then its records and full weights."""
    results = {}
    for name, cfg in configs.items():
        counted = {"batches": 0}
        original = FSDPTrainer.pair_logps

        def counting(self, model, batch, original=original, counted=counted):
            counted["batches"] += 1
            return original(self, model, batch)

        FSDPTrainer.pair_logps = counting  # construction computes the reference log-probs
        trainer = build(cfg, folder / name.replace(" ", "_"))
        FSDPTrainer.pair_logps = original
        records = [trainer.train_step(trainer.sampler.take(cfg.train.batch_size)) for _ in range(STEPS)]
        results[name] = {
            "records": records,
            "weights": trainer.exported_state(final=True),
            "reference": trainer.reference_logps,
            "reference_batches": counted["batches"],
            "contrast_path": trainer.contrast_path,
        }
    if is_main_process():
        torch.save(results, folder / "results.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, converted_models):
    """The CASES under FSDP with 2 processes, each with its own fresh cache (sharded computation)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import TINY_OVERRIDES, cache_with_models

    folder = tmp_path_factory.mktemp("fsdp")
    cache_with_models(folder / "cache", converted_models)
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        configs = {
            name: compose(
                "config", overrides=[*TINY_OVERRIDES, *STEP_OVERRIDES, "trainer=fsdp", f"cache_dir={folder / 'cache'}", *fsdp]
            )
            for name, (fsdp, _) in CASES.items()
        }
    spawn(steps_job, 2, configs, folder)
    return torch.load(folder / "results.pt", weights_only=False)


def basic_steps(make_cfg, tmp_path, overrides):
    """BasicTrainer's records and its weights before and after STEPS steps."""
    trainer = build(make_cfg(*STEP_OVERRIDES, *overrides), tmp_path)
    initial = {key: value.clone() for key, value in trainer.policy.state_dict().items()}
    records = [trainer.train_step(trainer.sampler.take(trainer.cfg.train.batch_size)) for _ in range(STEPS)]
    return records, initial, trainer.policy.state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_steps_equal_one_process_on_the_global_batch(fsdp_results, make_cfg, tmp_path, case):
    records, initial, weights = basic_steps(make_cfg, tmp_path, CASES[case][1])
    result = fsdp_results[case]
    for expected, got in zip(records, result["records"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "grad_norm", "logps/chosen", "tokens"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
    assert records[-1]["rewards/chosen"] != 0  # the policy moved away from the reference
    assert result["weights"].keys() <= weights.keys()
    for key, value in result["weights"].items():
        torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=5e-6)
    assert max((weights[key] - initial[key]).abs().max() for key in weights) > 1e-3  # updates far above the tolerance


def test_groups_that_span_processes_are_cached_and_groups_within_one_are_not(fsdp_results):
    assert fsdp_results["rpo + sr, a group across processes"]["contrast_path"] == "gradient_caching"
    assert fsdp_results["rpo_unpaired, the whole batch in 4 parts"]["contrast_path"] == "gradient_caching"
    assert fsdp_results["rpo + sr, a group per process"]["contrast_path"] == "one_pass"
    # and the group size matters: two groups of 4 are another loss than one of 8
    across, within = fsdp_results["rpo + sr, a group across processes"], fsdp_results["rpo + sr, a group per process"]
    assert max((across["weights"][k] - within["weights"][k]).abs().max() for k in across["weights"]) > 1e-4
    assert within["records"][-1]["loss"] != pytest.approx(across["records"][-1]["loss"], rel=1e-4)


def test_reference_log_probs_are_computed_sharded_and_merged(fsdp_results, make_cfg, tmp_path, fresh_cache):
    basic = build(make_cfg(*STEP_OVERRIDES, "loss=dpo", f"cache_dir={fresh_cache}"), tmp_path)
    merged = fsdp_results["dpo, 2 micro-batches"]["reference"]
    for split in ("train", "test"):
        torch.testing.assert_close(merged[split], basic.reference_logps[split], rtol=1e-6, atol=1e-5)
    size = basic.cfg.train.eval_batch_size
    batches = sum(math.ceil(len(examples) / size) for examples in (basic.train_set, basic.test_set))
    assert fsdp_results["dpo, 2 micro-batches"]["reference_batches"] == sum(
        math.ceil(math.ceil(len(examples) / size) / 2) for examples in (basic.train_set, basic.test_set)
    ) < batches  # each process ran its half (rounded up), not all of them


def resume_job(cfg, folder: Path) -> None:
    """A straight run, a run interrupted after 3 alignment steps, and its resumption, as the
    launcher would run them (rank 1's Hydra directory named by its own clock)."""
    rank_dir = "" if is_main_process() else "_rank1"
    (folder / f"straight{rank_dir}" / ".hydra").mkdir(parents=True, exist_ok=True)
    train.run(cfg, folder / f"straight{rank_dir}")
    original, executed = BasicTrainer.train_step, {"align": 0}

    def interrupted(self, indices):
        executed["align"] += self.stage == "align"
        if executed["align"] > 3:
            raise Interrupt
        return original(self, indices)

    FSDPTrainer.train_step = interrupted
    try:
        with pytest.raises(Interrupt):
            train.run(cfg, folder / "killed")
    finally:
        del FSDPTrainer.train_step
    checkpoint = sorted(str(path.relative_to(folder)) for path in (folder / "killed" / "align" / "checkpoint").rglob("*"))
    if is_main_process():
        shutil.copytree(folder / "killed", folder / "killed_copy")  # resumed by one process later
    executed = {"align": 0}

    def counted(self, indices):
        executed["align"] += 1
        return original(self, indices)

    FSDPTrainer.train_step = counted
    try:
        train.run(OmegaConf.merge(cfg, {"resume": str(folder / "killed")}), folder / f"unused{rank_dir}")
    finally:
        del FSDPTrainer.train_step
    if is_main_process():
        (folder / "job.json").write_text(json.dumps({"executed": executed, "checkpoint": checkpoint}))


def resume_alone_job(cfg, folder: Path) -> None:
    train.run(OmegaConf.merge(cfg, {"resume": str(folder / "killed_copy")}), folder / "unused_alone")


def test_fsdp_run_resumes_exactly_and_writes_hugging_face_models(make_cfg, tmp_path):
    # SGD: RMSprop would amplify the rounding differences of a resharded resumption (below)
    cfg = make_cfg("trainer=fsdp", "loss=dpo", "train.optimizer=sgd", "sft.lr=0.5", "align.lr=0.5")
    spawn(resume_job, 2, cfg, tmp_path)
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["executed"] == {"align": 4}  # 6 steps, checkpoint after 2 and 4, interrupted in the 4th
    # the HF model and the trainer state, plus one shard of the fp32 state per process
    files = {Path(name).relative_to("killed/align/checkpoint").as_posix() for name in job["checkpoint"]}
    assert {"model.safetensors", "trainer_state.pt", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= files
    straight = load_file(tmp_path / "straight" / "align" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "align" / "final" / "model.safetensors")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert without_timing(tmp_path / "killed" / "metrics.jsonl") == without_timing(tmp_path / "straight" / "metrics.jsonl")
    assert not (tmp_path / "straight_rank1").exists()  # rank 1's stray Hydra directory was removed
    assert json.loads((tmp_path / "straight" / "summary.json").read_text())["logp_accuracy"].keys() == {"start", "after sft", "after align"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "align" / "final")
    fresh = train.load_policy(make_cfg("seed=1"), train.load_tokenizer(cfg))
    load_weights(fresh, tmp_path / "straight" / "align" / "final")  # what BasicTrainer resumes from
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    # the same checkpoint resumed by one process: the distributed checkpoint is resharded, and the
    # result equals the 2-process run to float rounding (each process pads its own half-batches)
    spawn(resume_alone_job, 1, cfg, tmp_path)
    alone = load_file(tmp_path / "killed_copy" / "align" / "final" / "model.safetensors")
    sft = load_file(tmp_path / "straight" / "sft" / "final" / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(alone[key], straight[key], rtol=1e-5, atol=1e-6)
    assert max((straight[key] - sft[key]).abs().max() for key in straight) > 1e-4  # alignment moved the weights


def torchrun_command(tmp_path, cache, *overrides) -> list[str]:
    """`torchrun --nproc_per_node 2 train.py trainer=fsdp ...` on CPU, with the tests' small schedule."""
    from tests.conftest import TINY_OVERRIDES

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", "trainer=fsdp"]
    return command + [*TINY_OVERRIDES, f"runs_root={tmp_path / 'runs'}", f"cache_dir={cache}", *overrides]


def torchrun(tmp_path, cache, *overrides) -> subprocess.CompletedProcess:
    command = torchrun_command(tmp_path, cache, *overrides)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def failure_report(result: subprocess.CompletedProcess) -> str:
    """The processes' stderr without progress bars, head and tail (a crash report can be long)."""
    lines = [line for line in result.stderr.splitlines() if "it/s]" not in line and "ex/s]" not in line]
    return "\n".join(lines[:60] + ["..."] + lines[-60:])


def test_torchrun_rpo_end_to_end(tmp_path, shared_cache):
    result = torchrun(tmp_path, shared_cache, "loss=rpo")
    assert result.returncode == 0, failure_report(result)
    assert result.stdout.count("Final model:") == 1  # reports from rank 0 only
    (run_dir,) = [path.parent for path in (tmp_path / "runs").glob("**/summary.json")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["stage"] == "align" and "loss" in r]) == 24 // 4  # each step logged once
    assert AutoModelForCausalLM.from_pretrained(run_dir / "align" / "final").config.num_hidden_layers == 2


def test_torchrun_uneven_batch_fails_at_start_up_on_every_rank(tmp_path, shared_cache):
    result = torchrun(tmp_path, shared_cache, "loss=dpo", "train.batch_size=5")
    assert result.returncode != 0
    message = "train.batch_size=5 cannot be split evenly over 2 processes x 1 micro-batches"
    assert f"[rank 0 of 2] ConfigError: {message}" in result.stderr
    assert f"[rank 1 of 2] ConfigError: {message}" in result.stderr
    assert not list((tmp_path / "runs").glob("**/sft/checkpoint"))  # nothing trained


def test_torchrun_sigterm_stops_every_rank_at_one_step_then_resumes(tmp_path, shared_cache):
    """A scheduler's SIGTERM reaches torchrun, which passes it to its processes: they agree on the
    step to stop after (a collective), write one checkpoint together and exit 75; resume=true
    under torchrun continues from it to the end."""
    from tests.test_interruptions import interrupt

    overrides = ["loss=dpo", "align.max_examples=96"]
    runs = tmp_path / "runs"
    command = torchrun_command(tmp_path, shared_cache, *overrides)
    stopped = interrupt(command, lambda: any(runs.glob("*/*/align/checkpoint/checksums.json")), signal.SIGTERM, poll=0.01)
    (run_dir,) = [path.parent for path in runs.glob("*/*/state.json")]
    assert json.loads((run_dir / "state.json").read_text())["state"] == "stopped", failure_report(stopped)
    steps = set(re.findall(r"\[rank [01] of 2\] Stopped: SIGTERM received: align stopped after step (\d+)", stopped.stderr))
    assert len(steps) == 1 and int(steps.pop()) < 96 // 4, failure_report(stopped)  # both ranks, the same step, before the end
    resumed = torchrun(tmp_path, shared_cache, *overrides, "resume=true")
    assert resumed.returncode == 0, failure_report(resumed)
    assert "Resuming align from" in resumed.stdout
    assert json.loads((run_dir / "state.json").read_text())["state"] == "finished"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "align" and "loss" in r] == list(range(1, 96 // 4 + 1))


def test_fsdp_refuses_an_unknown_block_name(make_cfg, tmp_path):
    spawn(block_name_job, 1, make_cfg("trainer=fsdp", "model.block_name=Nope"), tmp_path)


def block_name_job(cfg, folder: Path) -> None:
    with pytest.raises(ConfigError, match="model.block_name=Nope: LlamaForCausalLM has no such module .it has LlamaDecoderLayer"):
        build(cfg, folder, stage="sft")
