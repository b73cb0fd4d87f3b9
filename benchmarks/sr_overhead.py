"""Step time of Sr-DPO against DPO on the same batches (the self-refinement costs one extra no-grad
forward of the policy on the prompt-augmented pairs per step).

    python benchmarks/sr_overhead.py [--steps 5] [overrides ...]     # e.g. model=tiny

Both trainers start from the same weights (SmolLM2-135M-Instruct by default) on the demo data,
reference log-probs precomputed (outside the timing), and run the same batches in one process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_seconds(overrides: list[str], steps: int, run_dir: Path) -> float:
    from hydra import compose, initialize_config_dir

    import train
    from preference_datasets import load_datasets
    from trainers.basic import BasicTrainer, MetricsLog

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    tokenizer = train.load_tokenizer(cfg)
    data = train.tokenize_examples(cfg, tokenizer, train.prepare_examples(cfg, load_datasets(cfg.datasets)))
    policy = train.load_policy(cfg, tokenizer)
    trainer = BasicTrainer(cfg, "align", policy, tokenizer, data, run_dir, MetricsLog(run_dir / "metrics.jsonl"))
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        trainer.train_step(trainer.sampler.take(cfg.train.batch_size))
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for loss in ("dpo", "sr_dpo"):
            results[loss] = step_seconds([f"loss={loss}", *args.overrides], args.steps, Path(scratch) / loss)
            print(f"{loss:7s} {results[loss]:6.2f} s/step", flush=True)
    print(f"Sr-DPO / DPO step time: x{results['sr_dpo'] / results['dpo']:.2f}")


if __name__ == "__main__":
    main()
