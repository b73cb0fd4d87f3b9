"""The HH rows of docs/REPRODUCTION.md, run by a worker on one thread, one row after another:
`python docs/reproduction/hh_queue.py A` (and `B` beside it on a second core).

Each row is the preset's sweep restricted to one job, the command REPRODUCTION.md gives:
`python train.py +experiment=<preset> seed=<seed> row/<group>=<row>`. The two workers start on
different seeds (each seed trains its SFT model once; its other rows reuse it through `sft.reuse`
and the reference cache) and skip rows that are finished, recorded, or run by the other worker.
B takes a seed's `unpaired` row first: with the code these rows run (527e235; since 98634c3
`sft.reuse` shares the paired rows' SFT with it) it trains an SFT model and reference log-probs of
its own (its examples are single responses), so when both workers reach a seed together, one trains
the seed's shared SFT model while the other runs that row, rather than both training the same model.
A finished run's record (config, state, summary, metrics, Hydra's overrides, re-evaluations; not
the weights) is copied to docs/reproduction/hh_runs/<preset>/s<seed>_<row>/, where `eval.table`
reads it: the tables outlive the machine the runs were made on. Rows run from a copy of the code
(`--code`), so that editing the checkout does not change runs in flight."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "hh_runs"
ROWS = [("rpo_weighting_small", "rpo_weighting", row) for row in ("dpo", "paired", "uniform", "diagonal", "unpaired")] + \
       [("sr_small", "sr", row) for row in ("sr_dpo", "ipo", "sr_ipo")] + \
       [("rpo_group_small", "rpo_group", row) for row in ("g2", "g4", "g6", "g8")]
SEED_ORDER = {"A": (2, 3, 1), "B": (3, 2, 1)}
ROW_ORDER = {"A": ROWS, "B": sorted(ROWS, key=lambda row: row[2] != "unpaired")}  # stable: the rest keep their order
RECORD_FILES = ("config.yaml", "state.json", "summary.json", "metrics.jsonl", ".hydra", "heldout")
PREEMPTED = 75  # train.py's exit code after SIGTERM: checkpointed, continue later


def run_state(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "state.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


def claim(locks: Path, name: str) -> bool:
    """Take a row unless another living worker holds it (a dead worker's lock is taken over; a row
    this worker holds and is back at failed once, and is tried again)."""
    lock = locks / f"{name}.lock"
    if lock.exists():
        try:
            holder = int(lock.read_text())
            if holder != os.getpid():
                os.kill(holder, 0)
                return False
        except (OSError, ValueError):
            pass
    lock.write_text(str(os.getpid()))
    return True


def copy_record(run_dir: Path, record: Path) -> None:
    """The run's record without its weights, written beside and renamed into place."""
    staging = record.with_name(record.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in RECORD_FILES:
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, staging / name)
        elif source.exists():
            shutil.copy2(source, staging / name)
    shutil.rmtree(record, ignore_errors=True)
    staging.rename(record)


def memory_cgroup(worker: str, limit_gb: float) -> Path | None:
    """A cgroup v1 memory cgroup beside this process's, limited to `limit_gb`, for the rows of
    large batches (RPO Table 3's, 16-64 pairs a step): their `memory_budget: auto` reads the room
    under it, so two workers' rows cannot together outgrow the machine. None where it cannot be made
    (no v1 memory controller, not root): the rows then run as the others do."""
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
        folder = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"hh_queue_{worker}"
        folder.mkdir(exist_ok=True)
        (folder / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1e9)))
        return folder
    except (OSError, StopIteration):
        return None


def run_row(args: argparse.Namespace, preset: str, group: str, row: str, seed: int, run_dir: Path) -> int:
    command = [sys.executable, "train.py", f"+experiment={preset}", f"seed={seed}", f"row/{group}={row}",
               f"runs_root={args.runs}", f"hydra.run.dir={run_dir}", "train.save_every=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFOPT_CACHE": str(args.cache)}
    cgroup = memory_cgroup(args.worker, args.memory_limit) if group == "rpo_group" else None
    enter = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    with open(args.runs / f"{preset}_{run_dir.name}.log", "a") as log:
        log.write(f"memory cgroup: {cgroup} ({args.memory_limit} GB)\n" if cgroup else "")
        log.flush()
        return subprocess.call(command, cwd=args.code, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=enter)


def next_row(args: argparse.Namespace, failures: dict[Path, int]) -> tuple[str, str, str, int] | None:
    """The first row in this worker's order that nobody has finished or taken (claimed for this
    worker); a row that failed twice is left for a person to look at."""
    for seed in SEED_ORDER[args.worker]:
        for preset, group, row in ROW_ORDER[args.worker]:
            run_dir = args.runs / preset / f"s{seed}_{row}"
            record = RECORDS / preset / run_dir.name
            if record.exists() or failures.get(run_dir, 0) >= 2:
                continue
            if run_state(run_dir) == "finished":
                copy_record(run_dir, record)
            elif claim(args.runs / "locks", f"{preset}_{run_dir.name}"):
                return preset, group, row, seed
    return None


def work(args: argparse.Namespace) -> None:
    (args.runs / "locks").mkdir(parents=True, exist_ok=True)
    failures: dict[Path, int] = {}
    while chosen := next_row(args, failures):
        preset, group, row, seed = chosen
        run_dir = args.runs / preset / f"s{seed}_{row}"
        print(time.strftime("%H:%M:%S"), "start", preset, run_dir.name, flush=True)
        code = run_row(args, preset, group, row, seed, run_dir)
        print(time.strftime("%H:%M:%S"), "end", preset, run_dir.name, "exit", code, run_state(run_dir), flush=True)
        if code == PREEMPTED:
            return
        if run_state(run_dir) == "finished":
            copy_record(run_dir, RECORDS / preset / run_dir.name)
        else:
            failures[run_dir] = failures.get(run_dir, 0) + 1
    print("nothing left", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("worker", choices=sorted(SEED_ORDER))
    parser.add_argument("--runs", type=Path, default=Path("/work/repro/hh"), help="where the run folders and logs go")
    parser.add_argument("--cache", type=Path, default=Path("/work/repro/cache"), help="PREFOPT_CACHE: SFT models, reference log-probs")
    parser.add_argument("--code", type=Path, default=Path("/work/repro/code"), help="a copy of this repository to run from")
    parser.add_argument("--memory-limit", type=float, default=11.0,
                        help="GB for each worker's Table 3 rows (a memory cgroup; half a 24 GB machine, less the system's)")
    work(parser.parse_args())


if __name__ == "__main__":
    main()
