"""`python -m eval.judge`: pairwise judgements of two samples files (config/eval/judge.yaml).

    python -m eval.judge responses=<run>/samples/align_heldout/samples.jsonl baseline=chosen
    python -m eval.judge responses=<aligned samples.jsonl> baseline=<sft samples.jsonl>

Compares, prompt by prompt (by id), the evaluated model's response (A) with the baseline's (B):
another samples file on the same prompts, or `chosen`, the dataset's preferred response stored
with each held-out prompt. Writes `judgements.jsonl` (one line per comparison, with the judge's
reason) and `result.json` (counts, rates, intervals: eval/stats.py) and prints the win rate. A rerun
keeps the judgements already made and asks again only those that ended in an error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from eval.judges import Comparison, Judgement, RulesJudge
from eval.sampling import read_samples
from eval.stats import describe, summarize
from preference_datasets import DataError
from utils import ConfigError, atomic_write_text

JUDGES = {"rules": RulesJudge}
JUDGEMENTS = "judgements.jsonl"
RESULT = "result.json"


def comparisons(responses: Path, baseline: str | Path) -> list[Comparison]:
    """One comparison per prompt of `responses`: against the same prompt's row of the baseline file,
    or its `chosen` response. Every prompt must have its counterpart."""
    rows = read_samples(responses)
    if not rows:
        raise DataError(f"{responses}: no samples")
    others = None if str(baseline) == "chosen" else read_samples(Path(baseline))
    pairs = []
    for prompt_id, row in rows.items():
        if others is None:
            if not row.get("chosen"):
                raise DataError(f"{responses}: prompt {prompt_id} has no chosen response (baseline=chosen needs held-out prompts)")
            other = row["chosen"]
        elif prompt_id not in others:
            raise DataError(f"{baseline}: no response to prompt {prompt_id} of {responses}: sample both on the same prompt set")
        else:
            other = others[prompt_id]["response"]
        pairs.append(Comparison(prompt_id, row["prompt"], row["response"], other))
    return pairs


def judge_all(pairs: Sequence[Comparison], judge, path: Path) -> list[dict]:
    """Judge every comparison not already judged in `path` (errors are asked again), appending a
    line per judgement; all the judgements, in `pairs` order."""
    kept = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["verdict"] != "error":
                    kept[row["id"]] = row
    path.write_text("".join(json.dumps(row) + "\n" for row in kept.values()))  # errors are dropped, to be asked again
    with open(path, "a") as out:
        for pair in tqdm([pair for pair in pairs if pair.id not in kept], desc=f"judging ({judge.name})", unit="comparison"):
            judgement = safely(judge, pair)
            kept[pair.id] = {"id": pair.id, "verdict": judgement.verdict, "detail": judgement.detail, "a": pair.a, "b": pair.b}
            out.write(json.dumps(kept[pair.id]) + "\n")
            out.flush()
    return [kept[pair.id] for pair in pairs]


def safely(judge, pair: Comparison) -> Judgement:
    """A judge's failure on one comparison is an `error` judgement with the reason, not the end of the run."""
    try:
        return judge.judge(pair)
    except ValueError as error:
        return Judgement("error", str(error))


def judge_files(responses: Path, baseline: str | Path, judge_name: str, output_dir: Path) -> dict:
    """Judge `responses` against `baseline`; write the judgements and the summary into `output_dir`."""
    if judge_name not in JUDGES:
        raise ConfigError(f"judge={judge_name!r}: choose one of {', '.join(JUDGES)}")
    pairs = comparisons(responses, baseline)
    output_dir.mkdir(parents=True, exist_ok=True)
    judgements = judge_all(pairs, JUDGES[judge_name](), output_dir / JUDGEMENTS)
    summary = {"responses": str(responses), "baseline": str(baseline), "judge": judge_name,
               **summarize(row["verdict"] for row in judgements)}
    atomic_write_text(output_dir / RESULT, json.dumps(summary, indent=2))
    return summary


def default_output(responses: Path, baseline: str) -> Path:
    against = "chosen" if baseline == "chosen" else Path(baseline).parent.name
    return responses.parent / f"judged_vs_{against}"


@hydra.main(config_path="../config", config_name="eval/judge", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        if not cfg.responses or not cfg.baseline:
            raise ConfigError("responses and baseline: give a samples file and what to compare it with (a samples file or chosen)")
        responses = Path(cfg.responses)
        output = Path(cfg.output_dir) if cfg.output_dir else default_output(responses, str(cfg.baseline))
        summary = judge_files(responses, cfg.baseline, cfg.judge, output)
    except (ConfigError, DataError, OSError) as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    print(f"{responses} vs {cfg.baseline} ({cfg.judge} judge): {describe(summary)}")
    print(f"Judgements: {output / JUDGEMENTS}; summary: {output / RESULT}")


if __name__ == "__main__":
    main()
