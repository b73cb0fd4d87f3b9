"""A real training run interrupted at several moments, through the CLI, and continued each time
with `resume=true`: SIGKILL during SFT, SIGKILL in the middle of writing a checkpoint, SIGTERM
(a scheduler's pre-emption: checkpoint, exit 75), and a corrupted checkpoint (refused, the previous
one used), the last resumption with another `train.save_every`. The final weights and metrics equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_trainer import DROPOUT, without_timing

ARGUMENTS = ["model=tiny", "loss=dpo", DROPOUT, "train.batch_size=4", "sft.max_examples=16", "align.max_examples=160",
             "train.save_every=16", "train.eval_every=100000", "train.max_eval_examples=4",
             "eval.after_training=none", "sft.reuse=false"]  # each run its own SFT, to interrupt and resume

WAIT_BEFORE_RESUME = 3  # seconds


def stamp(seconds_since_epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds_since_epoch))


def seconds(state_stamp: str) -> float:
    return time.mktime(time.strptime(state_stamp, "%Y-%m-%dT%H:%M:%S"))


def command(runs: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *ARGUMENTS, f"runs_root={runs}", f"cache_dir={cache}", *extra]


def interrupt(arguments: list[str], ready, how: signal.Signals, poll: float = 0.002) -> subprocess.CompletedProcess:
    """Start a run, send `how` once `ready()` holds (checked every `poll` seconds), wait for it."""
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ready() and process.poll() is None:
        time.sleep(poll)
    assert process.poll() is None, "the run ended before the moment to interrupt it"
    process.send_signal(how)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(arguments, process.returncode, stdout, stderr)


def newer_than(path_glob, root: Path, started: float):
    return lambda: any(path.stat().st_mtime > started for path in root.glob(path_glob) if path.exists())


def test_interrupted_at_several_moments_then_resumed_ends_as_an_uninterrupted_run(tmp_path, shared_cache):
    straight = subprocess.run(command(tmp_path / "straight", shared_cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    runs = tmp_path / "runs"

    killed = interrupt(command(runs, shared_cache), lambda: any(runs.glob("*/*/sft/checkpoint/trainer_state.pt")), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = [path.parent for path in runs.glob("*/*/config.yaml")]
    first_state = json.loads((run_dir / "state.json").read_text())
    first_checkpoint = stamp(next(run_dir.glob("sft/checkpoint/trainer_state.pt")).stat().st_mtime)
    assert first_state["state"] == "running"  # killed: never recorded an end

    resume = command(runs, shared_cache, "resume=true")
    during_write = interrupt(resume, lambda: (run_dir / "align" / "checkpoint.tmp").exists(), signal.SIGKILL, poll=0.0005)
    assert during_write.returncode == -signal.SIGKILL and "Resuming sft from" in during_write.stdout

    started = time.time()  # stopped once this launch has written two checkpoints: a stop right after the first would save none
    stopped = interrupt(resume, newer_than("align/checkpoint.previous/trainer_state.pt", run_dir, started), signal.SIGTERM)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "SIGTERM received: align stopped after step" in stopped.stderr and "continue with resume=true" in stopped.stderr
    assert json.loads((run_dir / "state.json").read_text())["state"] == "stopped"
    assert (run_dir / "align" / "checkpoint.previous").exists()

    weights = run_dir / "align" / "checkpoint" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(damaged))
    # a later start of the same config that failed before saving anything: nothing to continue there
    failed_start = run_dir.with_name("9999-12-31_23-59-59")
    failed_start.mkdir()
    shutil.copy(run_dir / "config.yaml", failed_start / "config.yaml")
    time.sleep(WAIT_BEFORE_RESUME)  # as a preempted job waits in the queue: not part of the run's time
    # checkpointing more often from here: how often a run saves is not part of what it computes
    finished = subprocess.run([*resume, "train.save_every=32"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"Resuming the run in {run_dir}" in finished.stdout
    assert "checkpoint refused" in finished.stdout and "model.safetensors does not match its checksum" in finished.stdout
    assert "resuming from the previous checkpoint" in finished.stdout
    assert len(list((run_dir / "align").glob("checkpoint.corrupt-*"))) == 1  # kept aside, not deleted
    assert sorted(runs.glob("*/*")) == [run_dir, failed_start]  # the resuming launches left no folders of their own
    final_state = json.loads((run_dir / "state.json").read_text())
    assert final_state["state"] == "finished"
    assert final_state["started"] == first_state["started"] == final_state["launches"][0][0]
    # four launches, the killed ones counted up to the last work they saved, the wait before the last one not at all
    checkpointed = first_state["launches"][0][1]
    assert checkpointed == first_state["updated"] and checkpointed >= first_checkpoint
    assert [launch[0] for launch in final_state["launches"][1:]] == sorted(launch[0] for launch in final_state["launches"][1:])
    assert len(final_state["launches"]) == 4
    ran = sum(seconds(end) - seconds(start) for start, end in final_state["launches"])
    assert ran <= seconds(final_state["updated"]) - seconds(final_state["started"]) - (WAIT_BEFORE_RESUME - 1)

    (straight_dir,) = [path.parent for path in (tmp_path / "straight").glob("*/*/config.yaml")]
    for stage in ("sft", "align"):
        expected = load_file(straight_dir / stage / "final" / "model.safetensors")
        final = load_file(run_dir / stage / "final" / "model.safetensors")
        assert all(expected[key].equal(final[key]) for key in expected), stage
    assert without_timing(run_dir / "metrics.jsonl") == without_timing(straight_dir / "metrics.jsonl")


def test_a_stray_output_folder_removed_by_another_process_is_no_error(tmp_path, monkeypatch):
    """Under torchrun two processes can hold the same Hydra output folder (their clocks named it in
    the same second) and both discard it when it is not the run's: the second finds it gone."""
    import train

    stray = tmp_path / "runs" / "dpo_tiny" / "2026-12-03_09-06-35"
    (stray / ".hydra").mkdir(parents=True)

    def removed_meanwhile(folder):
        shutil.rmtree(stray)
        raise FileNotFoundError(2, "No such file or directory", str(folder))

    monkeypatch.setattr(Path, "iterdir", removed_meanwhile)
    train.discard_stray_output(stray, tmp_path / "runs" / "dpo_tiny" / "2026-12-03_09-00-00")
    assert not stray.exists()


def test_a_stop_during_the_reference_pass_ends_the_run_at_once(tmp_path, fresh_cache):
    """SIGTERM while a stage computes its reference log-probs, which are kept only once the whole
    pass ends: the run stops at once (not after the pass and a first step), says so, and is `stopped`."""
    arguments = [sys.executable, "train.py", "model=tiny", "loss=dpo", "sft.enabled=false", "datasets=[hh]",
                 "datasets.hh.path=../shared/data/hh-rlhf", "datasets.hh.subsets=[helpful-base]", "datasets.hh.max_train_examples=2000",
                 "train.eval_batch_size=1", "eval.after_training=none", f"runs_root={tmp_path / 'runs'}", f"cache_dir={fresh_cache}"]
    process = subprocess.Popen(arguments, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"reference log-probs (train)" not in seen:  # its progress bar: the pass has begun
        chunk = process.stderr.read1(4096)
        assert chunk, f"the run ended before its reference pass: {seen[-2000:]!r}"
        seen += chunk
    process.send_signal(signal.SIGTERM)
    stderr = (seen + process.stderr.read()).decode()
    assert process.wait(timeout=600) == 75, stderr[-2000:]
    assert "SIGTERM received during the reference log-probs (train) pass: align stopped before its first step" in stderr
    (state,) = (tmp_path / "runs").glob("*/*/state.json")
    assert json.loads(state.read_text())["state"] == "stopped"
    assert not list((fresh_cache / "reference_logps").glob("*.pt"))
