"""Turn runs into a table: one row per run, mean and spread over seeds, plots against the swept keys.

    python -m eval.table outputs/multirun/<time>                 # a sweep (`train.py -m ...`)
    python -m eval.table outputs/dpo_smollm2_135m/<time> outputs/rpo_smollm2_135m/<time>   # runs
    python -m eval.table outputs/multirun/<time> --out tables/rpo_tau
    python -m eval.table outputs/multirun/<time> --baseline row/rpo_weighting=dpo   # and each row minus DPO, seed by seed

Each run gives its overrides (the command-line ones, `.hydra/overrides.yaml`), its seed, the last
stage's final held-out loss, reward accuracy and margin, preference accuracy and chosen log-prob
(or those of its latest re-evaluation by `python -m eval.heldout`, named below the table), its
step time (the last stage's training steps) and wall time and, where it was judged
(`eval.after_training`), its win rates, plain and with ties counted half (`summary.json`). Runs
that differ only in `seed` form a group: mean, sample standard deviation, 95 % interval of the
mean (Student's t) and count, beside what the paper published for the setting (`paper.published`,
walked down by the setting's override values). A sweep folder's expected jobs come
from its `multirun.yaml`, so a job that failed, was stopped or never started is a row that says so,
never a silent gap. Where the runs' paper compares rows head to head (its `paper.published` has
"A vs B" entries, as the Sr paper's MT-Bench tables) and the runs were judged by the `rules` judge
(the demo data), each seed's row A answers are judged against the same seed's row B answers and
the verdicts pooled over seeds, beside the published numbers. With `--baseline key=value`, each
setting is also compared with the one that has that override instead, seed by seed (the rows of one
seed share its SFT model and data order, so their differences are far less noisy than the
per-setting means): mean, spread and interval of the differences; a row of another preset (without
that key) is set against the one baseline setting, and `--baseline` may be given more than once
(a section of each); without it, the runs' presets' own baselines (`paper.table_baselines`, those
some run has), `--baseline none` for none. Written to the sweep folder (or
`--out`): `table.md`, `runs.csv`, `table.csv`, `head_to_head.csv` (where there are head-to-heads),
`versus_baseline.csv` and `.png` (with a baseline),
`<key>.png` (each metric against each swept key) and `curves.png` (the training curves of every
run). `train.py -m` builds it when the sweep ends and prints where it is.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

METRICS = {  # column: key of the last stage's final held-out evaluation
    "loss": "loss",
    "reward accuracy": "rewards/accuracy",
    # unpaired runs: their reward accuracy is every chosen response against every rejected one; this is
    # each prompt's own (on data made of pairs, the paired runs' reward accuracy)
    "same-prompt reward accuracy": "rewards/accuracy_same_prompt",
    "margin": "rewards/margin",
    "preference accuracy": "logp_accuracy",
    "chosen log-prob": "logps/chosen",  # falling while the margin grows: the likelihood of the preferred answers displaced
}
SAME_PROMPT = "same-prompt reward accuracy"
GROUPED_AWAY = "seed"  # runs that differ only in this override are repeats of one setting
# where a run's files go, not what it computes: runs that differ only in these are the same setting
OUTPUT_LOCATIONS = ("runs_root", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
# how a run is launched and how often it checkpoints, not what it computes (a resumed run ends bit for
# bit as an uninterrupted one, whatever its checkpoints): a run may be resumed with other values, and
# runs that differ only in these are one setting of a table (here, so that this
# module stays free of torch: `python -m eval.table` starts in a fraction of a second)
BOOKKEEPING_KEYS = ("resume", "debug", "train.save_every")


@dataclass
class Run:
    """One run (or one expected job of a sweep that left no run folder)."""

    folder: Path | None
    overrides: list[str]
    state: str  # finished | running | stopped | failed | missing
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    step_s: float | None = None  # the last stage's training steps, summed (no evaluations, loading or earlier stages)
    curves: list[dict] = field(default_factory=list)
    judge: str | None = None  # the judge of its evaluation after training
    reevaluated: str | None = None  # when `python -m eval.heldout` scored it again (its figures replace the recorded ones)
    published: dict = field(default_factory=dict)  # its paper's published numbers (config `paper.published`)
    paper: str = ""  # the table and measure those numbers are (config `paper.source`, `paper.metric`)
    table_baselines: list[str] = field(default_factory=list)  # its preset's comparisons (config `paper.table_baselines`)

    @property
    def row(self) -> str | None:
        """The preset row it ran (`row/<table>=<name>`: the names the paper's head-to-heads use)."""
        return next((o.split("=", 1)[1] for o in self.overrides if o.lstrip("+").startswith("row/")), None)

    @property
    def setting(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides
                     if o.split("=", 1)[0].lstrip("+~") not in (GROUPED_AWAY, *OUTPUT_LOCATIONS, *BOOKKEEPING_KEYS))


def run_metrics(summary: dict) -> dict[str, float]:
    """The columns of a finished run's `summary.json`: the last stage's final held-out metrics and the
    judged win rates (also what `train.py` returns to a sweeper as its `objective`)."""
    final = list(summary["stages"].values())[-1]["final_eval"]
    metrics = {name: final[key] for name, key in METRICS.items() if final.get(key) is not None}
    for match, judged in summary.get("judged", {}).items():
        metrics[f"win rate: {match}"] = judged["win_rate"]["rate"]
        if "win_rate_ties_half" in judged:  # the rules judge against correct answers can only tie or lose
            metrics[f"win rate, ties half: {match}"] = judged["win_rate_ties_half"]["rate"]
    return metrics


def reevaluations(run_dir: Path, stage: str) -> Path:
    """Where `python -m eval.heldout` appends its re-evaluations of a run's `stage` (here, not in
    eval.heldout, which imports torch: this module starts without it)."""
    return run_dir / "heldout" / f"{stage}.jsonl"


def latest_reevaluation(folder: Path, summary: dict) -> dict | None:
    """The last stage's latest `python -m eval.heldout` record, if any."""
    path = reevaluations(folder, list(summary["stages"])[-1])
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


def read_run(folder: Path) -> Run:
    """A run folder's overrides, state, seed, final metrics, step and wall time and metric records."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    state_file, config_file = folder / "state.json", folder / "config.yaml"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"state": "failed"}
    run = Run(folder, [str(o) for o in overrides], state["state"])
    if config_file.exists():
        config = OmegaConf.load(config_file)
        run.seed = config.get("seed")
        run.published = OmegaConf.to_container(OmegaConf.select(config, "paper.published", default=None) or OmegaConf.create({}))
        run.table_baselines = [str(b) for b in OmegaConf.select(config, "paper.table_baselines", default=None) or ()]
        run.paper = ": ".join(str(value) for key in ("source", "metric")
                              if (value := OmegaConf.select(config, f"paper.{key}", default=None)) is not None)
    metrics_file, summary_file = folder / "metrics.jsonl", folder / "summary.json"
    if metrics_file.exists():
        run.curves = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if run.state == "finished" and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        run.metrics = run_metrics(summary)
        reevaluation = latest_reevaluation(folder, summary)
        if reevaluation:
            run.metrics = {name: value for name, value in run.metrics.items() if name not in METRICS}
            run.metrics.update({name: reevaluation["metrics"][key] for name, key in METRICS.items() if key in reevaluation["metrics"]})
            run.reevaluated = reevaluation["evaluated_at"]
        run.judge = next((judged.get("judge") for judged in summary.get("judged", {}).values()), None)
        run.wall_s = wall_time(state, config_file)
        run.step_s = step_time(run.curves, list(summary["stages"])[-1])
    return run


def step_time(curves: Sequence[dict], stage: str) -> float | None:
    """Seconds the stage's training steps took (each step's `seconds` in metrics.jsonl): what the
    compared method costs, apart from the SFT model and reference log-probs that the first run of a
    seed makes and its other runs reuse, and apart from evaluations."""
    seconds = [record["seconds"] for record in curves if record.get("stage") == stage and "seconds" in record]
    return sum(seconds) if seconds else None


def wall_time(state: dict, config_file: Path) -> float | None:
    """Seconds the run ran: the sum of its launches as state.json records them (a stopped run
    resumed a day later is not a day longer). Runs written before `launches` existed count from
    their first launch (`started`) to their last state record, and those written before `started`
    existed from config.yaml's file time (written at the first launch)."""
    def seconds(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    if state.get("launches"):
        return sum(seconds(end) - seconds(start) for start, end in state["launches"])
    if "started" in state:
        return seconds(state["updated"]) - seconds(state["started"])
    return seconds(state["updated"]) - config_file.stat().st_mtime if config_file.exists() else None


def expected_jobs(sweep: Path) -> list[list[str]] | None:
    """The override lists of a sweep's jobs, expanded from its `multirun.yaml` as Hydra's basic
    sweeper expands them (the config's `hydra.sweeper.params`, as a preset of config/experiment/
    sets them, then the command line's); None for another sweeper (its jobs are known only by their folders)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = OmegaConf.load(sweep / "multirun.yaml")
    if "BasicSweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_", default="BasicSweeper")):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def run_folders(root: Path) -> list[Path]:
    """Run folders at or under `root`: those holding the run's own config.yaml (not Hydra's copy)."""
    if (root / "config.yaml").exists():
        return [root]
    return sorted(path.parent for path in root.glob("**/config.yaml") if ".hydra" not in path.parts)


def collect(paths: Iterable[Path]) -> list[Run]:
    """Every run under the paths; for a sweep folder also one `missing` row per job without a run."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run or sweep folder")
        found = [read_run(folder) for folder in run_folders(path)]
        jobs = expected_jobs(path) if (path / "multirun.yaml").exists() else None
        if jobs is not None:
            seen = {frozenset(run.overrides) for run in found}
            found += [Run(None, job, "missing") for job in jobs if frozenset(job) not in seen]
        if not found:
            raise FileNotFoundError(f"{path}: holds no run (a run folder has config.yaml and state.json)")
        runs += found
    return runs


@dataclass
class Group:
    """Runs of one setting (their overrides but the seed): mean, spread and count of each metric."""

    setting: tuple[str, ...]
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.state == "finished"]

    def values(self, metric: str) -> list[float]:
        return [run.metrics[metric] for run in self.finished if metric in run.metrics]

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return statistics.fmean(values) if values else math.nan

    def std(self, metric: str) -> float:
        """The sample standard deviation over seeds (0 for a single run)."""
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else (0.0 if values else math.nan)

    def interval(self, metric: str) -> tuple[float, float]:
        return mean_interval(self.values(metric))

    @property
    def published(self) -> dict[str, float]:
        """What the paper reported for this setting (`published_numbers`; the runs share a config)."""
        return published_numbers(self.runs[0].published, self.setting) if self.runs else {}


def same_value(key: object, value: str) -> bool:
    """Whether a `paper.published` key names an override's value (`0.5` is `0.50`)."""
    number = numeric(str(key))
    return str(key) == value or (number is not None and number == numeric(value))


def published_numbers(published: dict, setting: Sequence[str]) -> dict[str, float]:
    """The paper's numbers for a setting: `paper.published` walked down by the setting's override
    values, a level at a time, whatever the order of the levels (`row/rpo_weighting=dpo` -> 72.26;
    `loss=rpo loss.beta=0.5` -> loss, then beta; `row/rpo_armorm=dpo` -> one number per benchmark).
    `{"": number}` for a single number, benchmark -> number for several; {} where the setting
    names no entry (a head-to-head "A vs B" table, or a preset that publishes none)."""
    values = [override.partition("=")[2] for override in setting]
    level, matched = published, False
    while isinstance(level, dict):
        key = next((key for key in level if any(same_value(key, value) for value in values)), None)
        if key is None:
            break
        level, matched = level[key], True
    if not matched:
        return {}
    if isinstance(level, int | float) and not isinstance(level, bool):
        return {"": float(level)}
    if isinstance(level, dict) and level and all(isinstance(v, int | float) and not isinstance(v, bool) for v in level.values()):
        return {str(key): float(value) for key, value in level.items()}
    return {}


def published_keys(groups: Sequence[Group]) -> list[str]:
    """The published numbers' keys, a column each: "" for a single number, else each benchmark."""
    return list(dict.fromkeys(key for group in groups for key in group.published))


def published_header(key: str) -> str:
    return f"published {key}".rstrip()


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95 % confidence interval of the mean (Student's t with n - 1 degrees of freedom: with 3
    seeds it is 2.5 standard deviations wide each side); nan for fewer than 2 values."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return [Group(setting, members) for setting, members in groups.items()]


def metric_names(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in [*METRICS, *run.metrics] if name in run.metrics))


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys (seed aside) that take more than one value across the runs, or that some runs
    lack (the `row/<table>` key of each preset, where runs of two presets meet)."""
    settings = [dict(override.partition("=")[::2] for override in run.setting) for run in runs]
    keys = dict.fromkeys(key for setting in settings for key in setting)
    return [key for key in keys if len({setting.get(key) for setting in settings}) > 1]


def label(setting: Sequence[str], keys: Sequence[str] | None = None) -> str:
    """The overrides of a setting, only those of `keys` (the swept ones) if given."""
    shown = [o for o in setting if keys is None or o.partition("=")[0] in keys]
    return " ".join(shown) or "(no overrides)"


def common_overrides(runs: Sequence[Run]) -> list[str]:
    """Overrides every run shares (printed once above the tables instead of in every row)."""
    shared = set(runs[0].setting) if runs else set()
    for run in runs[1:]:
        shared &= set(run.setting)
    return [o for o in runs[0].setting if o in shared] if runs else []


def mean_time(seconds: Sequence[float | None]) -> float | None:
    known = [value for value in seconds if value is not None]
    return statistics.fmean(known) if known else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def summary_cell(values: Sequence[float], sign: str = "") -> str:
    """`mean ± sd (n)`, with the 95 % interval of the mean where there are repeats (`sign="+"`: the
    mean of differences, signed)."""
    if not values:
        return "-"
    low, high = mean_interval(values)
    interval = f" [{low:{sign}.3f}, {high:{sign}.3f}]" if len(values) > 1 else ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.4f} ± {spread:.4f} ({len(values)}){interval}"


def published_cell(group: Group, key: str) -> str:
    value = group.published.get(key)
    return "-" if value is None else f"{value:.2f}"


def markdown(runs: Sequence[Run], groups: Sequence[Group], versus: Sequence[HeadToHead] = (),
             against: Sequence[Difference] = ()) -> str:
    """The per-setting table (mean ± sd (n) [95 % interval]), the head-to-heads, the differences
    from a baseline, the per-run table and the runs that did not finish."""
    names, keys, common = metric_names(runs), swept_keys(runs), common_overrides(runs)
    published = published_keys(groups)
    lines = [f"Overrides of every run: {' '.join(common) or '(none)'}", ""] if common and keys else []
    lines += ["| setting | runs finished | " + " | ".join([*names, "step time", "wall time", *map(published_header, published)]) + " |",
              "|---|---:|" + "---:|" * (len(names) + 2 + len(published))]
    for group in groups:
        cells = [summary_cell(group.values(n)) for n in names]
        times = [mean_time([getattr(run, kind) for run in group.finished]) for kind in ("step_s", "wall_s")]
        shown = label(group.setting, keys if keys else None)
        papers = [published_cell(group, key) for key in published]
        lines.append(f"| {shown} | {len(group.finished)} / {len(group.runs)} | " + " | ".join(cells)
                     + "".join(f" | {duration(t)}" for t in times) + "".join(f" | {cell}" for cell in papers) + " |")
    if published:
        sources = "; ".join(dict.fromkeys(run.paper for run in runs if run.paper and run.published))
        lines += ["", f"*published*: what the paper reported for the row ({sources}) with its models, data and judge, "
                  "whatever the scale these runs had (`paper.published`)."]
    if versus:
        lines += head_to_head_markdown(versus)
    if against:
        lines += difference_markdown(against, names, keys)
    lines += ["", "| run | seed | state | " + " | ".join(names) + " | step time | wall time |",
              "|---|---:|---|" + "---:|" * (len(names) + 2)]
    for run in runs:
        cells = [f"{run.metrics[n]:.4f}" if n in run.metrics else "-" for n in names]
        lines.append(f"| {run.folder or label(run.overrides)} | {'-' if run.seed is None else run.seed} | {run.state} | "
                     + " | ".join(cells) + f" | {duration(run.step_s)} | {duration(run.wall_s)} |")
    reevaluated = [run for run in runs if run.reevaluated]
    if reevaluated:
        lines += ["", f"Held-out figures of a later evaluation (`python -m eval.heldout`) in place of those recorded, for "
                  f"{len(reevaluated)} of {len(runs)} runs:"]
        lines += [f"- {run.folder}: {run.reevaluated}" for run in reevaluated]
    unfinished = [run for run in runs if run.state != "finished"]
    if unfinished:
        lines += ["", f"{len(unfinished)} of {len(runs)} runs did not finish (left out of the means):"]
        lines += [f"- {run.state}: {run.folder or label(run.overrides)}" for run in unfinished]
    return "\n".join(lines) + "\n"


@dataclass
class HeadToHead:
    """Row `a`'s aligned answers against row `b`'s, seed by seed, and the verdicts pooled."""

    a: str
    b: str
    per_seed: dict[int, dict]  # seed -> eval.judge's summary (counts, rates, intervals)
    pooled: dict
    published: dict[str, list[float]]  # benchmark -> [win, tie, lose] %

    @property
    def seed_counts(self) -> dict[int, str]:
        """seed -> its `wins-ties-losses`."""
        return {seed: f"{s['wins']}-{s['ties']}-{s['losses']}" for seed, s in self.per_seed.items()}


def benchmarks(results: Sequence[HeadToHead]) -> list[str]:
    """The benchmarks any pair has published numbers for (a column each)."""
    return list(dict.fromkeys(benchmark for result in results for benchmark in result.published))


def published_pairs(runs: Sequence[Run]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The paper's "A vs B" comparisons: (A, B) -> benchmark -> published [win, tie, lose] %."""
    pairs: dict[tuple[str, str], dict[str, list[float]]] = {}
    for run in runs:
        for benchmark, entries in run.published.items():
            for name, numbers in (entries.items() if isinstance(entries, dict) else ()):
                if " vs " in name:
                    a, b = name.split(" vs ", 1)
                    pairs.setdefault((a, b), {})[benchmark] = numbers
    return pairs


def head_to_heads(runs: Sequence[Run]) -> list[HeadToHead]:
    """The paper's head-to-heads between rows of these runs, with the `rules` judge (the runs' own:
    it is exact and offline; a model judge is asked with `python -m eval.judge`). A pair is judged
    on the seeds where both rows finished; judgements stay in the row A run's samples folder, so
    a rebuilt table asks nothing again."""
    from eval.after_training import heldout_samples_folder
    from eval.judge import default_output, judge_files
    from eval.judges import RulesJudge
    from eval.sampling import SAMPLES
    from eval.stats import summarize

    judged = {(run.row, run.seed): run for run in runs if run.state == "finished" and run.row and run.judge == "rules"}
    judge, results = RulesJudge(), []
    for (a, b), published in published_pairs(runs).items():
        per_seed = {}
        for seed in sorted(seed for row, seed in judged if row == a and (b, seed) in judged):
            mine, theirs = (heldout_samples_folder(judged[row, seed].folder, "align") / SAMPLES for row in (a, b))
            per_seed[seed] = judge_files(mine, theirs, judge, default_output(mine, str(theirs), judge))
        if per_seed:
            verdicts = [verdict for summary in per_seed.values()
                        for verdict, key in (("A", "wins"), ("tie", "ties"), ("B", "losses"), ("none", "no_verdict"))
                        for _ in range(summary[key])]
            results.append(HeadToHead(a, b, per_seed, summarize(verdicts), published))
    return results


def percent(rate: dict) -> str:
    low, high = rate["ci95"]
    return f"{100 * rate['rate']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def head_to_head_markdown(results: Sequence[HeadToHead]) -> list[str]:
    columns = benchmarks(results)
    lines = ["", "Head to head (rules judge: each seed's aligned answers to the held-out prompts against the same seed's "
             "other row, pooled over seeds; % [95 % Wilson interval]; published: win / tie / lose %):", "",
             "| A vs B | seeds | comparisons | win | tie | lose | per seed (win-tie-lose) | "
             + " | ".join(f"published {b}" for b in columns) + " |",
             "|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(columns)]
    for result in results:
        seeds = ", ".join(f"{seed}: {counts}" for seed, counts in result.seed_counts.items())
        published = [" / ".join(f"{n:g}" for n in result.published[b]) if b in result.published else "-" for b in columns]
        lines.append(f"| {result.a} vs {result.b} | {len(result.per_seed)} | {result.pooled['comparisons']} | "
                     f"{percent(result.pooled['win_rate'])} | {percent(result.pooled['tie_rate'])} | "
                     f"{percent(result.pooled['lose_rate'])} | {seeds} | " + " | ".join(published) + " |")
    return lines


def write_head_to_heads(results: Sequence[HeadToHead], out: Path) -> None:
    columns = benchmarks(results)
    rates = [f"{kind} {part}" for kind in ("win", "tie", "lose") for part in ("rate", "ci95 low", "ci95 high")]
    rows = []
    for result in results:
        cells = [value for kind in ("win", "tie", "lose") for value in (result.pooled[f"{kind}_rate"]["rate"],
                                                                         *result.pooled[f"{kind}_rate"]["ci95"])]
        seeds = " ".join(f"{seed}:{counts}" for seed, counts in result.seed_counts.items())
        published = [" / ".join(map(str, result.published.get(b, []))) for b in columns]
        rows.append([f"{result.a} vs {result.b}", len(result.per_seed), result.pooled["comparisons"], *cells, seeds, *published])
    write_csv(out / "head_to_head.csv", ["pair", "seeds", "comparisons", *rates, "per seed", *(f"published {b}" for b in columns)], rows)


@dataclass
class Difference:
    """A setting's runs minus its baseline setting's (the same overrides but the baseline's key),
    seed by seed: each seed's SFT model and data order are the same on both sides, so the variation
    between seeds that the per-setting intervals carry cancels."""

    setting: tuple[str, ...]
    baseline: str  # the override the baseline setting has instead of this setting's
    seeds: list[int]  # where both settings finished (a seed run more than once counts its mean)
    values: dict[str, list[float]]  # metric -> the setting's value minus the baseline's, one per seed


def compared_value(run: Run, metric: str, other: Run) -> float | None:
    """`run`'s `metric` as compared with `other`'s. A reward accuracy on pairs is each prompt's own
    comparison: a paired run's is an unpaired run's same-prompt reward accuracy, and an unpaired
    run's plain one (every chosen response against every rejected one) is compared with no paired run's."""
    unpaired, other_unpaired = SAME_PROMPT in run.metrics, SAME_PROMPT in other.metrics
    if metric == "reward accuracy" and unpaired != other_unpaired:
        return None
    if metric == SAME_PROMPT and not unpaired and other_unpaired:
        return run.metrics.get("reward accuracy")
    return run.metrics.get(metric)


def by_seed(group: Group) -> dict[int, list[Run]]:
    seeds: dict[int, list[Run]] = {}
    for run in group.finished:
        if run.seed is not None:
            seeds.setdefault(run.seed, []).append(run)
    return seeds


def seed_differences(group: Group, baseline: Group, override: str, names: Sequence[str]) -> Difference:
    mine, theirs = by_seed(group), by_seed(baseline)
    seeds = sorted(set(mine) & set(theirs))
    values: dict[str, list[float]] = {}
    for name in names:
        for seed in seeds:
            pairs = [(compared_value(a, name, b), compared_value(b, name, a)) for a in mine[seed] for b in theirs[seed]]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if pairs:
                values.setdefault(name, []).append(statistics.fmean(a - b for a, b in pairs))
    return Difference(group.setting, override, seeds, values)


def plain_overrides(group: Group) -> frozenset[str]:
    """The setting's overrides without Hydra's `+` and `~` prefixes: how a baseline is matched."""
    return frozenset(o.lstrip("+~") for o in group.setting)


def differences(groups: Sequence[Group], names: Sequence[str], baseline: str) -> list[Difference]:
    """Every setting with another value of the baseline override's key, against the setting that has
    the baseline's value instead (`row/rpo_weighting=dpo`: each row against DPO; with a second swept
    key, each against DPO at its own value of that key). A setting without the key at all (a row of
    another preset: `sr_small`'s rows beside `rpo_weighting_small`'s) is set against the baseline
    setting when only one setting has the baseline override. A setting whose baseline has no finished
    run is a row without seeds, not left out."""
    key, _, value = baseline.lstrip("+~").partition("=")
    wanted = f"{key}={value}"
    settings = {plain_overrides(group): group for group in groups}
    baselines = [group for found, group in settings.items() if wanted in found]
    if not value or not baselines:
        shown = sorted({o for found in settings for o in found if o.partition("=")[0] == key})
        raise ValueError(f"--baseline {baseline}: no run has this override (the runs have: {', '.join(shown) or 'no ' + key})")
    results = []
    for found, group in settings.items():
        own = next((o for o in found if o.partition("=")[0] == key), None)
        if own is None and len(baselines) == 1:
            results.append(seed_differences(group, baselines[0], wanted, names))
        elif own is not None and own != wanted:
            counterpart = settings.get(found - {own} | {wanted})
            results.append(seed_differences(group, counterpart, wanted, names) if counterpart
                           else Difference(group.setting, wanted, [], {}))
    return results


def by_baseline(results: Sequence[Difference]) -> dict[str, list[Difference]]:
    """The differences from each baseline, in the order the baselines were given."""
    found: dict[str, list[Difference]] = {}
    for result in results:
        found.setdefault(result.baseline, []).append(result)
    return found


def difference_markdown(results: Sequence[Difference], names: Sequence[str], keys: Sequence[str]) -> list[str]:
    """A section per baseline."""
    lines = []
    for baseline, rows in by_baseline(results).items():
        lines += ["", f"Against {baseline}, seed by seed (each seed's run minus the same seed's run with {baseline}: mean ± sd "
                  "(seeds) [95 % interval of the mean]; an unpaired run's same-prompt reward accuracy against a paired "
                  "baseline's reward accuracy):", "",
                  "| setting | seeds | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names),
                  *(f"| {label(row.setting, keys or None)} | {', '.join(map(str, row.seeds)) or 'none with the baseline'} | "
                    + " | ".join(summary_cell(row.values.get(name, []), "+") for name in names) + " |" for row in rows)]
    return lines


def write_differences(results: Sequence[Difference], names: Sequence[str], out: Path) -> None:
    columns = [f"{n} {statistic}" for n in names for statistic in ("mean", "sd", "ci95 low", "ci95 high", "n")]
    rows = []
    for result in results:
        cells = []
        for name in names:
            values = result.values.get(name, [])
            cells += [statistics.fmean(values) if values else "", statistics.stdev(values) if len(values) > 1 else "",
                      *mean_interval(values), len(values)]
        rows.append([label(result.setting), result.baseline, " ".join(map(str, result.seeds)), *cells])
    write_csv(out / "versus_baseline.csv", ["setting", "baseline", "seeds", *columns], rows)


def write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(runs: Sequence[Run], groups: Sequence[Group], out: Path, versus: Sequence[HeadToHead] = (),
                 against: Sequence[Difference] = ()) -> None:
    names = metric_names(runs)
    write_csv(out / "runs.csv", ["run", "overrides", "seed", "state", *names, "step_s", "wall_s"],
              ([str(run.folder or ""), " ".join(run.overrides), run.seed, run.state, *(run.metrics.get(n, "") for n in names),
                *("" if value is None else value for value in (run.step_s, run.wall_s))] for run in runs))
    columns = [f"{n} {statistic}" for n in names for statistic in ("mean", "sd", "ci95 low", "ci95 high", "min", "max", "n")]
    published, rows = published_keys(groups), []
    for group in groups:
        cells = []
        for name in names:
            values = group.values(name)
            cells += [group.mean(name), group.std(name), *group.interval(name)]
            cells += [min(values, default=""), max(values, default=""), len(values)]
        rows.append([label(group.setting), len(group.finished), len(group.runs), *cells,
                     *(group.published.get(key, "") for key in published)])
    write_csv(out / "table.csv", ["setting", "runs_finished", "runs", *columns, *map(published_header, published)], rows)
    if versus:
        write_head_to_heads(versus, out)
    if against:
        write_differences(against, names, out)
    (out / "table.md").write_text(markdown(runs, groups, versus, against))


def numeric(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot_against_keys(runs: Sequence[Run], groups: Sequence[Group], out: Path) -> list[Path]:
    """For each swept key: every metric against the key's value, one series per setting of the other
    keys: the mean with error bars of one standard deviation over seeds, and each seed's value as a
    dot; a line joins the means only where the values are numbers (tau, beta), not names (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, written = metric_names(runs), []
    for key in swept_keys(runs):
        lines: dict[str, list[tuple[str, Group]]] = {}
        for group in groups:
            value = next((o.partition("=")[2] for o in group.setting if o.partition("=")[0] == key), None)
            if value is not None:
                others = [k for k in swept_keys(runs) if k != key]
                rest = [o for o in group.setting if o.partition("=")[0] in others]
                lines.setdefault(label(rest), []).append((value, group))
        values = list(dict.fromkeys(v for members in lines.values() for v, _ in members))
        as_numbers = [numeric(v) for v in values]
        position = dict(zip(values, as_numbers, strict=True)) if None not in as_numbers else {v: i for i, v in enumerate(values)}
        columns = min(4, len(names))
        rows = math.ceil(len(names) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows), squeeze=False)
        for axis, name in zip(axes.flat, names, strict=False):
            for number, (line, members) in enumerate(lines.items()):
                members = sorted((m for m in members if m[1].values(name)), key=lambda m: position[m[0]])
                x = [position[v] for v, _ in members]
                axis.errorbar(x, [g.mean(name) for _, g in members], yerr=[g.std(name) for _, g in members], marker="o",
                              capsize=3, color=f"C{number % 10}", linestyle="-" if None not in as_numbers else "none", label=line)
                for where, (_, group) in zip(x, members, strict=True):
                    seeds = group.values(name)
                    axis.scatter([where] * len(seeds), seeds, s=9, color=f"C{number % 10}", alpha=0.45, zorder=3)
            if None in as_numbers:
                axis.set_xticks(range(len(values)), values, rotation=30, fontsize=7)
            axis.set_xlabel(key)
            axis.set_title(name, fontsize=9)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(names):]:
            axis.set_visible(False)
        if len(lines) > 1:
            axes[0][0].legend(fontsize=6)
        figure.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def plot_differences(results: Sequence[Difference], names: Sequence[str], keys: Sequence[str], out: Path) -> Path:
    """Each metric's seed-by-seed differences from each baseline (its own rows of panels): per setting
    the mean with its 95 % interval as a bar, each seed as a dot, and the baseline at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [(rows, [name for name in names if any(row.values.get(name) for row in rows)])
              for rows in by_baseline(results).values()]
    blocks = [(rows, shown) for rows, shown in blocks if shown]
    columns = min(3, max(len(shown) for _, shown in blocks))
    heights = [math.ceil(len(shown) / columns) for _, shown in blocks]
    tallest = max(len(rows) for rows, _ in blocks)
    figure, axes = plt.subplots(sum(heights), columns, figsize=(4.4 * columns, (0.6 * tallest + 1.6) * sum(heights)), squeeze=False)
    used = []
    for (rows, shown), first in zip(blocks, itertools.accumulate([0, *heights]), strict=False):
        for axis, name in zip(axes[first:].flat, shown, strict=False):
            plot_difference_panel(axis, rows, name, keys)
            used.append(axis)
    for axis in axes.flat:
        axis.set_visible(axis in used)
    figure.tight_layout()
    path = out / "versus_baseline.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_difference_panel(axis, rows: Sequence[Difference], name: str, keys: Sequence[str]) -> None:
    for place, row in enumerate(rows):
        values = row.values.get(name, [])
        if values:
            low, high = mean_interval(values)
            mean = statistics.fmean(values)
            if len(values) > 1:
                axis.errorbar([mean], [place], xerr=[[mean - low], [high - mean]], marker="o", capsize=3, color=f"C{place % 10}")
            axis.scatter(values, [place] * len(values), s=10, color=f"C{place % 10}", alpha=0.45, zorder=3)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [label(row.setting, keys or None).replace(" ", "\n") for row in rows], fontsize=7)
    axis.set_title(f"{name}\nminus {rows[0].baseline}", fontsize=8)
    axis.grid(alpha=0.3, axis="x")
    axis.locator_params(axis="x", nbins=5)  # wide intervals otherwise crowd the tick labels into each other
    axis.tick_params(axis="x", labelsize=8)


def plot_curves(runs: Sequence[Run], out: Path) -> Path:
    """Training loss, held-out loss and reward accuracy of every run's last stage (the one the
    sweep compares: alignment after a shared SFT) against the examples that stage has seen; a
    colour per setting, a line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training loss", "loss"), ("held-out loss", "eval/loss"), ("held-out reward accuracy", "eval/rewards/accuracy")]
    keys = swept_keys(runs) or None
    plotted = [run for run in runs if run.curves]
    colours = {setting: f"C{number % 10}" for number, setting in enumerate(dict.fromkeys(run.setting for run in plotted))}
    seeds = {seed: style for seed, style in zip(dict.fromkeys(run.seed for run in plotted), itertools.cycle(["-", "--", ":", "-."]))}
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (title, key) in zip(axes[0], panels, strict=True):
        named = set()  # one legend entry per setting: a colour per setting, a line style per seed
        for run in plotted:
            last = run.curves[-1]["stage"]
            points = [(r["examples"], r[key]) for r in run.curves if r["stage"] == last and key in r]
            if points:
                name = label(run.setting, keys)
                axis.plot(*zip(*points, strict=True), color=colours[run.setting], linestyle=seeds[run.seed], linewidth=1,
                          label=None if name in named else name)
                named.add(name)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("examples seen (last stage)")
        axis.grid(alpha=0.3)
    if plotted:
        axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def is_sweep(path: Path) -> bool:
    """A `-m` sweep's folder, whichever sweeper (grid, Optuna) and launcher (local, submitit) ran it:
    it holds run folders and is not one itself."""
    return path.is_dir() and not (path / "config.yaml").exists() and bool(run_folders(path))


def preset_baselines(runs: Sequence[Run], groups: Sequence[Group]) -> list[str]:
    """The comparisons the runs' presets name (`paper.table_baselines`, in order), those that some
    run has the override of; one that none has (a sweep restricted to other rows) is said and skipped."""
    named = list(dict.fromkeys(baseline for run in runs for baseline in run.table_baselines))
    present = frozenset().union(*map(plain_overrides, groups))
    for baseline in named:
        if baseline.lstrip("+~") not in present:
            print(f"The preset compares with {baseline}, which no run has: that comparison is left out")
    return [baseline for baseline in named if baseline.lstrip("+~") in present]


def build_table(paths: Sequence[Path], out: Path | None = None, baseline: str | Sequence[str] | None = None) -> Path:
    """Collect the runs, write the tables and plots into `out` (the first path if it is a sweep
    folder, else the current folder), with each setting's seed-by-seed differences from the setting
    that has the `baseline` override (`key=value`; or each of several); by default (None) those the
    runs' presets name, an empty list for none; return the markdown table's path."""
    runs = collect(paths)
    groups, names = group_runs(runs), metric_names(runs)
    if baseline is None:
        baselines = preset_baselines(runs, groups)
    else:
        baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    against = [result for each in baselines for result in differences(groups, names, each)]
    out = Path(out or (paths[0] if len(paths) == 1 and is_sweep(Path(paths[0])) else "."))
    out.mkdir(parents=True, exist_ok=True)
    write_tables(runs, groups, out, head_to_heads(runs), against)
    plot_against_keys(runs, groups, out)
    plot_curves(runs, out)
    if any(result.values for result in against):
        plot_differences(against, names, swept_keys(runs), out)
    return out / "table.md"


class SweepTable(Callback):
    """Hydra callback (config/config.yaml): when a `-m` sweep ends, build its table and say where."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not is_sweep(sweep):
            return
        try:
            table = build_table([sweep])
        except Exception as error:  # a table that cannot be built must not hide the sweep's own outcome
            print(f"Sweep table: not built ({type(error).__name__}: {error}); run python -m eval.table {sweep}")
            return
        print(f"\nSweep table: {table} (python -m eval.table {sweep})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder (outputs/multirun/<time>) or run folders")
    parser.add_argument("--out", type=Path, help="where to write the tables and plots (default: the sweep folder, else .)")
    parser.add_argument("--baseline", metavar="KEY=VALUE", action="append",
                        help="add each setting's seed-by-seed differences from the one with this override instead "
                             "(e.g. row/rpo_weighting=dpo; versus_baseline.csv); may be given more than once; "
                             "default: those the runs' presets name (paper.table_baselines); `none`: no comparison")
    args = parser.parse_args(argv)
    baselines = None if args.baseline is None else [b for b in args.baseline if b != "none"]
    try:
        table = build_table(args.paths, args.out, baselines)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(table.read_text())
    print(f"Written: {table}, {table.with_name('table.csv')}, {table.with_name('runs.csv')} and the plots beside them")


if __name__ == "__main__":
    main()
