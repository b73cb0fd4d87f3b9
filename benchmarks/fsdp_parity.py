"""The same short run with `trainer=basic` (one process) and `trainer=fsdp` (torchrun, W processes).

Prints each run's wall time, tokens/s per stage, held-out accuracies, and the largest difference
between the two final models. On CPU (gloo) this checks FSDP on a real model end to end; its
speed there says nothing about GPUs.

    python benchmarks/fsdp_parity.py                     # SmolLM2-135M, RPO, demo data, 2 processes
    python benchmarks/fsdp_parity.py --processes 4 loss=dpo model=tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["loss=rpo", "sft.max_examples=32", "align.max_examples=32", "train.batch_size=8", "train.max_eval_examples=32"]


def launch(name: str, processes: int, runs_root: Path, overrides: list[str]) -> tuple[Path, float]:
    if name == "basic":
        command = [sys.executable, "train.py"]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command = [*torchrun, "train.py", "trainer=fsdp"]
    started = time.perf_counter()
    subprocess.run([*command, *overrides, f"runs_root={runs_root}", f"run_name={name}"], cwd=ROOT, check=True, capture_output=True)
    return next((runs_root / name).glob("*/summary.json")).parent, time.perf_counter() - started


def stage_figures(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figures = {}
    for stage in ("sft", "align"):
        speeds = [r["tokens_per_s"] for r in records if r["stage"] == stage and "tokens_per_s" in r]
        figures[f"{stage} tokens/s"] = sum(speeds) / len(speeds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (after the short-run defaults)")
    args = parser.parse_args()
    overrides = [*SHORT_RUN, *args.overrides]
    with tempfile.TemporaryDirectory() as folder:
        runs = {name: launch(name, args.processes, Path(folder), overrides) for name in ("basic", "fsdp")}
        print(f"overrides: {' '.join(overrides)}; fsdp with {args.processes} processes")
        for name, (run_dir, seconds) in runs.items():
            summary = json.loads((run_dir / "summary.json").read_text())
            accuracy = " -> ".join(f"{value:.3f}" for value in summary["logp_accuracy"].values())
            speeds = ", ".join(f"{key} {value:.1f}" for key, value in stage_figures(run_dir).items())
            print(f"{name:6s} wall {seconds:6.1f} s   {speeds}   logp accuracy {accuracy}")
        basic, fsdp = (load_file(run_dir / "align" / "final" / "model.safetensors") for run_dir, _ in runs.values())
        difference = max((basic[key] - fsdp[key]).abs().max().item() for key in basic)
        largest = max(value.abs().max().item() for value in basic.values())
        print(f"final weights: same keys {basic.keys() == fsdp.keys()}, largest difference {difference:.2e} (largest weight {largest:.2f})")


if __name__ == "__main__":
    main()
