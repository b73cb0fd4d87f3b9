"""eval.table: a sweep folder becomes per-run and per-setting tables (mean, spread, count over
seeds), plots against the swept key and the training curves; failed and missing jobs are rows."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval.table import Difference, build_table, collect, plot_difference_panel, published_numbers, read_run

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = {("0.25", 0): 0.5, ("0.25", 1): 0.75, ("0.25", 2): 1.0, ("0.5", 0): 0.25}  # finished jobs: (tau, seed) -> accuracy
FAILED, MISSING = ("0.5", 1), ("0.5", 2)  # a job that failed mid-run, and one that left no folder (refused at start)


def write_job(sweep: Path, number: int, tau: str, seed: int, extra: tuple[str, ...] = ()) -> None:
    folder = sweep / f"{number}_rpo_tiny"
    (folder / ".hydra").mkdir(parents=True)
    overrides = ["model=tiny", f"loss.tau={tau}", f"seed={seed}", *extra]
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"seed": seed, "loss": {"tau": float(tau)}}), folder / "config.yaml")
    if (tau, seed) == FAILED:
        (folder / "state.json").write_text(json.dumps({"state": "failed", "updated": "2026-12-03T10:00:00"}))
        return
    accuracy = ACCURACY[(tau, seed)]
    final = {"loss": 1 - accuracy / 2, "rewards/accuracy": accuracy, "rewards/margin": 2 * accuracy, "logp_accuracy": accuracy,
             "logps/chosen": -10 * accuracy}
    summary = {"stages": {"sft": {"final_eval": {"loss": 9.0, "logp_accuracy": 0.0}}, "align": {"final_eval": final}}}
    if seed == 0:
        summary["judged"] = {"align vs chosen": {"win_rate": {"rate": accuracy / 4}, "win_rate_ties_half": {"rate": accuracy / 2}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "state.json").write_text(json.dumps({"state": "finished", "updated": "2026-12-03T10:00:00"}))
    records = [{"stage": "sft", "examples": 8, "loss": 2.0, "seconds": 100.0},
               {"stage": "align", "examples": 0, "eval/rewards/accuracy": 0.0},
               {"stage": "align", "examples": 8, "loss": 0.6, "eval/loss": 0.7, "eval/rewards/accuracy": accuracy, "seconds": 20.0 + seed}]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A finished two-by-three sweep as train.py -m leaves it: multirun.yaml and one folder per job."""
    folder = tmp_path / "multirun" / "2026-12-03_10-00-00"
    folder.mkdir(parents=True)
    multirun = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                          "overrides": {"task": ["model=tiny", "loss.tau=0.25,0.5", "seed=0,1,2"]}}}
    OmegaConf.save(OmegaConf.create(multirun), folder / "multirun.yaml")
    for number, (tau, seed) in enumerate((tau, seed) for tau in ("0.25", "0.5") for seed in range(3)):
        if (tau, seed) != MISSING:
            write_job(folder, number, tau, seed)
    return folder


def rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_every_expected_job_is_a_row_failed_and_missing_ones_too(sweep):
    runs = collect([sweep])
    states = {(next(o for o in run.overrides if o.startswith("loss.tau")), run.state) for run in runs}
    assert len(runs) == 6
    assert sum(run.state == "finished" for run in runs) == 4
    assert ("loss.tau=0.5", "failed") in states and ("loss.tau=0.5", "missing") in states


def test_the_setting_table_has_mean_spread_and_count_over_seeds(sweep):
    table = build_table([sweep])
    assert table == sweep / "table.md"
    settings = {row["setting"]: row for row in rows(sweep / "table.csv")}
    assert set(settings) == {"model=tiny loss.tau=0.25", "model=tiny loss.tau=0.5"}
    full, partial = settings["model=tiny loss.tau=0.25"], settings["model=tiny loss.tau=0.5"]
    values = [ACCURACY[("0.25", seed)] for seed in range(3)]
    assert float(full["reward accuracy mean"]) == pytest.approx(statistics.fmean(values))
    assert float(full["reward accuracy sd"]) == pytest.approx(statistics.stdev(values))
    half = 4.302653 * statistics.stdev(values) / 3**0.5  # t(0.975, 2 degrees of freedom), from a printed t table
    assert float(full["reward accuracy ci95 low"]) == pytest.approx(statistics.fmean(values) - half, abs=1e-5)
    assert float(full["reward accuracy ci95 high"]) == pytest.approx(statistics.fmean(values) + half, abs=1e-5)
    assert (full["reward accuracy min"], full["reward accuracy max"], full["reward accuracy n"]) == ("0.5", "1.0", "3")
    assert float(full["margin mean"]) == pytest.approx(2 * statistics.fmean(values))
    assert float(full["chosen log-prob mean"]) == pytest.approx(-10 * statistics.fmean(values))
    assert float(full["loss mean"]) == pytest.approx(1 - statistics.fmean(values) / 2)  # the last stage's, not the SFT's
    assert (partial["runs_finished"], partial["runs"], partial["reward accuracy n"]) == ("1", "3", "1")
    assert partial["reward accuracy ci95 low"] == "nan"  # one run has no interval
    assert float(partial["reward accuracy mean"]) == pytest.approx(0.25)  # the failed job is left out, not counted as 0
    assert float(full["win rate: align vs chosen mean"]) == pytest.approx(0.5 / 4)  # judged: seed 0 only
    assert float(full["win rate, ties half: align vs chosen mean"]) == pytest.approx(0.5 / 2)
    markdown = table.read_text()
    # the override every run shares is said once; a setting's row names the swept key; loss, then reward accuracy
    assert markdown.startswith("Overrides of every run: model=tiny\n")
    assert "| loss.tau=0.25 | 3 / 3 | 0.6250 ± 0.1250 (3) [0.314, 0.936] | 0.7500 ± 0.2500 (3) [0.129, 1.371] |" in markdown
    assert "| loss.tau=0.5 | 1 / 3 | 0.8750 ± 0.0000 (1) | 0.2500 ± 0.0000 (1) |" in markdown
    assert "2 of 6 runs did not finish" in markdown
    assert "- missing: model=tiny loss.tau=0.5 seed=2" in markdown and "- failed: " in markdown


def test_a_preset_sweeps_jobs_from_its_config_not_the_command_line(sweep):
    """`-m +experiment=<preset>` takes its swept values from `hydra.sweeper.params`: the missing job
    is still found, and a command-line value of the same key replaces the preset's (Hydra's rule)."""
    multirun = OmegaConf.load(sweep / "multirun.yaml")
    multirun.hydra.sweeper.params = {"loss.tau": "0.25,0.5", "seed": "7"}
    multirun.hydra.overrides.task = ["model=tiny", "seed=0,1,2"]
    OmegaConf.save(multirun, sweep / "multirun.yaml")
    runs = collect([sweep])
    missing = [sorted(run.overrides) for run in runs if run.state == "missing"]
    assert len(runs) == 6 and missing == [["loss.tau=0.5", "model=tiny", "seed=2"]]


def test_runs_csv_has_one_row_per_job_with_its_seed_and_state(sweep):
    build_table([sweep])
    table = rows(sweep / "runs.csv")
    assert len(table) == 6
    finished = [row for row in table if row["state"] == "finished"]
    assert sorted(float(row["reward accuracy"]) for row in finished) == sorted(ACCURACY.values())
    assert {row["seed"] for row in table if row["state"] == "missing"} == {""}


def test_the_plots_are_written(sweep):
    build_table([sweep])
    for name in ("loss.tau.png", "curves.png"):
        data = (sweep / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name


def test_run_folders_without_a_sweep_make_a_table_where_asked(sweep, tmp_path):
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    table = build_table(folders[:2], tmp_path / "out")
    assert table == tmp_path / "out" / "table.md"
    assert len(rows(tmp_path / "out" / "runs.csv")) == 2


def test_runs_that_differ_only_in_where_they_were_written_are_one_setting(tmp_path):
    """Seeds run as separate sweeps into separate runs_root folders (two machines, say), one of them
    checkpointing more often, are repeats of one setting: neither is part of what a run computes."""
    for seed, root in enumerate(("/scratch/a", "/scratch/b", "/scratch/b")):
        saving = ("train.save_every=128",) if seed else ()
        write_job(tmp_path / f"sweep{seed}", 0, "0.25", seed, (f"runs_root={root}", f"hydra.sweep.dir={root}/{seed}", *saving))
    build_table(sorted(tmp_path.glob("sweep*/0_rpo_tiny")), tmp_path / "out")
    settings = rows(tmp_path / "out" / "table.csv")
    assert [(row["setting"], row["reward accuracy n"]) for row in settings] == [("model=tiny loss.tau=0.25", "3")]


def test_wall_time_is_the_runs_own_record_not_a_file_time(sweep, tmp_path):
    """A run folder copied without its file times (git, rsync without -t) keeps its wall time:
    from the first launch recorded in state.json; older runs fall back on config.yaml's time."""
    copied = tmp_path / "copied"
    shutil.copytree(sweep / "0_rpo_tiny", copied)  # copytree keeps times: touch config.yaml as git would
    os.utime(copied / "config.yaml")
    state = json.loads((copied / "state.json").read_text())
    (copied / "state.json").write_text(json.dumps({**state, "started": "2026-12-03T08:59:30"}))
    assert read_run(copied).wall_s == 3630
    os.utime(copied / "config.yaml", (0, time.mktime(time.strptime("2026-12-03T09:30:00", "%Y-%m-%dT%H:%M:%S"))))
    (copied / "state.json").write_text(json.dumps(state))
    assert read_run(copied).wall_s == 1800


def test_step_time_is_the_last_stages_training_steps_alone(sweep, tmp_path):
    """What the compared method costs: the SFT stage (trained by one run of a seed, reused by the
    others) and the evaluations are left out."""
    assert read_run(sweep / "0_rpo_tiny").step_s == 20.0
    build_table([sweep], tmp_path / "out")
    assert [row["step_s"] for row in rows(tmp_path / "out" / "runs.csv")] == ["20.0", "21.0", "22.0", "20.0", "", ""]
    assert "| loss.tau=0.25 | 3 / 3 |" in (tmp_path / "out" / "table.md").read_text()
    assert "| 21 s | " in (tmp_path / "out" / "table.md").read_text()  # the mean of the setting's three runs


def test_wall_time_is_the_sum_of_the_launches_not_the_wait_between_them(sweep):
    """A run stopped (preempted) and resumed three hours later ran 30 + 10 minutes, not 3 h 10."""
    folder = sweep / "0_rpo_tiny"
    state = json.loads((folder / "state.json").read_text())
    launches = [["2026-12-03T08:00:00", "2026-12-03T08:30:00"], ["2026-12-03T11:00:00", "2026-12-03T11:10:00"]]
    (folder / "state.json").write_text(json.dumps({**state, "started": "2026-12-03T08:00:00", "updated": "2026-12-03T11:10:00",
                                                   "launches": launches}))
    assert read_run(folder).wall_s == 2400


def test_the_command_line_prints_the_table_and_refuses_a_missing_folder(sweep, tmp_path):
    command = [sys.executable, "-m", "eval.table"]
    result = subprocess.run([*command, str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| loss.tau=0.25 | 3 / 3 |" in result.stdout and "table.csv" in result.stdout
    result = subprocess.run([*command, str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nowhere: no such run or sweep folder" in result.stderr


PUBLISHED = {"mt_bench": {"sr_dpo vs dpo": [45.62, 33.76, 20.62], "sr_ipo vs ipo": [38.75, 25.0, 26.25]}}
QUESTIONS = [f"What is {i} plus 10?" for i in range(4)]
CORRECT = {("sr_dpo", 1): {0, 1, 2, 3}, ("dpo", 1): {0, 1}, ("sr_dpo", 2): {0}, ("dpo", 2): {0, 1, 2}}  # prompts answered right


def write_row_job(sweep: Path, number: int, row: str, seed: int, judge: str = "rules") -> Path:
    """A finished job of a preset row, judged after training, with its aligned answers to QUESTIONS."""
    folder = sweep / f"{number}_{row}"
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"row/sr={row}", f"seed={seed}"]), folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"seed": seed, "paper": {"preset": "sr", "published": PUBLISHED}}), folder / "config.yaml")
    samples = folder / "samples" / "align_heldout" / "samples.jsonl"
    samples.parent.mkdir(parents=True)
    answers = [f"It is {i + 10 if i in CORRECT[row, seed] else i + 11}." for i in range(len(QUESTIONS))]
    samples.write_text("".join(json.dumps({"id": f"demo-{i}", "prompt": [{"role": "user", "content": question}],
                                           "response": answer, "chosen": f"It is {i + 10}."}) + "\n"
                               for i, (question, answer) in enumerate(zip(QUESTIONS, answers, strict=True))))
    summary = {"stages": {"align": {"final_eval": {"rewards/accuracy": 0.5}}},
               "judged": {"align vs chosen": {"judge": judge, "win_rate": {"rate": 0.0}}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "state.json").write_text(json.dumps({"state": "finished", "updated": "2026-12-03T10:00:00"}))
    return folder


def test_rows_the_paper_compares_are_judged_head_to_head_seed_by_seed(tmp_path):
    """Sr's tables are "Sr-DPO vs DPO" win / tie / lose: the rules judge compares each seed's two
    rows prompt by prompt, the counts are pooled over seeds, the published numbers stand beside;
    a pair whose rows did not run (sr_ipo vs ipo) is no row."""
    sweep = tmp_path / "sweep"
    for number, (row, seed) in enumerate(CORRECT):
        write_row_job(sweep, number, row, seed)
    table = build_table([sweep]).read_text()
    (pair,) = rows(sweep / "head_to_head.csv")
    # seed 1: sr_dpo right on 2 and 3 where dpo is wrong (2 wins), both right on 0 and 1; seed 2: dpo right on 1 and 2 (2 losses)
    assert (pair["pair"], pair["seeds"], pair["comparisons"], pair["per seed"]) == ("sr_dpo vs dpo", "2", "8", "1:2-2-0 2:0-2-2")
    assert (float(pair["win rate"]), float(pair["tie rate"]), float(pair["lose rate"])) == (0.25, 0.5, 0.25)
    assert pair["published mt_bench"] == "45.62 / 33.76 / 20.62"
    wilson = {2: "25.0 [7.1, 59.1]", 4: "50.0 [21.5, 78.5]"}  # of k in 8, by hand: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert f"| sr_dpo vs dpo | 2 | 8 | {wilson[2]} | {wilson[4]} | {wilson[2]} | 1: 2-2-0, 2: 0-2-2 | 45.62 / 33.76 / 20.62 |" in table
    judged = list((sweep / "0_sr_dpo" / "samples").rglob("judged_rules_vs_*/judgements.jsonl"))
    assert len(judged) == 1 and len(judged[0].read_text().splitlines()) == 4  # kept beside row A's answers


def test_head_to_heads_need_the_rules_judge_the_runs_were_judged_by(tmp_path):
    """Runs judged by a model judge (an API) are not judged again by the table: no head-to-head."""
    sweep = tmp_path / "sweep"
    for number, (row, seed) in enumerate(CORRECT):
        write_row_job(sweep, number, row, seed, judge="openai")
    assert "Head to head" not in build_table([sweep]).read_text()
    assert not (sweep / "head_to_head.csv").exists()


BASELINE_ACCURACY = {1: 0.60, 2: 0.70, 3: 0.65}  # dpo's reward accuracy by seed: seeds differ by far more than rows
PAIRED_GAIN = {1: 0.01, 2: 0.03}  # paired minus dpo; seed 3's paired run failed
SAME_PROMPT_GAIN = {1: -0.02, 2: 0.00, 3: 0.04}  # unpaired's same-prompt reward accuracy minus dpo's reward accuracy


def write_weighting_run(root: Path, row: str, seed: int, final: dict, state: str = "finished", table: str = "rpo_weighting") -> None:
    folder = root / f"s{seed}_{row}"
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"+experiment={table}_small", f"seed={seed}", f"row/{table}={row}"]),
                   folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"seed": seed}), folder / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"stages": {"align": {"final_eval": final}}}))
    (folder / "state.json").write_text(json.dumps({"state": state, "launches": [["2026-12-03T09:00:00", "2026-12-03T10:00:00"]]}))


@pytest.fixture
def weighting_runs(tmp_path) -> Path:
    """Table 1's dpo, paired and unpaired rows over three seeds, as hh_runs/ holds them."""
    root = tmp_path / "rpo_weighting_small"
    for seed, accuracy in BASELINE_ACCURACY.items():
        write_weighting_run(root, "dpo", seed, {"rewards/accuracy": accuracy, "logp_accuracy": 0.6, "rewards/margin": 0.16})
        write_weighting_run(root, "paired", seed, {"rewards/accuracy": accuracy + PAIRED_GAIN.get(seed, 0), "logp_accuracy": 0.6,
                                                    "rewards/margin": 0.16 + 2 * PAIRED_GAIN.get(seed, 0)},
                            "finished" if seed in PAIRED_GAIN else "failed")
        write_weighting_run(root, "unpaired", seed, {"rewards/accuracy": 0.5, "rewards/margin": 0.2,
                                                      "rewards/accuracy_same_prompt": accuracy + SAME_PROMPT_GAIN[seed]})
    return root


def test_a_baseline_row_is_subtracted_seed_by_seed(weighting_runs, tmp_path):
    """`--baseline row/rpo_weighting=dpo`: each row minus the same seed's DPO run, with the mean,
    spread and t interval of those differences; a seed where either side did not finish is left out
    of that row (and named); an unpaired row's same-prompt reward accuracy is set against DPO's
    reward accuracy, and its all-against-all reward accuracy against nothing."""
    table = build_table(sorted(weighting_runs.iterdir()), tmp_path / "out", "row/rpo_weighting=dpo").read_text()
    versus = {row["setting"]: row for row in rows(tmp_path / "out" / "versus_baseline.csv")}
    paired = versus["+experiment=rpo_weighting_small row/rpo_weighting=paired"]
    gains = list(PAIRED_GAIN.values())
    assert paired["seeds"] == "1 2" and paired["reward accuracy n"] == "2"
    assert float(paired["reward accuracy mean"]) == pytest.approx(statistics.fmean(gains))
    assert float(paired["reward accuracy sd"]) == pytest.approx(statistics.stdev(gains))
    half = 12.7062 * statistics.stdev(gains) / 2**0.5  # t(0.975, 1 degree of freedom), from a printed t table
    assert float(paired["reward accuracy ci95 low"]) == pytest.approx(statistics.fmean(gains) - half, abs=1e-4)
    assert float(paired["margin mean"]) == pytest.approx(2 * statistics.fmean(gains))
    assert float(paired["preference accuracy mean"]) == pytest.approx(0.0)
    unpaired = versus["+experiment=rpo_weighting_small row/rpo_weighting=unpaired"]
    same_prompt = list(SAME_PROMPT_GAIN.values())
    assert unpaired["seeds"] == "1 2 3" and unpaired["reward accuracy n"] == "0"
    assert float(unpaired["same-prompt reward accuracy mean"]) == pytest.approx(statistics.fmean(same_prompt))
    assert float(unpaired["same-prompt reward accuracy sd"]) == pytest.approx(statistics.stdev(same_prompt))
    assert "row/rpo_weighting=dpo" not in versus  # the baseline is no row of its own
    assert "Against row/rpo_weighting=dpo, seed by seed" in table
    assert "| row/rpo_weighting=paired | 1, 2 | +0.0200 ± 0.0141 (2) [-0.107, +0.147] |" in table
    plot = (tmp_path / "out" / "versus_baseline.png").read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 10_000


def test_a_baseline_no_run_has_is_refused_by_the_command_line(weighting_runs, tmp_path):
    command = [sys.executable, "-m", "eval.table", *map(str, sorted(weighting_runs.iterdir())), "--out", str(tmp_path / "out")]
    result = subprocess.run([*command, "--baseline", "row/rpo_weighting=ipo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--baseline row/rpo_weighting=ipo: no run has this override" in result.stderr
    assert "row/rpo_weighting=dpo, row/rpo_weighting=paired, row/rpo_weighting=unpaired" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written
    result = subprocess.run([*command, "--baseline", "row/rpo_weighting=dpo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| row/rpo_weighting=unpaired | 1, 2, 3 | - | +0.0400 ± 0.0000 (3) [+0.040, +0.040] | - | +0.0067 ± 0.0306 (3) " in result.stdout


SR_DPO_GAIN = {1: 0.02, 2: 0.01, 3: 0.03}  # sr_dpo minus rpo_weighting's dpo (the same training as sr's dpo)
SR_IPO_GAIN = {1: 0.00, 2: 0.01, 3: -0.01}  # sr_ipo minus ipo
IPO_ACCURACY = {1: 0.55, 2: 0.66, 3: 0.61}


def test_rows_of_another_preset_are_set_against_the_one_baseline_and_baselines_repeat(weighting_runs, tmp_path):
    """`sr_small`'s rows (no `row/rpo_weighting` key) beside `rpo_weighting_small`'s DPO runs, with
    `--baseline row/rpo_weighting=dpo --baseline row/sr=ipo`: Sr-DPO, IPO and Sr-IPO minus DPO seed by
    seed, Sr-DPO and Sr-IPO minus IPO (and DPO minus IPO, the DPO runs having no `row/sr`), a section
    of table.md and rows of versus_baseline.csv for each baseline."""
    root = tmp_path / "sr_small"
    for seed, dpo in BASELINE_ACCURACY.items():
        accuracies = {"sr_dpo": dpo + SR_DPO_GAIN[seed], "ipo": IPO_ACCURACY[seed], "sr_ipo": IPO_ACCURACY[seed] + SR_IPO_GAIN[seed]}
        for row, accuracy in accuracies.items():
            write_weighting_run(root, row, seed, {"rewards/accuracy": accuracy, "rewards/margin": 0.1}, table="sr")
    runs = [*sorted(root.iterdir()), *sorted(weighting_runs.glob("*_dpo"))]
    command = [sys.executable, "-m", "eval.table", *map(str, runs), "--out", str(tmp_path / "out"),
               "--baseline", "row/rpo_weighting=dpo", "--baseline", "row/sr=ipo"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    versus = {(row["setting"], row["baseline"]): row for row in rows(tmp_path / "out" / "versus_baseline.csv")}
    def mean(row: str, table: str, baseline: str) -> float:
        found = versus[(f"+experiment={table}_small row/{table}={row}", baseline)]
        assert found["seeds"] == "1 2 3"
        return float(found["reward accuracy mean"])
    assert mean("sr_dpo", "sr", "row/rpo_weighting=dpo") == pytest.approx(statistics.fmean(SR_DPO_GAIN.values()))
    assert mean("sr_ipo", "sr", "row/sr=ipo") == pytest.approx(statistics.fmean(SR_IPO_GAIN.values()))
    dpo_minus_ipo = [BASELINE_ACCURACY[seed] - IPO_ACCURACY[seed] for seed in BASELINE_ACCURACY]
    assert mean("dpo", "rpo_weighting", "row/sr=ipo") == pytest.approx(statistics.fmean(dpo_minus_ipo))
    assert len(versus) == 6  # sr_dpo, ipo, sr_ipo against DPO; sr_dpo, sr_ipo, dpo against IPO
    assert "Against row/rpo_weighting=dpo, seed by seed" in result.stdout
    assert "Against row/sr=ipo, seed by seed" in result.stdout
    assert "| +experiment=rpo_weighting_small row/rpo_weighting=dpo | 1, 2, 3 |" in result.stdout  # its row key shown


def test_the_presets_baselines_are_the_default_and_none_turns_them_off(weighting_runs, tmp_path):
    """Runs whose preset names `paper.table_baselines` are compared with those rows without
    `--baseline` (as in the table a `-m` sweep ends with); a baseline no run has is said and left
    out; `--baseline none` gives the table alone."""
    for config in weighting_runs.glob("*/config.yaml"):
        settings = OmegaConf.load(config)
        settings.paper = {"table_baselines": ["row/rpo_weighting=dpo", "row/rpo_weighting=uniform"]}
        OmegaConf.save(settings, config)
    command = [sys.executable, "-m", "eval.table", *map(str, sorted(weighting_runs.iterdir()))]
    result = subprocess.run([*command, "--out", str(tmp_path / "preset")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The preset compares with row/rpo_weighting=uniform, which no run has" in result.stdout
    versus = {row["setting"]: row for row in rows(tmp_path / "preset" / "versus_baseline.csv")}
    assert {row["baseline"] for row in versus.values()} == {"row/rpo_weighting=dpo"}
    paired = versus["+experiment=rpo_weighting_small row/rpo_weighting=paired"]
    assert float(paired["reward accuracy mean"]) == pytest.approx(statistics.fmean(PAIRED_GAIN.values()))
    assert "Against row/rpo_weighting=dpo, seed by seed" in result.stdout
    result = subprocess.run([*command, "--out", str(tmp_path / "none"), "--baseline", "none"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Against" not in result.stdout and not (tmp_path / "none" / "versus_baseline.csv").exists()
    assert (tmp_path / "none" / "table.csv").exists()


def test_a_wide_interval_leaves_the_tick_labels_apart():
    """A panel of the differences plot as `plot_differences` lays out RPO Table 1 on HH (six panels,
    four rows each) whose interval spans 0.13 (unpaired RPO's same-prompt accuracy) keeps its tick
    labels from running into each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "same-prompt reward accuracy"
    rows = [Difference(("+experiment=rpo_weighting_small", f"row/rpo_weighting={row}"), "row/rpo_weighting=dpo", [1, 2, 3],
                       {name: [-0.0204, -0.0243, 0.0223]} if row == "unpaired" else {})
            for row in ("diagonal", "paired", "uniform", "unpaired")]
    figure, axes = plt.subplots(2, 3, figsize=(13.2, 8.0), squeeze=False)
    for axis in axes.flat:
        plot_difference_panel(axis, rows, name, ["row/rpo_weighting"])
    figure.tight_layout()
    renderer, panel = figure.canvas.get_renderer(), axes[1, 2]
    low, high = panel.get_xlim()
    boxes = [label.get_window_extent(renderer) for label in panel.get_xticklabels()
             if label.get_visible() and label.get_text() and low <= label.get_position()[0] <= high]
    plt.close(figure)
    assert len(boxes) >= 3
    assert all(left.x1 < right.x0 for left, right in itertools.pairwise(sorted(boxes, key=lambda box: box.x0)))


PAPER_NUMBERS = [  # preset, a setting's overrides, what the paper reported for it (config/paper/<preset>.yaml)
    ("rpo_weighting", ["+experiment=rpo_weighting_small", "row/rpo_weighting=unpaired"], {"": 75.00}),
    ("rpo_group", ["row/rpo_group=g4"], {"": 74.60}),
    ("rpo_beta", ["loss=rpo", "loss.beta=0.50"], {"": 68.36}),  # loss, then beta; 0.50 is the table's "0.5"
    ("rpo_tau", ["loss.tau=0.25", "row/rpo_tau=t5_large"], {"": 67.38}),  # the levels in either order
    ("rpo_methods", ["loss=kto", "row/rpo_methods_setting=hh_llama2_13b"], {"": 71.48}),
    ("rpo_armorm", ["row/rpo_armorm=simpo"], {"open_llm": 70.07, "alpaca_eval2_lc": 42.19, "mt_bench": 7.21, "arena_hard": 37.20}),
    ("rpo_unpaired_llama3", ["loss=rpo_unpaired", "row/rpo_unpaired_llama3=ultrafeedback"],
     {"open_llm": 70.53, "alpaca_eval2_lc": 28.92, "mt_bench": 7.11, "arena_hard": 18.4}),
    ("sr_zephyr", ["row/sr=sr_ipo", "seed=1"], {"": 62.51}),
    ("sr", ["row/sr=sr_dpo"], {}),  # head-to-heads only: the head-to-head table shows those
    ("rpo_weighting", ["row/rpo_weighting=ipo"], {}),  # a row the table does not have
]


@pytest.mark.parametrize(("preset", "setting", "expected"), PAPER_NUMBERS)
def test_a_setting_finds_what_its_paper_published_for_it(preset, setting, expected):
    published = OmegaConf.to_container(OmegaConf.load(ROOT / "config" / "paper" / f"{preset}.yaml").published)
    assert published_numbers(published, setting) == pytest.approx(expected)


def set_paper(configs: Iterable[Path], paper: str) -> None:
    """Give runs' saved configs the `paper` block of config/paper/<paper>.yaml."""
    for config in configs:
        settings = OmegaConf.load(config)
        settings.paper = OmegaConf.load(ROOT / "config" / "paper" / f"{paper}.yaml")
        OmegaConf.save(settings, config)


def test_the_table_puts_the_published_numbers_beside_each_row(weighting_runs, tmp_path):
    """table.md and table.csv carry the paper's number for each row, and say whose they are; runs
    whose preset publishes none have no such column."""
    build_table(sorted(weighting_runs.iterdir()), tmp_path / "plain", [])
    assert "published" not in (tmp_path / "plain" / "table.md").read_text()
    set_paper(weighting_runs.glob("*/config.yaml"), "rpo_weighting")
    table = build_table(sorted(weighting_runs.iterdir()), tmp_path / "out", []).read_text()
    header, _, *lines = table.splitlines()[2:7]
    assert header.endswith("| step time | wall time | published |")
    by_row = {line.split(" | ")[0].removeprefix("| "): line for line in lines}
    assert by_row["row/rpo_weighting=dpo"].endswith("| 72.26 |")
    assert by_row["row/rpo_weighting=unpaired"].endswith("| 75.00 |")
    assert "*published*: what the paper reported for the row (RPO v1 (Yin et al., 2024), Table 1: win rate vs chosen (%))" in table
    published = {row["setting"]: row["published"] for row in rows(tmp_path / "out" / "table.csv")}
    assert published["+experiment=rpo_weighting_small row/rpo_weighting=paired"] == "78.52"
    set_paper(weighting_runs.glob("*_dpo/config.yaml"), "rpo_group")  # DPO's runs from another table: two papers, each named once
    table = build_table(sorted(weighting_runs.iterdir()), tmp_path / "two", []).read_text()
    assert ("*published*: what the paper reported for the row (RPO v1 (Yin et al., 2024), Table 3: win rate vs chosen (%); "
            "RPO v1 (Yin et al., 2024), Table 1: win rate vs chosen (%))") in table
