"""Score a finished run's model on its held-out set again, with this code's statistics:

    python -m eval.heldout outputs/rpo_smollm2_135m/<time>                      # the last stage
    python -m eval.heldout outputs/rpo_smollm2_135m/<time> --max-eval-examples 512
    python -m eval.heldout outputs/multirun/<time>/*/                           # each run of a sweep

For a run whose held-out figures predate a statistic or a fix of the evaluation, or to score more
(or fewer) held-out pairs than `train.max_eval_examples` did. The stage's trainer is built as the
run built it (its config.yaml, data and tokenizer; for `align` the frozen reference is the stage's
start model, the SFT model, as in training, computed live on the held-out pairs only: the run's
precomputed reference up to float rounding, which is larger in bfloat16), `<stage>/final` is
loaded into the policy, and the held-out evaluation runs. One JSON line per call is appended to
`<run>/heldout/<stage>.jsonl` (the metrics, the held-out set scored, the figures the run recorded);
nothing the run wrote is changed. `python -m eval.table` shows a run's latest re-evaluation in place
of its recorded held-out figures and says which runs it re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import train
from eval.table import reevaluations
from preference_datasets import DataError
from trainers.basic import BasicTrainer, MetricsLog, load_weights
from utils import EXIT_BAD_INPUT, ConfigError, ModelResolutionError, atomic_write_text, print_errors

ALL = "all"  # --max-eval-examples: every held-out example


def run_config(run_dir: Path, max_eval_examples: int | str | None, eval_batch_size: int | None) -> DictConfig:
    """The run's config.yaml with the evaluation's own settings; the reference computed live, on
    the held-out examples only (a cached one covers the training split too)."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise DataError(f"{run_dir}: no config.yaml, not a run folder of train.py")
    cfg = OmegaConf.load(config_file)
    if max_eval_examples is not None:
        cfg.train.max_eval_examples = None if max_eval_examples == ALL else max_eval_examples
    if eval_batch_size is not None:
        cfg.train.eval_batch_size = eval_batch_size
    cfg.reference.precompute = False
    return cfg


def scored_stage(cfg: DictConfig, run_dir: Path, stage: str | None) -> str:
    """`stage`, or the run's last; refused unless the run finished it."""
    planned = train.stages(cfg)
    stage = stage or planned[-1]
    if stage not in planned:
        raise ConfigError(f"--stage {stage}: the run's stages are {', '.join(planned)}")
    if not train.stage_finished(run_dir / stage / "final"):
        raise DataError(f"{run_dir / stage / 'final'}: the stage has not finished (no final model to score)")
    return stage


def check_same_split(recorded: dict | None, now: dict, cfg: DictConfig) -> None:
    """The held-out split loaded now must be the one the run held out (data files unchanged)."""
    if recorded and recorded.get("fingerprint") != now["fingerprint"]:
        sources = ", ".join(str(options.get("path") or options.get("hub_name") or name) for name, options in cfg.datasets.items())
        raise DataError(f"datasets {sources}: the held-out split ({now['examples']} examples) is not the one the run held out "
                        f"({recorded.get('examples')} examples, heldout.fingerprint in config.yaml): the data changed since")


def evaluate_stage(run_dir: Path, stage: str | None = None, max_eval_examples: int | str | None = None,
                   eval_batch_size: int | None = None) -> dict:
    """Evaluate `run_dir`'s `stage` model (default: the last stage) on the held-out set; append and
    return the record."""
    cfg = run_config(run_dir, max_eval_examples, eval_batch_size)
    stage = scored_stage(cfg, run_dir, stage)
    recorded_split = OmegaConf.to_container(cfg.heldout) if cfg.get("heldout") else None
    examples = train.load_examples(cfg)  # records what is scored now in cfg.heldout
    check_same_split(recorded_split, OmegaConf.to_container(cfg.heldout), cfg)
    tokenizer = train.load_tokenizer(cfg)
    data = train.tokenize_examples(cfg, tokenizer, examples)
    embeddings = train.contrast_embeddings(cfg, examples)
    planned = train.stages(cfg)
    earlier = planned[: planned.index(stage)]
    start = train.load_stage_model(cfg, run_dir / earlier[-1] / "final") if earlier else train.load_policy(cfg, tokenizer)
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's folders: nothing is written into the run
        trainer = BasicTrainer(cfg, stage, start, tokenizer, data, Path(scratch) / stage, MetricsLog(Path(scratch) / "metrics.jsonl"),
                               embeddings)
        load_weights(trainer.policy, run_dir / stage / "final")
        metrics = trainer.evaluate()
        scored = "pairs" if trainer.paired else "responses"  # an unpaired loss scores each pair's answers apart
    record = {
        "stage": stage,
        "scored": scored,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "heldout": OmegaConf.to_container(cfg.heldout),
        "metrics": metrics,
        "recorded": json.loads((run_dir / stage / "final" / "result.json").read_text())["final_eval"],
    }
    path = reevaluations(run_dir, stage)
    path.parent.mkdir(exist_ok=True)
    before = path.read_text() if path.exists() else ""
    atomic_write_text(path, before + json.dumps(record) + "\n")
    return record


def comparison(record: dict) -> str:
    """The re-evaluation beside the figures the run recorded."""
    lines = ["| metric | recorded | now |", "|---|---:|---:|"]
    for name, value in record["metrics"].items():
        before = record["recorded"].get(name)
        lines.append(f"| {name} | {'-' if before is None else f'{before:.4f}'} | {value:.4f} |")
    return "\n".join(lines)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def count_or_all(text: str) -> int | str:
    return ALL if text == ALL else positive(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Score each run given; one that cannot be scored is named (exit code 2 at the end) and the
    others are still scored, as a sweep's folders with a failed job among them."""
    parser = argparse.ArgumentParser(prog="python -m eval.heldout", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders of train.py (where config.yaml is)")
    parser.add_argument("--stage", help="the stage whose final model to score (default: each run's last)")
    parser.add_argument("--max-eval-examples", type=count_or_all, help="held-out pairs to score, or `all` (default: the run's "
                        "train.max_eval_examples)")
    parser.add_argument("--eval-batch-size", type=positive, help="held-out pairs per batch (default: the run's train.eval_batch_size)")
    args = parser.parse_args(argv)
    refused = 0
    for run_dir in args.run_dirs:
        try:
            record = evaluate_stage(run_dir, args.stage, args.max_eval_examples, args.eval_batch_size)
        except (ConfigError, DataError, ModelResolutionError) as error:
            print_errors(error)
            refused += 1
            continue
        heldout = record["heldout"]
        print(f"{run_dir}, stage {record['stage']}: held-out split of {heldout['examples']} examples; scored "
              f"{heldout['evaluated']} {record['scored']}")
        print(comparison(record))
        print(f"Appended to {reevaluations(run_dir, record['stage'])}")
    if refused:
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
