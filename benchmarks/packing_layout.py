"""What a packed micro-batch computes: token positions and attention (query, key) pairs per layer,
padded, packed with rows as long as the longest segment, and packed with rows as wide as pays
(the model's `utils.position_cost`), for the plain pairs and the self-refinement ones (p + x).

    python benchmarks/packing_layout.py [--pairs 8] [--batches 8] [overrides ...]

No timing: counts of the work, from the real tokenizer and `preference_datasets.collate`; the cost
column is positions x position_cost + attention pairs, in units of one attention pair.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir

    import train
    from preference_datasets import collate, load_datasets
    from utils import position_cost

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["loss=sr_dpo", *args.overrides])
    tokenizer = train.load_tokenizer(cfg)
    pairs = train.tokenize_examples(cfg, tokenizer, train.prepare_examples(cfg, load_datasets(cfg.datasets)))["train"]
    cost = position_cost(train.load_policy(cfg, tokenizer))
    print(f"position cost {cost:.0f}; {args.batches} micro-batches of {args.pairs} pairs")
    print("| sequences | layout | positions | attention pairs | cost |\n|---|---|---:|---:|---:|")
    for kind in ("x", "p + x"):
        for layout, options in (("padded", {}), ("packed, rows of the longest", {"packed": True}),
                                ("packed, rows as wide as pays", {"packed": True, "position_cost": cost})):
            positions = attention = 0
            for start in range(0, args.pairs * args.batches, args.pairs):
                chunk = [p if kind == "x" else p.augmented for p in pairs[start : start + args.pairs]]
                rows, width = collate(chunk, range(len(chunk)), tokenizer.pad_token_id, **options)["input_ids"].shape
                positions, attention = positions + rows * width, attention + rows * width**2
            print(f"| {kind} | {layout} | {positions} | {attention} | {positions * cost + attention:.3g} |")


if __name__ == "__main__":
    main()
