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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from eval.backends import HFBackend, OpenAIBackend
from eval.judges import Comparison, JudgeError, Judgement, ModelJudge, RulesJudge
from eval.protocols import protocol
from eval.sampling import read_samples, refuse_other_setting
from eval.stats import describe, summarize
from preference_datasets import DataError
from utils import Checker, ConfigError, atomic_write_text, exit_on, text_fingerprint

JUDGES = ("rules", "openai", "hf")
PROTOCOLS = ("rpo_dialogue", "rpo_summary", "mt_bench_pair")
JUDGEMENTS = "judgements.jsonl"
RESULT = "result.json"
SETTING = "judging.json"  # who judged which files: a rerun must be the same judging


def comparisons(responses: Path, baseline: str | Path) -> list[Comparison]:
    """One comparison per prompt and turn of `responses`: against the same prompt's row of the
    baseline file, or its `chosen` response. Every prompt must have its counterpart."""
    rows = read_samples(responses)
    if not rows:
        raise DataError(f"{responses}: no samples")
    others = None if str(baseline) == "chosen" else read_samples(Path(baseline))
    pairs = []
    for prompt_id, row in rows.items():
        if others is None:
            if not row.get("chosen"):
                raise DataError(f"{responses}: prompt {prompt_id} has no chosen response (baseline=chosen needs held-out prompts)")
            theirs = [row["chosen"]]
        elif prompt_id not in others:
            raise DataError(f"{baseline}: no response to prompt {prompt_id} of {responses}: sample both on the same prompt set")
        else:
            theirs = others[prompt_id].get("responses") or [others[prompt_id]["response"]]
        ours = row.get("responses") or [row["response"]]
        shared = {"questions": tuple(row.get("turns") or ()), "a_turns": tuple(ours), "b_turns": tuple(theirs),
                  "references": tuple(row.get("references") or ()), "category": row.get("category", "")}
        for turn in range(min(len(ours), len(theirs))):
            pairs.append(Comparison(prompt_id, row["prompt"], ours[turn], theirs[turn], turn, **shared))
    return pairs


def judge_all(pairs: Sequence[Comparison], judge, path: Path) -> list[dict]:
    """Judge every comparison not already judged in `path` (errors are asked again), appending a
    line per judgement (with what a model judge was asked and answered); all the judgements, in
    `pairs` order. A judge with `concurrency` > 1 has that many comparisons in flight."""
    kept = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["verdict"] != "error":
                    kept[row["key"]] = row
    path.write_text("".join(json.dumps(row) + "\n" for row in kept.values()))  # errors are dropped, to be asked again
    todo = [pair for pair in pairs if pair.key not in kept]
    with open(path, "a") as out, ThreadPoolExecutor(max_workers=getattr(judge, "concurrency", 1)) as pool:
        judged = pool.map(lambda pair: (pair, safely(judge, pair)), todo)  # in order, with `concurrency` in flight
        for pair, judgement in tqdm(judged, total=len(todo), desc=f"judging ({judge.name})", unit="comparison"):
            kept[pair.key] = {"key": pair.key, "id": pair.id, "turn": pair.turn + 1, "verdict": judgement.verdict,
                              "detail": judgement.detail, "a": pair.a, "b": pair.b,
                              **({"requests": list(judgement.requests), "answers": list(judgement.answers)} if judgement.requests else {})}
            out.write(json.dumps(kept[pair.key]) + "\n")
            out.flush()
    return [kept[pair.key] for pair in pairs]


def safely(judge, pair: Comparison) -> Judgement:
    """A judge's failure on one comparison is an `error` judgement with the reason, not the end of the run."""
    try:
        return judge.judge(pair)
    except (ValueError, JudgeError) as error:
        return Judgement("error", str(error))


def judge_files(responses: Path, baseline: str | Path, judge, output_dir: Path) -> dict:
    """Judge `responses` against `baseline`; write the judgements and the summary into `output_dir`.
    A folder holds one judge's verdicts on one pair of files: judging into it with another judge
    or other files is refused (a rerun would otherwise keep the other judge's verdicts)."""
    pairs = comparisons(responses, baseline)
    output_dir.mkdir(parents=True, exist_ok=True)
    against = "chosen" if str(baseline) == "chosen" else str(Path(baseline).resolve())
    setting = {"responses": str(Path(responses).resolve()), "baseline": against, **judge.settings}
    refuse_other_setting(output_dir / SETTING, setting, "another judging")
    atomic_write_text(output_dir / SETTING, json.dumps(setting, indent=2))
    judgements = judge_all(pairs, judge, output_dir / JUDGEMENTS)
    summary = {"responses": str(responses), "baseline": str(baseline), "judge": judge.name,
               **summarize(row["verdict"] for row in judgements)}
    atomic_write_text(output_dir / RESULT, json.dumps(summary, indent=2))
    return summary


def make_judge(cfg: DictConfig):
    """The judge the config names: `rules`, or a protocol asked of an `openai` or `hf` back end."""
    check = Checker(cfg)
    name = check.choice("judge", JUDGES)
    if name in ("openai", "hf"):
        check.choice("protocol", PROTOCOLS)
    if name == "openai":
        check.whole("openai.max_retries", low=0)
        check.whole("openai.concurrency")
        check.positive("openai.timeout")
        check.number("openai.backoff", 0.0)
    if check.problems:
        raise ConfigError("\n".join(check.problems))
    if name == "rules":
        return RulesJudge()
    backend = OpenAIBackend(**cfg.openai) if name == "openai" else HFBackend(cfg.hf.model, cfg.cache_dir)
    return ModelJudge(protocol(cfg.protocol, cfg.seed, cfg.judge_prompts), backend)


def default_output(responses: Path, baseline: str, judge) -> Path:
    """`<responses folder>/judged_<judge>_vs_<baseline>`: the baseline's folder name and a hash of its path."""
    against = "chosen" if baseline == "chosen" else f"{Path(baseline).parent.name}-{text_fingerprint(str(Path(baseline).resolve()))[:6]}"
    judged_by = "_".join(str(value) for key, value in judge.settings.items() if key in ("judge", "protocol"))
    return responses.parent / f"judged_{judged_by}_vs_{against}"


@hydra.main(config_path="../config", config_name="eval/judge", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on(ConfigError, DataError, OSError):
        if not cfg.responses or not cfg.baseline:
            raise ConfigError("responses and baseline: give a samples file and what to compare it with (a samples file or chosen)")
        responses = Path(cfg.responses)
        judge = make_judge(cfg)
        output = Path(cfg.output_dir) if cfg.output_dir else default_output(responses, str(cfg.baseline), judge)
        summary = judge_files(responses, cfg.baseline, judge, output)
    print(f"{responses} vs {cfg.baseline} ({judge.name} judge): {describe(summary)}")
    print(f"Judgements: {output / JUDGEMENTS}; summary: {output / RESULT}")


if __name__ == "__main__":
    main()
