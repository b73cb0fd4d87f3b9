"""RPO's contrast matrix over a whole batch of 64 pairs: one micro-batch of 64 against micro-batches of
4 with gradient caching, and micro-batches of 4 holding whole groups of 4 (one pass), in one invocation.

    python benchmarks/contrast_group.py [--batch 64] [--steps 2] [overrides ...]

Each setting runs in its own process (peak memory only grows): SmolLM2-135M-Instruct in fp32 on the
demo data (the default job's lengths), the real `BasicTrainer` built by `train.py`'s functions, the
reference log-probs and prompt embeddings precomputed (outside the timing), one warm-up step, then
`--steps` timed steps on the same batches in every setting. It prints the step time, the resident
memory before the steps and its peak during them (sampled every 5 ms), and the path the trainer took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory import PeakSampler, rss_gb  # noqa: E402

SETTINGS = {  # name: (micro-batch, contrast group; None: the whole batch)
    "G = batch, micro-batch = batch (one pass)": ("batch", None),
    "G = batch, micro-batch 4 (gradient caching)": (4, None),
    "G = 4, micro-batch 4 (one pass)": (4, 4),
}


def measure(batch: int, micro_batch: int, group: int | None, steps: int, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    import train
    from preference_datasets import load_datasets
    from trainers.basic import BasicTrainer, MetricsLog

    folder = Path(tempfile.mkdtemp())
    settings = [
        "loss=rpo", "model=smollm2_135m", f"train.batch_size={batch}", f"train.micro_batch_size={micro_batch}",
        f"loss.contrast_group={'null' if group is None else group}", "train.max_eval_examples=8", *overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=settings)
    tokenizer = train.load_tokenizer(cfg)
    examples = train.prepare_examples(cfg, load_datasets(cfg.datasets))
    data = train.tokenize_examples(cfg, tokenizer, examples)
    policy = train.load_policy(cfg, tokenizer)
    trainer = BasicTrainer(cfg, "align", policy, tokenizer, data, folder, MetricsLog(folder / "m.jsonl"),
                           train.contrast_embeddings(cfg, examples))
    trainer.train_step(trainer.sampler.take(batch))  # warm-up
    before, times, tokens = rss_gb(), [], 0
    with PeakSampler() as sampler:
        for _ in range(steps):
            started = time.perf_counter()
            record = trainer.train_step(trainer.sampler.take(batch))
            times.append(time.perf_counter() - started)
            tokens += record["tokens"]
    return {
        "seconds": statistics.median(times),
        "spread": max(times) - min(times),
        "tokens": tokens / steps,
        "before_gb": round(before, 2),
        "peak_gb": round(sampler.peak, 2),
        "path": trainer.contrast_path,
        "loss": record["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # micro-batch, group: run one setting here
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.one:
        micro, group = int(args.one[0]), None if args.one[1] == "null" else int(args.one[1])
        print(json.dumps(measure(args.batch, micro, group, args.steps, args.overrides)))
        return
    rows = {}
    print(f"{'setting':46} {'s/step':>7} {'spread':>7} {'tokens':>7} {'before':>8} {'peak':>8}  path")
    for name, (micro, group) in SETTINGS.items():
        micro = args.batch if micro == "batch" else micro
        command = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--one", str(micro), "null" if group is None else str(group), "--", *args.overrides]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{name:46} failed: {(result.stderr.strip().splitlines() or ['killed'])[-1]}", flush=True)
            continue
        row = rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{name:46} {row['seconds']:7.1f} {row['spread']:7.1f} {row['tokens']:7.0f} {row['before_gb']:6.2f}GB "
              f"{row['peak_gb']:6.2f}GB  {row['path']}", flush=True)
    names = list(SETTINGS)
    if names[0] in rows and names[1] in rows:
        one, cached = rows[names[0]], rows[names[1]]
        print(f"gradient caching / one pass: step time x{cached['seconds'] / one['seconds']:.2f}, "
              f"peak x{cached['peak_gb'] / one['peak_gb']:.2f}; losses {one['loss']:.6f} and {cached['loss']:.6f}")
    if names[1] in rows and names[2] in rows:
        ratio = rows[names[1]]["seconds"] / rows[names[2]]["seconds"]
        print(f"gradient caching / groups of 4 at the same micro-batch: step time x{ratio:.2f}")


if __name__ == "__main__":
    main()
