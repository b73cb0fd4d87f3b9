"""Speed and memory of one DPO step, side by side: where the LM head runs and where the reference comes from.

    python benchmarks/step_speed.py [--steps 3] [--pairs 4] [--max-length 256]

Each variant runs in its own process (peak RSS only grows), on the same HH batches
(../shared/data/hh-rlhf, SmolLM2-135M-Instruct, fp32, RMSprop):

- `full-logits`: logits for every position, log-softmax, gather (the DPO reference code's way)
- `response-head` (this project): the LM head and log-softmax only at response positions
each with the reference log-probs precomputed or a no-grad reference forward in the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [("full-logits", "live"), ("full-logits", "precomputed"), ("response-head", "live"), ("response-head", "precomputed")]


def full_logits_logps(model, input_ids, attention_mask, labels):
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    per_token = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1), mask.sum(-1)


def run_variant(head: str, reference: str, steps: int, pairs: int, max_length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference_datasets import PairTokenizer, collate, load_hh
    from trainers.losses import preference_loss
    from utils import resolve_model_path, response_logps

    torch.manual_seed(0)
    path = resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = load_hh({"path": str(ROOT.parent / "shared" / "data" / "hh-rlhf"), "subsets": ["helpful-base"], "holdout": 8, "seed": 0})
    encode = PairTokenizer(tokenizer, max_length, max_length // 2)
    examples = [encode(p) for p in data["train"][: pairs * (steps + 1)]]
    logps_fn = full_logits_logps if head == "full-logits" else response_logps
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    batches = [collate(examples[i : i + pairs], range(pairs), tokenizer.pad_token_id) for i in range(0, len(examples), pairs)]
    precomputed = []
    if reference == "precomputed":
        with torch.no_grad():
            precomputed = [logps_fn(reference_model, b["input_ids"], b["attention_mask"], b["labels"])[0] for b in batches]
        del reference_model
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=5e-7)
    cfg = {"name": "dpo", "beta": 0.1}
    times, tokens = [], []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        logps, _ = logps_fn(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
        if reference == "precomputed":
            reference_logps = precomputed[index]
        else:
            with torch.no_grad():
                reference_logps = logps_fn(reference_model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        loss, _, _ = preference_loss(*logps.view(2, -1), *reference_logps.view(2, -1), cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step warms up
            times.append(time.perf_counter() - started)
            tokens.append(int(batch["attention_mask"].sum()))
    return {
        "head": head,
        "reference": reference,
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(*args.variant, args.steps, args.pairs, args.max_length)))
        return
    rows = []
    for head, reference in VARIANTS:
        command = [sys.executable, __file__, "--variant", head, reference, "--steps", str(args.steps),
                   "--pairs", str(args.pairs), "--max-length", str(args.max_length)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{head:14s} reference {reference:12s} {rows[-1]['seconds_per_step']:6.2f} s/step "
              f"{rows[-1]['tokens_per_s']:6.1f} tokens/s  peak RSS {rows[-1]['peak_rss_gb']:.2f} GB", flush=True)
    baseline = rows[0]
    print(f"\nratios against {baseline['head']} with a {baseline['reference']} reference:")
    for row in rows:
        print(f"  {row['head']:14s} {row['reference']:12s} speed x{row['tokens_per_s'] / baseline['tokens_per_s']:.2f}, "
              f"peak RSS x{row['peak_rss_gb'] / baseline['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
