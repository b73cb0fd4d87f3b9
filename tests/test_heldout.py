"""Held-out splits: chosen by the data's own seed (never the run's), by prompt (no prompt on both
sides), leaks between a dataset's own splits reported, and recorded in config.yaml and summary.json."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import train
from eval.heldout import main as heldout_main
from eval.table import group_runs, markdown, read_run
from preference_datasets import DataError, load_datasets, load_jsonl, load_tldr, load_ultrafeedback_unpaired, prompt_key
from tests.conftest import ROOT
from tests.test_eval import cli
from tests.test_loaders import TLDR_HUB, comparison, write_lines


def prompts(examples) -> set[str]:
    return {prompt_key(example) for example in examples}


def test_repeated_tldr_posts_land_on_one_side(tmp_path):
    """TL;DR validation batches only: each post has several summary pairs."""
    rows = [comparison(f"post{i % 7}", "valid1", (f"summary {i}", f"other {i}"), i % 2) for i in range(35)]
    write_lines(tmp_path / "batch20.json", rows)
    for seed in range(5):
        splits = load_tldr({"hub_name": TLDR_HUB, "path": str(tmp_path), "holdout": 8, "seed": seed})
        assert not prompts(splits["train"]) & prompts(splits["test"])
        assert len(splits["test"]) == 10 and len(splits["train"]) == 25  # two whole posts of five pairs


def test_repeated_unpaired_prompts_land_on_one_side(tmp_path):
    """An unpaired set: four labelled responses per prompt."""
    rows = [{"prompt": f"question {i % 9}?", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(36)]
    path = write_lines(tmp_path / "kto.jsonl", rows)
    for seed in range(5):
        splits = load_ultrafeedback_unpaired({"hub_name": "unused", "path": str(path), "holdout": 6, "seed": seed})
        assert not prompts(splits["train"]) & prompts(splits["test"])
        assert len(splits["test"]) == 8


def test_the_data_seed_chooses_the_held_out_prompts(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    path = write_lines(tmp_path / "pairs.jsonl", rows)
    options = {"train_path": str(path), "test_path": None, "holdout": 10}
    first, again, other = (load_jsonl({**options, "seed": seed}) for seed in (0, 0, 1))
    assert first == again and prompts(first["test"]) != prompts(other["test"])
    one_prompt = write_lines(tmp_path / "one.jsonl", [{**rows[0], "chosen": f"c{i}"} for i in range(5)])
    with pytest.raises(DataError, match="too few distinct prompts"):
        load_jsonl({**options, "holdout": 2, "train_path": str(one_prompt)})


def test_duplicates_across_a_datasets_own_splits_are_reported_and_dropped_from_train(tmp_path, capsys):
    train_rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    test_rows = [
        train_rows[2],  # planted: an exact duplicate
        {"prompt": "q4", "chosen": "another good", "rejected": "another bad"},
        {"prompt": "new", "chosen": "a", "rejected": "b"},
    ]
    train_path, test_path = write_lines(tmp_path / "train.jsonl", train_rows), write_lines(tmp_path / "test.jsonl", test_rows)
    cfg = {"jsonl": {"train_path": str(train_path), "test_path": str(test_path), "holdout": 1}}
    mixed = load_datasets(cfg)
    assert [pair.prompt[0]["content"] for pair in mixed["train"]] == ["q0", "q1", "q3", "q4", "q5"]  # q2's pair dropped
    out = capsys.readouterr().out
    assert "jsonl: dropped 1 training examples that are exact duplicates of held-out ones" in out
    assert "jsonl: 1 training prompts also appear in the held-out split" in out  # q4, other responses: kept


def test_run_seed_changes_neither_split(make_cfg, hh_folder):
    sets = []
    for seed in (0, 1, 2):
        cfg = make_cfg(f"seed={seed}", "loss=dpo", "datasets=[hh]", f"datasets.hh.path={hh_folder}", "datasets.hh.holdout=6")
        loaded = load_datasets(cfg.datasets)
        examples = train.prepare_examples(cfg, loaded)
        sets.append((sorted(map(repr, examples["train"])), train.held_out_record(loaded["test"], examples["test"])))
    assert sets[0] == sets[1] == sets[2]
    # 6 or 7: the fixture's multi-turn prompts repeat across its two subsets, and a prompt goes whole
    assert sets[0][1]["examples"] in (6, 7) and sets[0][1]["evaluated"] == sets[0][1]["examples"]


def test_sweep_over_seeds_records_one_held_out_set(tmp_path, hh_folder, shared_cache):
    """`python train.py -m seed=0,1` (the CLI, as users run sweeps): both runs record the same held-out
    size and fingerprint in config.yaml and summary.json; another data seed records another."""
    command = [
        sys.executable, "train.py", "-m", "seed=0,1", "model=tiny", "loss=dpo", "sft.enabled=false", "datasets=[hh]",
        f"datasets.hh.path={hh_folder}", "datasets.hh.holdout=6", "align.max_examples=4", "train.batch_size=4",
        "train.max_eval_examples=4", f"runs_root={tmp_path / 'runs'}", f"cache_dir={shared_cache}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(path.parent for path in (tmp_path / "runs" / "multirun").glob("*/*/summary.json"))
    assert len(runs) == 2
    recorded = [OmegaConf.to_container(OmegaConf.load(run / "config.yaml").heldout) for run in runs]
    summaries = [json.loads((run / "summary.json").read_text())["heldout"] for run in runs]
    assert recorded[0] == recorded[1] == summaries[0] == summaries[1]
    assert recorded[0]["examples"] in (6, 7) and recorded[0]["evaluated"] == 4 and len(recorded[0]["fingerprint"]) == 40
    other_data_seed = [*command[:3], "seed=0", *command[4:], "datasets.hh.seed=1"]
    other = subprocess.run(other_data_seed, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    newest = max((tmp_path / "runs" / "multirun").glob("*/*/config.yaml"), key=lambda path: path.stat().st_mtime)
    assert OmegaConf.load(newest).heldout.fingerprint != recorded[0]["fingerprint"]


def test_unpaired_runs_on_pairs_evaluate_both_answers_of_the_same_held_out_pairs(make_cfg):
    """`train.max_eval_examples` counts held-out pairs before they become single responses: an
    unpaired run scores both answers of exactly the pairs a paired run scores."""
    paired, unpaired = (train.prepare_examples(cfg, load_datasets(cfg.datasets))["test"]
                        for cfg in (make_cfg("loss=dpo", "train.max_eval_examples=5"),
                                    make_cfg("loss=rpo_unpaired", "train.max_eval_examples=5")))
    assert len(paired) == 5 and len(unpaired) == 10
    assert [(item.prompt, item.response, item.desirable) for item in unpaired] == [
        (pair.prompt, answer, desirable) for pair in paired for answer, desirable in ((pair.chosen, True), (pair.rejected, False))]


def test_a_finished_run_is_scored_again_as_it_recorded_then_on_more_pairs(make_cfg, tmp_path, hh_folder, capsys):
    """`python -m eval.heldout RUN` on a finished unpaired run (its reference: the run's SFT model):
    the figures the run recorded at its end; with `--max-eval-examples all`, every held-out pair;
    eval.table shows the latest; nothing the run wrote changes; a changed data file is refused."""
    run_dir = tmp_path / "run"
    train.run(make_cfg("loss=rpo_unpaired", "datasets=[hh]", f"datasets.hh.path={hh_folder}", "datasets.hh.holdout=8",
                       "train.max_eval_examples=4"), run_dir)
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    again = cli("eval.heldout", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = map(json.loads, (run_dir / "heldout" / "align.jsonl").read_text().splitlines())
    assert set(record["metrics"]) == set(record["recorded"]) and "rewards/accuracy_same_prompt" in record["metrics"]
    assert record["metrics"] == pytest.approx(record["recorded"], abs=1e-5)
    assert record["heldout"] == OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").heldout)
    assert "| rewards/accuracy_same_prompt |" in again.stdout and "held-out split of 8 examples; scored 8 responses" in again.stdout

    with pytest.raises(SystemExit) as exit_code:  # the run is scored, the folder that holds none is named
        heldout_main([str(tmp_path / "elsewhere"), str(run_dir), "--max-eval-examples", "all"])
    assert exit_code.value.code == 2
    assert f"error: {tmp_path / 'elsewhere'}: no config.yaml, not a run folder of train.py\n" in capsys.readouterr().err
    first, latest = map(json.loads, (run_dir / "heldout" / "align.jsonl").read_text().splitlines())
    assert first == record and (record["heldout"]["evaluated"], latest["heldout"]["evaluated"]) == (8, 16)  # both answers of 4 and 8 pairs
    assert latest["heldout"]["examples"] == 8
    assert latest["metrics"]["loss"] != pytest.approx(record["metrics"]["loss"])
    shown = read_run(run_dir)
    assert shown.reevaluated == latest["evaluated_at"]
    assert shown.metrics["same-prompt reward accuracy"] == latest["metrics"]["rewards/accuracy_same_prompt"]
    assert shown.metrics["loss"] == latest["metrics"]["loss"]
    assert f"for 1 of 1 runs:\n- {run_dir}: {latest['evaluated_at']}\n" in markdown([shown], group_runs([shown]))
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and "heldout" not in path.parts} == written

    with pytest.raises(SystemExit) as exit_code:
        heldout_main([str(run_dir), "--stage", "dpo"])
    assert exit_code.value.code == 2 and "error: --stage dpo: the run's stages are sft, align\n" == capsys.readouterr().err
    changed = hh_folder / "harmless-base" / "test.jsonl.gz"
    rows = gzip.decompress(changed.read_bytes()).decode().splitlines()
    changed.write_bytes(gzip.compress("\n".join(rows[1:]).encode()))
    refused = cli("eval.heldout", str(run_dir))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"error: datasets {hh_folder}: the held-out split" in refused.stderr and "the data changed since" in refused.stderr
