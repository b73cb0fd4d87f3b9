"""Bad input through the real CLI, as a careless user gives it: each case is `python train.py ...`
in a process of its own, refused with exit code 2 and one `error:` line per problem that names the
key or the file (and line), before any model or tokenizer loads (the cache stays empty) and leaving
no run folder behind. The cases run two at a time in a module fixture, forked from one interpreter
that has train.py's imports loaded (tests/forked_cli.py: 73 fresh interpreters were the suite's
largest cost); each is then its own test. The tests after the corpus launch `python train.py` fresh."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forked_cli import run_all

ROOT = Path(__file__).resolve().parents[1]
KTO_DEMO = ROOT.parent / "shared" / "data" / "llama-factory-demo" / "kto_en_demo.json"

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
PAIR = {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."}


def write_files(folder: Path) -> dict[str, Path]:
    """The broken data files the cases name (a placeholder {name} in an argument is its path)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({**PAIR, "prompt": f"Question {i}?"}) for i in range(20)]
    files = {
        "not_json": "\n".join([*rows[:2], "{not json", *rows[2:]]),
        "missing_key": "\n".join([*rows[:3], json.dumps({"prompt": "x", "chosen": "y"}), *rows[3:]]),
        "empty": "",
        "valid": "\n".join(rows),
        "not_an_object": "\n".join([*rows[:4], "[1, 2]", *rows[4:]]),
        "bad_prompt": "\n".join([*rows[:1], json.dumps({**PAIR, "prompt": 7}), *rows[1:]]),
        "all_identical": "\n".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) for i in range(8)),
        "bad_label": json.dumps({"prompt": "x", "completion": "y", "label": "yes"}),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text(text)
    paths["not_utf8"] = folder / "not_utf8.jsonl"
    paths["not_utf8"].write_bytes("\n".join(rows[:5]).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    paths["not_gzip"] = folder / "not_gzip.jsonl.gz"
    paths["not_gzip"].write_text("\n".join(rows))
    paths["truncated_gzip"] = folder / "truncated.jsonl.gz"
    paths["truncated_gzip"].write_bytes(gzip.compress("\n".join(rows * 50).encode())[:300])
    desirable = [row for row in json.loads(KTO_DEMO.read_text()) if row["label"]][:100]
    paths["one_sided"] = folder / "one_sided.json"
    paths["one_sided"].write_text(json.dumps(desirable))
    paths["hh_not_a_folder"] = folder / "not_a_folder.txt"
    paths["hh_not_a_folder"].write_text("x")
    return paths


JSONL = ["datasets=[jsonl]", "datasets.jsonl.train_path={path}"]
KTO = ["loss=kto", "datasets=[kto_jsonl]", "datasets.kto_jsonl.train_path={path}"]

# name: (arguments, file used by {path} or None, substrings every one of which an error line holds, number of error lines)
CASES: dict[str, tuple[list[str], str | None, list[str], int]] = {
    # the loss
    "tau zero (was: an all-NaN model, exit 0)": (["loss.tau=0"], None, ["loss.tau=0", "out of range"], 1),
    "tau negative": (["loss.tau=-1"], None, ["loss.tau=-1"], 1),
    "tau not a number": (["loss.tau=abc"], None, ["loss.tau='abc'", "give a number"], 1),
    "beta zero (zero gradient)": (["loss.beta=0"], None, ["loss.beta=0"], 1),
    "beta negative (trains toward rejected)": (["loss=dpo", "loss.beta=-0.1"], None, ["loss.beta=-0.1"], 1),
    "ipo beta zero (1/(2 beta))": (["loss=ipo", "loss.beta=0"], None, ["loss.beta=0"], 1),
    "alpha above one": (["loss=rpo_diagonal", "loss.alpha=1.5"], None, ["loss.alpha=1.5", "[0, 1]"], 1),
    "label smoothing above 0.5": (["loss=dpo", "loss.label_smoothing=0.7"], None, ["loss.label_smoothing=0.7"], 1),
    "label smoothing with the ipo link": (["loss=ipo", "loss.label_smoothing=0.1"], None, ["loss.label_smoothing=0.1", "link=ipo"], 1),
    "link typo": (["loss.link=sigmod"], None, ["loss.link='sigmod'", "sigmoid, ipo"], 1),
    "reward typo": (["loss.reward=logratio"], None, ["loss.reward='logratio'"], 1),
    "weighting needing alpha": (["loss.weighting=diagonal_emphasis"], None, ["loss.alpha: missing, give a number in [0, 1]"], 1),
    "kto on pairs": (["loss=kto", "loss.paired=true"], None, ["loss.paired=true", "KTO"], 1),
    "dpo unpaired": (["loss=dpo", "loss.paired=false"], None, ["loss.weighting=diagonal", "loss.paired=true"], 1),
    "sr delta typo": (["loss=sr_dpo", "loss.sr_delta=refind"], None, ["loss.sr_delta='refind'"], 1),
    "sr lambda negative": (["loss=sr_dpo", "loss.sr_lambda=-0.5"], None, ["loss.sr_lambda=-0.5"], 1),
    "sr on unpaired data": (["loss=rpo_unpaired", "loss.sr_lambda=0.5"], None, ["loss.sr_lambda=0.5", "pairs"], 1),
    "embedding input typo": (["loss.embedding.input=response"], None, ["loss.embedding.input='response'"], 1),
    "contrast group zero": (["loss.contrast_group=0"], None, ["loss.contrast_group=0", "whole number of at least 1 or null"], 1),
    "contrast group fractional": (["loss.contrast_group=2.5"], None, ["loss.contrast_group=2.5"], 1),
    "kto weight zero": (["loss=kto", "loss.desirable_weight=0"], None, ["loss.desirable_weight=0"], 1),
    "loss kind typo": (["loss.kind=contrastive"], None, ["loss.kind='contrastive'"], 1),
    # the schedule and the batches
    "batch size zero (was: an endless loop)": (["train.batch_size=0"], None, ["train.batch_size=0", "whole number"], 1),
    "rpo over one pair is dpo": (["train.batch_size=1"], None, ["train.batch_size=1", "plain DPO"], 1),
    "objective typo": (["objective=reward_accuracy"], None, ["objective='reward_accuracy'", "reward accuracy, margin"], 1),
    "judged objective, nothing judged": (
        ["objective=win rate: align vs sft", "eval.after_training=none"], None,
        ["objective='win rate: align vs sft'", "nothing is judged"], 1),
    "align batch size zero": (["align.batch_size=0"], None, ["align.batch_size=0", "whole number of at least 1 or null"], 1),
    "rpo over an alignment batch of one pair": (["align.batch_size=1"], None, ["align.batch_size=1", "plain DPO"], 1),
    "alignment batch splitting unevenly": (
        ["loss=dpo", "align.batch_size=6", "train.gradient_accumulation_steps=4"], None, ["align.batch_size=6", "(2, 2, 1, 1)"], 1),
    "rpo contrast group of one": (["loss.contrast_group=1"], None, ["loss.contrast_group=1", "plain DPO"], 1),
    "accumulation zero": (["train.gradient_accumulation_steps=0"], None, ["train.gradient_accumulation_steps=0"], 1),
    "uneven accumulation (was: 2, 2, 1, 1 silently)": (
        ["loss=dpo", "train.batch_size=6", "train.gradient_accumulation_steps=4"], None, ["train.batch_size=6", "(2, 2, 1, 1)"], 1),
    "micro-batch and accumulation both": (
        ["train.micro_batch_size=4", "train.gradient_accumulation_steps=2"], None, ["both size the micro-batches"], 1),
    "eval batch zero": (["train.eval_batch_size=0"], None, ["train.eval_batch_size=0"], 1),
    "optimizer typo": (["train.optimizer=adam"], None, ["train.optimizer='adam'", "adamw"], 1),
    "max examples zero (was: no limit)": (["sft.max_examples=0"], None, ["sft.max_examples=0"], 1),
    "negative learning rate": (["align.lr=-1e-6"], None, ["align.lr=-1e-06"], 1),
    "zero epochs": (["sft.epochs=0"], None, ["sft.epochs=0"], 1),
    "judge key missing": (["eval.after_training=openai", "eval.judge.openai.api_key_env=PREFOPT_NO_SUCH_KEY"], None,
                          ["eval.judge.openai.api_key_env", "PREFOPT_NO_SUCH_KEY is not set"], 1),
    "schedule typo": (["align.lr_schedule=linear"], None, ["align.lr_schedule='linear'", "cosine"], 1),
    "warmup ratio over 1": (["sft.warmup_ratio=10"], None, ["sft.warmup_ratio=10"], 1),
    "memory budget negative": (["train.memory_budget=-3"], None, ["train.memory_budget=-3"], 1),
    "max grad norm zero": (["train.max_grad_norm=0"], None, ["train.max_grad_norm=0"], 1),
    "flag not a boolean": (["train.skip_nonfinite=maybe"], None, ["train.skip_nonfinite='maybe'", "true or false"], 1),
    "prompt longer than the sequence": (["max_prompt_length=600"], None, ["max_prompt_length=600", "max_length=160"], 1),
    "float16": (["model.dtype=float16"], None, ["model.dtype='float16'", "bfloat16"], 1),
    "trainer typo": (["trainer=deepspeed"], None, ["trainer='deepspeed'", "basic, fsdp"], 1),
    "archive that is not a model": (
        ["model.archive=/nonexistent/sft/final", "sft.enabled=false"], None, ["model.archive=", "config.json"], 1),
    "three problems, three lines": (["loss.tau=0", "train.batch_size=0", "train.optimizer=adamw2"], None, ["="], 3),
    "kto batch that cannot split (was: after SFT)": (
        [*KTO, "train.batch_size=4", "train.gradient_accumulation_steps=4"], "one_sided", ["undesirable"], 1),
    "unpaired batch too small for both sides": (
        ["loss=kto", "datasets=[kto_jsonl]", f"datasets.kto_jsonl.train_path={KTO_DEMO}", "train.batch_size=4",
         "train.gradient_accumulation_steps=4"], None, ["train.batch_size=4", "micro-batches"], 1),
    # resuming
    "resume a folder that is not a run": (["resume=/nonexistent/run"], None, ["resume=/nonexistent/run", "not a run directory"], 1),
    "resume with nothing to resume": (["resume=true"], None, ["resume=true", "no unfinished run"], 1),
    # data files
    "jsonl path missing": (["datasets=[jsonl]"], None, ["datasets.jsonl.train_path"], 1),
    "jsonl file missing": (
        ["datasets=[jsonl]", "datasets.jsonl.train_path=/nonexistent.jsonl"], None, ["/nonexistent.jsonl: no such file"], 1),
    "jsonl line not json": (JSONL, "not_json", ["not_json.jsonl, line 3"], 1),
    "jsonl row missing a key": (JSONL, "missing_key", ["missing_key.jsonl, line 4", "rejected"], 1),
    "jsonl empty file (was: 'need 0 < holdout < 0')": (JSONL, "empty", ["empty.jsonl: no records"], 1),
    "jsonl row not an object": (JSONL, "not_an_object", ["not_an_object.jsonl, line 5", "JSON object"], 1),
    "jsonl prompt of the wrong type": (JSONL, "bad_prompt", ["bad_prompt.jsonl, line 2", "'prompt'"], 1),
    "jsonl byte that is not utf-8": (JSONL, "not_utf8", ["not_utf8.jsonl, line 6", "0xe9", "UTF-8"], 1),
    "gz file that is not gzip": (JSONL, "not_gzip", ["not_gzip.jsonl.gz: cannot be read as gzip"], 1),
    "truncated gzip": (JSONL, "truncated_gzip", ["truncated.jsonl.gz: cannot be read as gzip"], 1),
    "jsonl where every row repeats its response": (JSONL, "all_identical", ["all_identical.jsonl: no usable pairs"], 1),
    "kto label not a boolean": (KTO, "bad_label", ["bad_label.jsonl, line 1", "'label'"], 1),
    "unpaired data with one side only (was: after SFT)": (KTO, "one_sided", ["0 undesirable", "needs both"], 1),
    "pairs loss on unpaired data": (["loss=dpo", "datasets=[kto_jsonl]", "datasets.kto_jsonl.train_path={path}"], "one_sided",
                                    ["rpo_unpaired"], 1),
    "holdout larger than the data": ([*JSONL, "datasets.jsonl.holdout=50"], "valid", ["datasets.jsonl.holdout=50"], 1),
    "hub dataset unreachable (offline)": (["datasets=[tldr]"], None, ["openai/summarize_from_feedback", "local copy"], 1),
    "hh path that is not a folder": (
        ["datasets=[hh]", "datasets.hh.path={path}"], "hh_not_a_folder", ["datasets.hh.path", "not a folder"], 1),
}

# Hydra's own refusals of the command line itself (an unknown key or option): exit 1, Hydra's message
HYDRA_CASES: dict[str, tuple[list[str], str]] = {
    "unknown loss": (["loss=rpoo"], "loss/rpoo"),
    "key typo": (["train.batchsize=8"], "batchsize"),
    "unknown dataset": (["datasets=[hhh]"], "datasets/hhh"),
}


def arguments_of(arguments: list[str], folder: Path) -> list[str]:
    return ["model=tiny", f"runs_root={folder / 'runs'}", f"cache_dir={folder / 'cache'}", *arguments]


def launch(arguments: list[str], folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *arguments_of(arguments, folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=OFFLINE)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The corpus's refusals, forked from one warm interpreter (tests/forked_cli.py); Hydra's own
    refusals of the command line as fresh `python train.py` launches."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    files = write_files(folder / "files")
    jobs = {}
    for number, (name, (arguments, file, _, _)) in enumerate(CASES.items()):
        filled = [argument.replace("{path}", str(files[file])) if file else argument for argument in arguments]
        jobs[name] = (filled, folder / f"case{number}")
    results = dict(zip(jobs, run_all([arguments_of(*job) for job in jobs.values()], env=OFFLINE), strict=True))
    for number, (name, (arguments, _)) in enumerate(HYDRA_CASES.items()):
        jobs[name] = (arguments, folder / f"hydra{number}")
        results[name] = launch(*jobs[name])
    return {name: (results[name], jobs[name][1]) for name in jobs}


def test_the_corpus_is_large():
    assert len(CASES) + len(HYDRA_CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_before_any_model_loads(name, outcomes):
    result, folder = outcomes[name]
    _, _, expected, lines = CASES[name]
    assert result.returncode == 2, result.stderr[-3000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == lines and all(line.startswith("error: ") for line in errors), result.stderr[-3000:]
    for substring in expected:
        assert any(substring in line for line in errors), (substring, errors)
    assert "Traceback" not in result.stderr + result.stdout
    cache = folder / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), "a model, tokenizer or cache was loaded before the refusal"
    runs = folder / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "the refused start left a run folder"


@pytest.mark.parametrize("name", list(HYDRA_CASES))
def test_a_command_line_hydra_cannot_compose_is_its_error(name, outcomes):
    result, folder = outcomes[name]
    assert result.returncode == 1 and HYDRA_CASES[name][1] in result.stderr, result.stderr[-3000:]
    assert not (folder / "runs").exists() and not (folder / "cache").exists()


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but Hydra's records of the latest launch into it (`.hydra/`, `train.log`)."""
    files = [path for path in sorted(folder.rglob("*")) if path.is_file() and ".hydra" not in path.parts and path.name != "train.log"]
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


ALIGN_ONLY = ["loss=dpo", "sft.enabled=false", "align.max_examples=8", "train.batch_size=4", "train.max_eval_examples=4"]


def test_what_a_run_wrote_is_never_trusted_blindly_nor_lost(tmp_path, fresh_cache):
    """A reused run folder with another config, a corrupted reference cache, a corrupted finished
    model: refused or rebuilt with the file named, and nothing written before is changed."""
    run_dir, cache = tmp_path / "run", fresh_cache  # launch's cache: the test's own
    first = launch([*ALIGN_ONLY, f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_digest(run_dir)

    other = launch([*ALIGN_ONLY, "loss=ipo", f"hydra.run.dir={run_dir}"], tmp_path)
    assert other.returncode == 2 and other.stderr.count("error: ") == 1, other.stderr[-3000:]
    assert f"{run_dir} holds a run of another config" in other.stderr and "loss.name: 'dpo' -> 'ipo'" in other.stderr
    assert tree_digest(run_dir) == before, "the refused launch changed the earlier run's files"

    table = sorted((cache / "reference_logps").glob("*.pt"))[0]  # one of the two tables (train, test)
    damaged = bytearray(table.read_bytes())
    damaged[-200:-100] = bytes(100)
    table.write_bytes(bytes(damaged))
    rebuilt = launch([*ALIGN_ONLY, f"hydra.run.dir={tmp_path / 'again'}"], tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert f"cache {table}: its content does not match its checksum (the file is corrupt): computing it again" in rebuilt.stdout
    final = [json.loads((folder / "summary.json").read_text())["stages"]["align"]["final_eval"] for folder in (run_dir, tmp_path / "again")]
    assert final[0] == final[1]  # trained on the recomputed reference, exactly as on the first one

    weights = run_dir / "align" / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    corrupt = launch([*ALIGN_ONLY, f"resume={run_dir}"], tmp_path)
    assert corrupt.returncode == 2 and corrupt.stderr.count("error: ") == 1, corrupt.stderr[-3000:]
    assert f"{weights} does not match its checksum" in corrupt.stderr and f"Delete {weights.parent}" in corrupt.stderr


def test_a_non_finite_step_stops_the_run_naming_it(tmp_path, fresh_cache):
    """An exploding learning rate: the step whose gradient is NaN is not applied, the run stops with
    one line naming the stage, step and examples (exit 1), and the run's state says failed."""
    result = launch([*ALIGN_ONLY, "align.lr=1e30", "align.max_examples=16", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "align step 2 (examples 4-7 of the stage)" in line and "the step was not applied" in line and "train.skip_nonfinite" in line
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["state"] == "failed" and "NonFiniteLoss" in state["message"]


def test_a_damaged_tokenizer_is_named_and_the_run_says_failed(tmp_path):
    """A tokenizer folder whose tokenizer.json is damaged fails where it loads, after the run folder
    exists: one line naming the key and the folder (exit 2), and the run's state says failed (not
    `running` forever, as a crash before the first stage left it)."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "truncation": nu')
    result = launch([*ALIGN_ONLY, f"model.tokenizer_name_or_path={tokenizer}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: model.tokenizer_name_or_path: the tokenizer in {tokenizer} does not load"), line
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["state"] == "failed" and "does not load" in state["message"]
