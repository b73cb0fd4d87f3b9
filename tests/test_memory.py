"""`train.micro_batch_size: auto`: the chooser, its probes, the out-of-memory retry, and bad settings."""

from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import train
import trainers.basic
import trainers.memory
from tests.conftest import ROOT, build
from tests.test_trainer import DROPOUT, Interrupt, interrupt_after
from trainers.basic import BasicTrainer
from trainers.memory import GB, fit_line, fitted_micro_batch, optimizer_state_bytes

HELD, FIXED, PER_EXAMPLE = 4 * GB, 0.5 * GB, 0.25 * GB  # the fake probes: 4 GB held, a step adds 0.5 GB + 0.25 GB per example


@pytest.fixture
def linear_probe(monkeypatch):
    """Probes that run for real (so that they could disturb the run) but report a known memory
    line, `HELD + FIXED + PER_EXAMPLE * k`; the sizes probed are recorded."""
    probed = []
    original = BasicTrainer.probe_peak

    def probe_peak(self, indices):
        assert original(self, indices) is not None
        probed.append(len(indices))
        return int(HELD + FIXED + PER_EXAMPLE * len(indices))

    monkeypatch.setattr(BasicTrainer, "probe_peak", probe_peak)
    monkeypatch.setattr(trainers.basic, "in_use", lambda device: HELD)
    return probed


@pytest.fixture(scope="session")
def optimizer_bytes(tmp_path_factory, shared_cache) -> int:
    """RMSprop's state for `tiny`, which every budget below has to leave room for."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["model=tiny", f"cache_dir={shared_cache}"])
    policy = train.load_policy(cfg, train.load_tokenizer(cfg))
    return optimizer_state_bytes(cfg.train.optimizer, policy.parameters())


def budget_for(examples: int, optimizer_bytes: int) -> str:
    """A memory budget (GB) that fits `examples` per micro-batch and not one more."""
    return str((HELD + FIXED + optimizer_bytes + PER_EXAMPLE * (examples + 0.5)) / GB)


def final_weights(run_dir):
    return load_file(run_dir / "align" / "final" / "model.safetensors")


@pytest.mark.parametrize(("loss", "fits", "batch", "steps"), [("dpo", 3, 7, 3), ("dpo", 7, 7, 1), ("kto", 4, 9, 3), ("sft", 2, 5, 3)])
def test_a_budget_that_fits_k_examples_gives_micro_batch_k(make_cfg, tmp_path, linear_probe, optimizer_bytes, loss, fits, batch, steps):
    stage = "sft" if loss == "sft" else "align"
    cfg = make_cfg(f"loss={loss}", f"train.batch_size={batch}", f"train.memory_budget={budget_for(fits, optimizer_bytes)}")
    trainer = build(cfg, tmp_path / "run", stage)
    plan = trainer.micro_batches()
    assert (plan.micro_batch, plan.accumulation_steps) == (fits, steps)
    assert linear_probe == ([2, 8] if loss == "kto" else [1, 4])  # kto: a micro-batch needs both sides
    assert plan.estimate_gb == pytest.approx(plan.base_gb + fits * 0.25, abs=0.01)
    assert plan.base_gb == pytest.approx((HELD + FIXED + optimizer_bytes) / GB, abs=0.01)
    indices = trainer.sampler.take(batch)
    parts = trainer.split_sides(indices, trainer.micro_batch_count(batch))
    assert max(map(len, parts)) == fits and sum(map(len, parts)) == batch
    # a last, partial batch of 5 runs in as few micro-batches of at most `fits` as hold it
    partial = trainer.split_sides(trainer.sampler.take(5), trainer.micro_batch_count(5))
    assert len(partial) == math.ceil(5 / fits) and max(map(len, partial)) <= fits


def test_the_fitted_micro_batch_trains_like_the_same_explicit_one(make_cfg, tmp_path, linear_probe, optimizer_bytes):
    """The probes run forward and backward passes with dropout: the run must not see them."""
    overrides = [DROPOUT, "loss=dpo", "train.batch_size=7"]
    fitted = make_cfg(*overrides, f"train.memory_budget={budget_for(3, optimizer_bytes)}")
    summary = train.run(fitted, tmp_path / "fitted")
    assert {stage: result["micro_batches"]["micro_batch"] for stage, result in summary["stages"].items()} == {"sft": 3, "align": 3}
    train.run(make_cfg(*overrides, "train.micro_batch_size=3"), tmp_path / "explicit")
    auto, explicit = final_weights(tmp_path / "fitted"), final_weights(tmp_path / "explicit")
    assert all(torch.equal(auto[key], explicit[key]) for key in auto)


def test_one_probe_when_the_whole_batch_clearly_fits(make_cfg, tmp_path, linear_probe, capsys):
    """4 GB held and 0.75 GB added by one example: 7 examples need at most 9.25 GB (an upper bound,
    said so: the step's fixed 0.5 GB is counted once per example)."""
    plan = build(make_cfg("loss=dpo", "train.batch_size=7", "train.memory_budget=9.3"), tmp_path).micro_batches()
    assert (plan.micro_batch, plan.accumulation_steps, linear_probe) == (7, 1, [1])
    assert plan.as_dict()["estimate_is_upper_bound"]  # result.json says so too, not only the log
    assert "estimated peak at most 9.2" in capsys.readouterr().out
    plan = build(make_cfg("loss=dpo", "train.batch_size=7", "train.memory_budget=9.2"), tmp_path / "tighter").micro_batches()
    assert linear_probe == [1, 1, 4] and plan.micro_batch == 7 and not plan.estimate_is_upper_bound  # the line says it fits
    assert "estimated peak 6.2" in capsys.readouterr().out  # 4 + 0.5 + 0.25 * 7: the line through both probes


def test_a_second_probe_out_of_memory_gives_micro_batch_one(make_cfg, tmp_path, monkeypatch):
    original = BasicTrainer.batch_loss

    def batch_loss(self, batch, split, groups=None):
        if len(batch["index"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch, split, groups)

    monkeypatch.setattr(BasicTrainer, "batch_loss", batch_loss)
    # nothing held before the probe: its whole peak counts per example, so 5 examples do not clearly fit
    monkeypatch.setattr(trainers.basic, "in_use", lambda device: 0)
    budget = 3 * trainers.memory.in_use(torch.device("cpu")) / GB
    plan = build(make_cfg("loss=dpo", "train.batch_size=5", f"train.memory_budget={budget}"), tmp_path).micro_batches()
    assert (plan.micro_batch, plan.accumulation_steps) == (1, 5)


def test_out_of_memory_in_the_first_steps_halves_the_micro_batch(make_cfg, tmp_path, linear_probe, optimizer_bytes, monkeypatch):
    """Fitted to the whole batch of 8, a step runs out of memory above 3 examples: retried at 4, then 2."""
    overrides = [DROPOUT, "loss=dpo", "train.batch_size=8", "sft.enabled=false"]
    original = BasicTrainer.batch_loss

    def batch_loss(self, batch, split, groups=None):
        result = original(self, batch, split, groups)  # the forward draws its dropout masks before memory runs out
        if self.plan is not None and split == "train" and len(batch["index"]) > 3:  # training steps, not the probes
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return result

    with monkeypatch.context() as patch:
        patch.setattr(BasicTrainer, "batch_loss", batch_loss)
        summary = train.run(make_cfg(*overrides, f"train.memory_budget={budget_for(8, optimizer_bytes)}"), tmp_path / "fitted")
    assert summary["stages"]["align"]["micro_batches"]["micro_batch"] == 2
    train.run(make_cfg(*overrides, "train.micro_batch_size=2"), tmp_path / "explicit")
    fitted, explicit = final_weights(tmp_path / "fitted"), final_weights(tmp_path / "explicit")
    assert all(torch.equal(fitted[key], explicit[key]) for key in fitted)


def test_out_of_memory_with_a_configured_micro_batch_is_raised(make_cfg, tmp_path, monkeypatch):
    def batch_loss(self, batch, split, groups=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer = build(make_cfg("loss=dpo", "train.micro_batch_size=4"), tmp_path)
    monkeypatch.setattr(BasicTrainer, "batch_loss", batch_loss)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fitted_train_step(trainer.sampler.take(4))


def test_resume_keeps_the_micro_batch_the_run_fitted(make_cfg, tmp_path, linear_probe, optimizer_bytes, monkeypatch):
    overrides = ["loss=dpo", "train.batch_size=6", "sft.enabled=false", "train.save_every=6"]
    with monkeypatch.context() as patch:
        interrupt_after(patch, "align", 2)
        with pytest.raises(Interrupt):
            train.run(make_cfg(*overrides, f"train.memory_budget={budget_for(2, optimizer_bytes)}"), tmp_path / "run")
    del linear_probe[:]
    # a machine with more memory: the same run continues with its own micro-batches, without probing
    resumed = make_cfg(*overrides, f"train.memory_budget={budget_for(2, optimizer_bytes)}", f"resume={tmp_path / 'run'}")
    summary = train.run(resumed, tmp_path / "x")
    assert summary["stages"]["align"]["micro_batches"]["micro_batch"] == 2
    assert linear_probe == []


def test_fit_arithmetic():
    assert fit_line([(1, 300), (2, 500)]) == (100, 200)
    assert fit_line([(2, 500), (4, 400)]) == (500, 0.0)  # noise that says memory shrinks: flat
    assert fitted_micro_batch(base=100, per_example=200, budget=1000, largest=64) == 4
    assert fitted_micro_batch(base=100, per_example=200, budget=1000, largest=3) == 3
    assert fitted_micro_batch(base=100, per_example=0.0, budget=1000, largest=64) == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.micro_batch_size=0", "train.micro_batch_size=0: give a whole number of at least 1 or auto"),
        ("train.micro_batch_size=big", "train.micro_batch_size='big': give a whole number of at least 1 or auto"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0: give a whole number of at least 1"),
        ("train.batch_size=0", "train.batch_size=0: give a whole number of at least 1"),
        ("train.memory_budget=-2", "train.memory_budget=-2: give gigabytes"),
    ],
)
def test_bad_micro_batch_settings_are_refused_at_start_up(make_cfg, tmp_path, override, message):
    with pytest.raises(train.ConfigError, match=message):
        train.run(make_cfg(override), tmp_path / "run")
    assert not (tmp_path / "run" / "sft").exists()


def test_accumulation_and_micro_batch_size_together_are_refused(make_cfg, tmp_path):
    cfg = make_cfg("train.micro_batch_size=2", "train.gradient_accumulation_steps=2")
    with pytest.raises(train.ConfigError, match="both size the micro-batches: set one"):
        train.run(cfg, tmp_path / "run")


def test_cli_a_step_that_cannot_fit_fails_at_start_up_with_the_estimate(tmp_path, shared_cache):
    """Through the real CLI: a budget below what the process already holds leaves no room for a
    step. The probe runs under that allocation limit, fails, and the run stops with the reason and
    what to change, never killed and before any training."""
    command = [sys.executable, str(ROOT / "train.py"), "model=tiny", "loss=dpo", "train.batch_size=4", "sft.max_examples=4",
               "train.memory_budget=0.2", f"runs_root={tmp_path}", f"cache_dir={shared_cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not fit in train.memory_budget=0.2 (0.2 GB on cpu)" in result.stderr
    assert "Lower max_length, use model.dtype=bfloat16" in result.stderr
    assert not (tmp_path / "run" / "sft" / "checkpoint").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_plan_is_logged_in_the_stage_result(make_cfg, tmp_path):
    summary = train.run(make_cfg("loss=dpo"), tmp_path / "run")
    for stage in ("sft", "align"):
        saved = json.loads((tmp_path / "run" / stage / "final" / "result.json").read_text())["micro_batches"]
        assert saved == summary["stages"][stage]["micro_batches"]
        assert saved["micro_batch"] == 4 and saved["accumulation_steps"] == 1  # tiny: the whole batch fits
        assert 0 < saved["estimate_gb"] <= saved["budget_gb"]


class MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): hblkhd is the bytes held in mmapped blocks."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_a_cpu_trainer_serves_large_tensors_from_the_heap(make_cfg, tmp_path):
    """Once a trainer runs on the CPU, a large tensor comes from glibc's heap, not from a fresh mmap
    (glibc's default over 32 MB, whose page faults every step would pay again). 1 GiB, never
    touched: larger than any free stretch the heap could already hold."""
    mallinfo2 = trainers.memory.LIBC.mallinfo2
    mallinfo2.restype = MallocInfo
    build(make_cfg("sft.enabled=false"), tmp_path)
    mapped = mallinfo2().hblkhd
    block = torch.empty(2**28)
    assert mallinfo2().hblkhd == mapped and block.numel() == 2**28


def block_forwards(trainer: BasicTrainer, indices: list[int]) -> int:
    """How many times the policy's transformer blocks run forward in one training step (counted at
    their attention: Hugging Face checkpoints a block's `forward`, so its own hooks fire once)."""
    calls = []
    blocks = [m for m in trainer.policy.modules() if type(m).__name__ == trainer.cfg.model.block_name]
    handles = [block.self_attn.register_forward_hook(lambda *unused: calls.append(1)) for block in blocks]
    try:
        trainer.train_step(indices)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


def test_activation_checkpointing_recomputes_each_block_and_trains_the_same(make_cfg, tmp_path):
    """`train.activation_checkpointing=true`: every block runs again in the backward pass (its
    activations were not kept), with the forward's dropout draws: the step's update is the same."""
    overrides = [DROPOUT, "loss=dpo", "train.micro_batch_size=4"]
    plain = build(make_cfg(*overrides), tmp_path / "plain")
    checkpointed = build(make_cfg(*overrides, "train.activation_checkpointing=true"), tmp_path / "checkpointed")
    before = {name: parameter.detach().clone() for name, parameter in plain.policy.named_parameters()}
    blocks = plain.cfg.model.random_init.num_hidden_layers
    torch.manual_seed(0)
    assert block_forwards(plain, [0, 1, 2, 3]) == blocks
    torch.manual_seed(0)  # the same dropout draws
    assert block_forwards(checkpointed, [0, 1, 2, 3]) == 2 * blocks
    expected, found = dict(plain.policy.named_parameters()), dict(checkpointed.policy.named_parameters())
    assert not all(torch.equal(before[name], expected[name]) for name in before)  # the step moved the weights
    assert all(torch.allclose(expected[name], found[name], rtol=0, atol=1e-6) for name in expected)


def write_files(folder, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def v2_level(limit: str, charged: int, cache: int) -> dict[str, str]:
    return {"memory.max": limit, "memory.current": str(charged), "memory.stat": f"anon {charged - cache}\ninactive_file {cache}\n"}


@pytest.mark.parametrize("namespaced", [False, True])
def test_cgroup_v2_limits_the_cpu_budget_at_its_tightest_level(tmp_path, monkeypatch, namespaced):
    """A SLURM job (or a container) of 8 GB on a host with 100 GB available: auto budgets from the
    job's room, not the host's. The tightest level counts (the job's, above the step's), page cache
    counts as room; inside a cgroup namespace the process's path names the host's tree, not the mount's."""
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup_of_self"
    write_files(root, {"cgroup.controllers": "cpu memory", "memory.stat": "anon 0\n"})  # the root has no memory.max
    job = root / "" if namespaced else root / "slurm" / "job_7"
    write_files(job, v2_level(str(int(8 * GB)), int(5 * GB), int(1 * GB)))  # room 8 - 5 + 1 = 4 GB
    if not namespaced:
        write_files(job / "step_0", v2_level("max", int(5 * GB), 0))
    proc.write_text("0::/slurm/job_7/step_0\n")
    monkeypatch.setattr(trainers.memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(trainers.memory, "PROC_CGROUP", proc)
    monkeypatch.setattr(trainers.memory, "_meminfo_kb", lambda field: int(100 * GB))
    assert trainers.memory.cgroup_room() == int(4 * GB)
    assert trainers.memory.free_memory(torch.device("cpu")) == int(4 * GB)
    write_files(job, {"memory.max": "max"})  # no limit anywhere: the host's MemAvailable
    assert trainers.memory.cgroup_room() is None
    assert trainers.memory.free_memory(torch.device("cpu")) == int(100 * GB)


def test_cgroup_v1_limits_the_cpu_budget_with_its_parents_limit(tmp_path, monkeypatch):
    """cgroup v1 (this machine's kind): memory.stat's hierarchical_memory_limit is the tightest of
    the cgroup's and its parents' limits; unreadable files leave the host's MemAvailable."""
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup_of_self"
    folder = root / "memory" / "job_7"
    write_files(folder, {"memory.stat": f"cache 9\nhierarchical_memory_limit {int(6 * GB)}\ntotal_inactive_file {int(0.5 * GB)}\n",
                         "memory.usage_in_bytes": str(int(3 * GB))})
    proc.write_text("5:devices:/job_7\n4:memory:/job_7\n0::/\n")
    monkeypatch.setattr(trainers.memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(trainers.memory, "PROC_CGROUP", proc)
    monkeypatch.setattr(trainers.memory, "_meminfo_kb", lambda field: int(100 * GB))
    assert trainers.memory.free_memory(torch.device("cpu")) == int(3.5 * GB)
    budget = trainers.memory.memory_budget("auto", torch.device("cpu"))
    assert budget == pytest.approx(trainers.memory.in_use(torch.device("cpu")) + 0.8 * 3.5 * GB, abs=0.05 * GB)
    write_files(folder, {"memory.stat": "hierarchical_memory_limit 9223372036854771712\n"})
    assert trainers.memory.cgroup_room() is None
    (folder / "memory.stat").write_text("not a stat file")
    assert trainers.memory.free_memory(torch.device("cpu")) == int(100 * GB)
