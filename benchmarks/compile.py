"""`torch.compile` on the CPU: the packed forward and backward of a DPO batch with the model's
backbone compiled against the eager one, alternating on the same HH batches in one process.

    python benchmarks/compile.py [--pairs 2] [--batches 8] [--threads 1]

SmolLM2-135M-Instruct, fp32, the trainer's packed layout (`utils.packed_response_logps`, each
prompt once), max_length 256. The backbone is compiled with `dynamic=True`, since packed rows
change width at nearly every step. Prints the compile time (the first batch), the time of the
second width (a recompilation would show there), the largest log-prob difference from eager on
the first batch, and each later batch's eager and compiled seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUT = ("input_ids", "position_ids", "segment", "part", "predict_at", "targets", "owners", "sequences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches: two to compile, the rest timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference_datasets import PairTokenizer, collate, load_hh
    from utils import packed_response_logps, resolve_model_path

    torch.set_num_threads(args.threads)
    path = resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = load_hh({"path": str(ROOT.parent / "shared" / "data" / "hh-rlhf"), "subsets": ["helpful-base"], "holdout": 8, "seed": 0})
    encode = PairTokenizer(tokenizer, 256, 192)
    pairs = [encode(pair) for pair in data["train"][: args.pairs * args.batches]]
    batches = [collate(pairs[i : i + args.pairs], range(args.pairs), tokenizer.pad_token_id, packed=True)
               for i in range(0, len(pairs), args.pairs)]
    backbones = {"eager": model.model, "compiled": torch.compile(model.model, dynamic=True)}

    def step(name: str, batch: dict) -> tuple[float, torch.Tensor]:
        """Seconds of one forward and backward with this backbone, and the log-probs."""
        model.model = backbones[name]
        started = time.perf_counter()
        logps, _ = packed_response_logps(model, *(batch[key] for key in LAYOUT))
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, logps.detach()

    for label, batch in (("compile and first batch", batches[0]), ("second width", batches[1])):
        seconds, _ = step("compiled", batch)
        print(f"{label}: {seconds:.1f} s (rows x width {tuple(batch['input_ids'].shape)})", flush=True)
    difference = (step("eager", batches[0])[1] - step("compiled", batches[0])[1]).abs().max().item()
    print(f"largest log-prob difference, compiled - eager: {difference:.2e}")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for number, batch in enumerate(batches[2:]):
        order = ("eager", "compiled") if number % 2 == 0 else ("compiled", "eager")
        for name in order:
            times[name].append(step(name, batch)[0])
        print(f"batch {number}, width {batch['input_ids'].shape[1]}: eager {times['eager'][-1]:.2f} s, "
              f"compiled {times['compiled'][-1]:.2f} s", flush=True)
    ratios = [eager / compiled for eager, compiled in zip(times["eager"], times["compiled"], strict=True)]
    print(f"median s: eager {statistics.median(times['eager']):.2f}, compiled {statistics.median(times['compiled']):.2f}; "
          f"eager / compiled per batch: median x{statistics.median(ratios):.2f}, "
          f"range x{min(ratios):.2f}-x{max(ratios):.2f}")


if __name__ == "__main__":
    main()
