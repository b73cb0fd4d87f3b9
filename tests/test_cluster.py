"""Sweeps at cluster scale through the real CLI: Hydra's submitit launcher (its local executor
stands in for SLURM: the same job pickles, signals and requeueing), pre-emption, Optuna search,
and the SLURM launcher presets."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from checks import check_config
from tests.conftest import ROOT
from tests.test_readme import CLUSTER_COMMANDS, all_readme_commands
from utils import StopSignals

TINY = [
    "model=tiny",
    "sft.max_examples=16",
    "align.max_examples=24",
    "train.batch_size=4",
    "train.max_eval_examples=8",
    "sft.lr=1e-3",
    "align.lr=1e-3",
    "eval.after_training=none",
]


def train(*arguments: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *arguments], cwd=cwd, capture_output=True, text=True, timeout=900, **kwargs)


def job_logs(sweep: Path) -> str:
    """What every task of every submitit job printed (stdout and stderr)."""
    return "".join(path.read_text() for path in sorted((sweep / ".submitit").glob("*/*_log.*")))


def test_a_sweep_through_submitit_local_runs_each_job_and_ends_in_its_table(tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    done = train("-m", "hydra/launcher=submitit_local", "loss.beta=0.1,0.5", *TINY, f"runs_root={tmp_path}", f"cache_dir={shared_cache}",
                 f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    states = {path.parent.name: json.loads(path.read_text())["state"] for path in sweep.glob("*/state.json")}
    assert states == {"0_rpo_tiny": "finished", "1_rpo_tiny": "finished"}, job_logs(sweep)[-3000:]
    assert f"Sweep table: {sweep / 'table.md'}" in done.stdout
    with (sweep / "runs.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [row["state"] for row in rows] == ["finished", "finished"]
    assert sorted(row["overrides"].split()[0] for row in rows) == ["loss.beta=0.1", "loss.beta=0.5"]


def test_a_job_of_several_tasks_is_one_fsdp_group(tmp_path, shared_cache):
    """hydra.launcher.tasks_per_node=2 (a node's GPUs, on CPU here): both tasks join one process
    group, so each takes half of every batch."""
    sweep = tmp_path / "sweep"
    done = train("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "trainer=fsdp", *TINY,
                 f"runs_root={tmp_path}", f"cache_dir={shared_cache}", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    logs = job_logs(sweep)
    assert "global_rank=1(2)" in logs
    summary = json.loads((sweep / "0_rpo_tiny" / "summary.json").read_text())
    plan = summary["stages"]["align"]["micro_batches"]
    assert (plan["micro_batch"], plan["accumulation_steps"]) == (2, 1), logs[-3000:]  # 4 pairs = 2 processes x 2


def submitit_task(sweep: Path) -> int | None:
    """The pid of the process running the sweep's job (submitit's local controller starts it)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and any(str(sweep).encode() in part for part in command):
            return int(proc.name)
    return None


def align_steps(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return sum(1 for line in lines if '"stage": "align"' in line and '"loss"' in line)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc (Linux)")
def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_run(tmp_path, shared_cache):
    """submitit's warning (SIGUSR2) mid-alignment: the job checkpoints after its step, submitit
    requeues it, and the requeued job continues the same run folder to the same weights."""
    overrides = [*TINY, "align.max_examples=64", "train.save_every=null", f"runs_root={tmp_path}", f"cache_dir={shared_cache}"]
    sweep = tmp_path / "sweep"
    launch = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *overrides,
                               f"hydra.sweep.dir={sweep}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = sweep / "0_rpo_tiny"
    deadline = time.monotonic() + 600
    while align_steps(run) < 1 and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    task = submitit_task(sweep)
    assert task is not None and launch.poll() is None, "the job ended before it could be pre-empted"
    os.kill(task, signal.SIGUSR2)
    output, _ = launch.communicate(timeout=900)
    assert launch.returncode == 0, output[-3000:]
    logs = job_logs(sweep)
    assert "SIGUSR2 received: align stopped after step" in logs, logs[-3000:]
    assert "Requeued job" in logs
    assert json.loads((run / "state.json").read_text())["state"] == "finished"
    assert align_steps(run) == 64 // 4  # each step once: the requeued job continued, it did not start again

    plain = train(*overrides, f"hydra.run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed, uninterrupted = (load_file(folder / "align" / "final" / "model.safetensors") for folder in (run, tmp_path / "plain"))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[key] == uninterrupted[key]).all() for key in resumed)


def test_an_optuna_search_runs_its_trials_and_reports_the_best(tmp_path, shared_cache):
    """hydra/sweeper=search_rpo: each trial's value is what train.py returns, its `objective` (here
    the held-out margin, a number no two trials share)."""
    sweep = tmp_path / "sweep"
    done = train("-m", "hydra/sweeper=search_rpo", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3", "loss.contrast_group=choice(2,4)",
                 "objective=margin", *TINY, f"runs_root={tmp_path}", f"cache_dir={shared_cache}", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Best parameters" in done.stdout + done.stderr
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    summaries = [json.loads(path.read_text()) for path in sweep.glob("*/summary.json")]
    margins = [summary["stages"]["align"]["final_eval"]["rewards/margin"] for summary in summaries]
    assert len(set(margins)) == 3 and result["best_value"] == pytest.approx(max(margins), rel=1e-12)
    assert set(result["best_params"]) == {"loss.tau", "loss.beta", "loss.contrast_group"}
    assert (sweep / "table.md").exists()  # the sweep's table, as for a grid


@pytest.mark.parametrize(
    ("preset", "nodes", "tasks", "gpus"), [("slurm_1gpu", 1, 1, 1), ("slurm_node", 1, 8, 8), ("slurm_nodes", 2, 8, 8)]
)
def test_the_slurm_presets_compose(preset, nodes, tasks, gpus):
    shown = train(f"hydra/launcher={preset}", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab", "--cfg", "hydra",
                  "--package", "hydra.launcher")
    assert shown.returncode == 0, shown.stderr
    launcher = yaml.safe_load(shown.stdout)  # the package alone
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, tasks, gpus)
    assert (launcher["partition"], launcher["account"]) == ("gpu", "lab")
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] >= 60  # requeued; warned in time for a checkpoint


def test_the_readmes_cluster_commands_compose():
    """The README's SLURM, submitit and Optuna commands (test_readme.py leaves them to this file):
    each composes, with the launcher and sweeper it names."""
    commands = [c for c in all_readme_commands() if any(part in c for part in CLUSTER_COMMANDS)]
    assert len(commands) >= 5
    for command in commands:
        arguments = [a for a in shlex.split(command)[2:] if a != "-m" and not re.search(r"=[^(\[]*,|\(", a)]
        with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
            cfg = compose("config", overrides=arguments, return_hydra_config=True)
        check_config(cfg)
        for group in ("launcher", "sweeper"):
            chosen = next((a.split("=", 1)[1] for a in arguments if a.startswith(f"hydra/{group}=")), None)
            expected = {"submitit_local": "LocalLauncher", "search_rpo": "OptunaSweeper", "search_sr": "OptunaSweeper"}.get(chosen)
            if chosen:
                assert cfg.hydra[group]._target_.endswith(expected or "SlurmLauncher"), command


def test_submitits_own_signal_setting_decides_which_stop_requeues(monkeypatch):
    """SUBMITIT_PREEMPT_SIGNAL=USR1 makes SIGUSR1 submitit's warning: after the checkpoint it
    requeues (submitit's handler, saved when the stop handlers were installed); SIGTERM never does."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    requeued = []
    signal.signal(signal.SIGUSR1, lambda number, frame: requeued.append(number))  # stands in for submitit's handler
    try:
        StopSignals.install()
        assert StopSignals.names() == ("SIGTERM", "SIGUSR1")
        StopSignals.requeue_with_submitit("SIGTERM")
        assert requeued == []
        StopSignals.requeue_with_submitit("SIGUSR1")
        assert requeued == [signal.SIGUSR1]
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
        StopSignals.submitit_requeue = None
