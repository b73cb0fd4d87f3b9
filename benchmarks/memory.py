"""Peak memory of one training step against the micro-batch size, per loss, and what
`train.micro_batch_size: auto` picks.

    python benchmarks/memory.py [--sizes 1 2 4 8] [--losses sft dpo kto rpo] [--max-length 512]
    python benchmarks/memory.py --auto 32 [--losses ...]   # fit a batch of 32, then run it: estimate vs peak

Each (loss, micro-batch) runs in its own process (peak RSS only grows): SmolLM2-135M-Instruct in
fp32, the real `BasicTrainer` built by `train.py`'s own functions, HH pairs from
`../shared/data/hh-rlhf` long enough to fill `--max-length` tokens (so every sequence is full
length, the worst case the chooser must plan for), the reference log-probs precomputed (as by
default) and one optimizer step of one micro-batch. It prints the resident memory before the step
(model, optimizer not yet allocated, data), the peak during it, and their difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSSES = ("sft", "dpo", "kto", "rpo")


def rss_gb() -> float:
    """The current resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def measure(loss: str, size: int, max_length: int, auto: bool = False) -> dict:
    from hydra import compose, initialize_config_dir

    import train
    from preference_datasets import PairTokenizer
    from trainers.basic import MetricsLog
    from trainers.memory import PeakMemory

    folder = Path(tempfile.mkdtemp())  # the default cache_dir keeps the converted model between processes
    hh = str(ROOT.parent / "shared" / "data" / "hh-rlhf")
    # unpaired losses count responses: `size` pairs give 2 x size items, as many sequences as a paired micro-batch
    examples = size * 2 if loss == "kto" else size
    overrides = [
        f"loss={loss}", "model=smollm2_135m", "datasets=[hh]", f"datasets.hh.path={hh}", "datasets.hh.subsets=[helpful-base]",
        f"max_length={max_length}", f"max_prompt_length={max_length // 2}", f"train.batch_size={examples}",
        f"train.max_eval_examples={examples}",
        *([] if auto else ["train.gradient_accumulation_steps=1"]),
    ]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    stage = "sft" if loss == "sft" else "align"
    tokenizer = train.load_tokenizer(cfg)
    loaded = train.load_datasets(cfg.datasets)
    # the pairs whose both sequences are longest once tokenized (cut at max_length): the worst case
    encode = PairTokenizer(tokenizer, cfg.max_length, cfg.max_prompt_length)
    lengths = [min(len(t.prompt) + len(t.chosen), len(t.prompt) + len(t.rejected)) for t in map(encode, loaded["train"])]
    longest = [loaded["train"][i] for i in sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    chosen = {"train": longest[: 2 * examples], "test": loaded["test"][:examples]}
    prepared = train.prepare_examples(cfg, chosen)
    data = train.tokenize_examples(cfg, tokenizer, prepared)
    policy = train.load_policy(cfg, tokenizer)
    trainer_class = train.TRAINERS[cfg.trainer]
    embeddings = train.contrast_embeddings(cfg, prepared)
    trainer = trainer_class(cfg, stage, policy, tokenizer, data, folder / stage, MetricsLog(folder / "m.jsonl"), embeddings)
    if auto:  # the fitted micro-batches on the batch of the longest examples: the worst case
        plan = trainer.micro_batches()
        indices = trainer.longest_examples(examples)
        with PeakMemory(trainer.device) as peak:
            trainer.train_step(indices)
        return {"loss": loss, "batch": examples, **plan.as_dict(), "peak_gb": round(peak.peak / 1e9, 2)}
    indices = trainer.sampler.take(examples)
    batch = trainer.make_batch(trainer.train_set, indices, with_rejected=stage != "sft")
    before = rss_gb()
    with PeakSampler() as sampler:
        trainer.train_step(indices)
    sequences = batch["sequences"] + (batch["mismatched"]["sequences"] if "mismatched" in batch and loss == "kto" else 0)
    return {
        "loss": loss,
        "micro_batch": examples,
        "sequences": sequences,
        "tokens": batch["tokens"],
        "before_gb": round(before, 2),
        "peak_gb": round(sampler.peak, 2),
        "step_gb": round(sampler.peak - before, 2),
    }


class PeakSampler:
    """The highest resident memory seen while the block runs (sampled every 5 ms by a thread):
    the process's own high-water mark would include the model loading and reference passes."""

    def __enter__(self) -> PeakSampler:
        self.peak, self.running = rss_gb(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_gb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_gb())


def in_child(*arguments: str) -> dict | str:
    """One measurement in its own process (peak memory only grows): its JSON row, or its last error line."""
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        return result.stderr.strip().splitlines()[-1]
    return json.loads(result.stdout.strip().splitlines()[-1])


def fit_and_run(args: argparse.Namespace) -> None:
    print(f"{'loss':5} {'batch':>5} {'micro-batch':>11} {'steps':>5} {'budget':>8} {'estimate':>8} {'peak':>8}")
    for loss in args.losses:
        row = in_child("--one", loss, str(args.auto), "--max-length", str(args.max_length), "--auto", str(args.auto))
        if isinstance(row, str):
            print(f"{loss:5} failed: {row}")
            continue
        print(f"{loss:5} {row['batch']:>5} {row['micro_batch']:>11} {row['accumulation_steps']:>5} {row['budget_gb']:>6.2f}GB "
              f"{row['estimate_gb']:>6.2f}GB {row['peak_gb']:>6.2f}GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--auto", type=int, metavar="BATCH", help="fit this batch size with micro_batch_size=auto, then run it")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: loss size, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.max_length, auto=bool(args.auto))))
        return
    if args.auto:
        fit_and_run(args)
        return
    print(f"{'loss':5} {'micro-batch':>11} {'sequences':>9} {'tokens':>7} {'before':>8} {'peak':>8} {'step':>8}")
    for loss in args.losses:
        for size in args.sizes:
            row = in_child("--one", loss, str(size), "--max-length", str(args.max_length))
            if isinstance(row, str):
                print(f"{loss:5} {size:>11} failed: {row}")
                continue
            print(f"{loss:5} {row['micro_batch']:>11} {row['sequences']:>9} {row['tokens']:>7} "
                  f"{row['before_gb']:>6.2f}GB {row['peak_gb']:>6.2f}GB {row['step_gb']:>6.2f}GB", flush=True)


if __name__ == "__main__":
    main()
