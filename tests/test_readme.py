"""Every `python train.py ...` line of the README, run as written through the real CLI.

Each gets overrides that shrink it to one optimizer step of each stage on a few examples, keeping
its batch size, lengths and model, so that the micro-batch chosen to fit memory is really run:
each command ends normally or with its documented message, and none is killed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import ROOT

FEW_EXAMPLES = 2  # per dataset and split: the suite's time budget; the batch size, and so the fit, stay the command's
FEW_RESPONSES = 4  # of unpaired data (one labelled response a row): the first rows of the KTO demo file hold both labels
UNPAIRED = ("kto_jsonl",)
# README commands that cannot end normally here, and the message each must end with instead
DOCUMENTED_FAILURES = {
    "model=mistral7b": "Anthropic/hh-rlhf: cannot be loaded from the Hugging Face hub",  # the hub is unreachable: data load first
    "resume=true": "resume=true: no unfinished run with this config",  # every earlier run finished
}
SFT_PLACEHOLDER = "outputs/.../sft/final"  # the README's "an SFT model you trained": the `loss=sft` run's


def all_readme_commands() -> list[str]:
    """Each line of the README that runs `python train.py ...` (`pip install ... && python train.py`
    included)."""
    commands = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.lstrip().startswith(("python train.py", "pip install")) and "python train.py" in line:
            commands.append(line[line.index("python train.py") :].split("  #")[0].strip())
    return list(dict.fromkeys(commands))


# a SLURM cluster, or a search of many trials: tests/test_cluster.py composes these commands and runs
# each launcher and sweeper through the CLI on `tiny`
CLUSTER_COMMANDS = ("hydra/launcher=", "hydra/sweeper=")


def readme_commands() -> list[str]:
    """The README's commands run here. Commands quoted inside sentences are not (the suite's time
    budget): the Sr lambda sweep and `trainer=fsdp` on the demo data were run by hand; nor are
    the cluster's (`CLUSTER_COMMANDS`)."""
    return [command for command in all_readme_commands() if not any(part in command for part in CLUSTER_COMMANDS)]


def sweep_jobs(arguments: list[str]) -> int:
    """How many runs a command starts (1 without -m): its jobs as Hydra's basic sweeper expands the
    config's `hydra.sweeper.params` (a preset's rows) and the command line's swept values."""
    arguments = arguments[2:] if arguments[:2] == ["python", "train.py"] else arguments
    if "-m" not in arguments:
        return 1
    single = [a for a in arguments if a != "-m" and not re.search(r"=[^\[]*,", a)]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        params = compose("config", overrides=single, return_hydra_config=True).hydra.sweeper.params or {}
    swept = [f"{key}={value}" for key, value in params.items()] + [a for a in arguments if a != "-m"]
    parsed = OverridesParser.create().parse_overrides(swept)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))


def composed(arguments: list[str]):
    """The command's config (sweep values aside), as Hydra composes it."""
    single = [a for a in arguments if a != "-m" and not re.search(r"=[^\[]*,", a)]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("config", overrides=single)


def shrinking(arguments: list[str]) -> list[str]:
    """One optimizer step per stage (a partial batch of the few examples: the batch size, and so
    the fitted micro-batch, stay the command's own), one held-out batch per evaluation, short
    answers for the evaluation after training."""
    cfg = composed(arguments)
    evaluated, step = min(FEW_EXAMPLES, cfg.train.eval_batch_size), min(FEW_EXAMPLES, cfg.train.batch_size)
    overrides = [f"sft.max_examples={step}", f"align.max_examples={step}", f"train.max_eval_examples={evaluated}",
                 "eval.generation.max_new_tokens=8"]  # the demo's judged answers after training: short ones
    for name in cfg.datasets:
        if name == "demo":
            overrides += [f"datasets.demo.train_size={FEW_EXAMPLES}", f"datasets.demo.test_size={evaluated}"]
        else:
            loaded = FEW_RESPONSES if name in UNPAIRED else FEW_EXAMPLES
            overrides += [f"datasets.{name}.max_train_examples={loaded}", f"datasets.{name}.max_test_examples={evaluated}"]
    return overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    """Runs README commands in one runs_root, as a user would one after the other; each once."""
    root, results = tmp_path_factory.mktemp("readme"), {}

    def run(command: str) -> subprocess.CompletedProcess:
        if command not in results:
            arguments = shlex.split(command)[2:]
            if SFT_PLACEHOLDER in command:
                run(next(c for c in readme_commands() if "loss=sft" in c and SFT_PLACEHOLDER not in c))
                sft_final = next((root / "runs").glob("sft_*/*/sft/final"))
                arguments = [argument.replace(SFT_PLACEHOLDER, str(sft_final)) for argument in arguments]
            shrunk = [] if "--cfg" in arguments else shrinking(arguments)  # --cfg prints the config, it trains nothing
            extra = [*shrunk, f"runs_root={root / 'runs'}", f"cache_dir={shared_cache}"]
            ordered = [*extra, *arguments] if "--cfg" in arguments else [*arguments, *extra]  # overrides may not follow --cfg job
            results[command] = subprocess.run([sys.executable, "train.py", *ordered], cwd=ROOT, capture_output=True, text=True, timeout=900)
        return results[command]

    return run


def test_the_readme_has_the_commands_this_test_expects():
    commands = readme_commands()
    for fragment in [*DOCUMENTED_FAILURES, SFT_PLACEHOLDER, "loss=sft", "loss=kto", " -m "]:
        assert any(fragment in command for command in commands), fragment


def test_shrinking_keeps_batch_size_lengths_and_model():
    arguments = shlex.split(next(c for c in readme_commands() if "loss=kto" in c))[2:]
    written, shrunk = composed(arguments), composed(arguments + shrinking(arguments))
    for key in ("train.batch_size", "train.eval_batch_size", "max_length", "max_prompt_length", "model", "loss", "train.memory_budget"):
        assert OmegaConf.select(written, key) == OmegaConf.select(shrunk, key), key
    assert (shrunk.sft.max_examples, shrunk.align.max_examples) == (FEW_EXAMPLES,) * 2
    assert shrunk.datasets.kto_jsonl.max_train_examples == FEW_RESPONSES


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, runs):
    result = runs(command)
    assert result.returncode not in (-9, 137), f"killed (out of memory?): {command}\n{result.stderr[-3000:]}"
    expected = next((message for fragment, message in DOCUMENTED_FAILURES.items() if fragment in command), None)
    if expected:
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-3000:]  # a refused start: exit 2
        return
    assert result.returncode == 0, result.stderr[-3000:]
    if "--cfg" in command:  # the composed config, printed as YAML: what the command would run
        arguments = shlex.split(command)[2:]
        printed = OmegaConf.create(result.stdout)
        overrides = [a for a in arguments if a not in ("--cfg", "job")]
        with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
            expected = compose("config", overrides=overrides)
        assert printed.loss == expected.loss and printed.model == expected.model, result.stdout[-3000:]
        return
    assert result.stdout.count("Final model: ") == sweep_jobs(shlex.split(command)), result.stdout[-3000:]
    fitted = re.findall(r"(?:sft|align): micro-batch (\d+) of train.batch_size=(\d+)", result.stdout)
    reused = "Stage sft: the same SFT" in result.stdout  # an earlier README command trained this SFT (sft.reuse)
    assert fitted or (reused and "loss=sft" in command), result.stdout[-3000:]  # micro_batch_size=auto fitted each trained stage
    cfg = composed(shlex.split(command)[2:])
    assert all(int(batch) == cfg.train.batch_size and 1 <= int(micro) <= cfg.train.batch_size for micro, batch in fitted)
    if sweep_jobs(shlex.split(command)) > 1:  # a sweep ends with its table, one finished row per job
        table = Path(re.search(r"Sweep table: (\S+)", result.stdout).group(1))
        jobs = [line for line in table.read_text().splitlines() if "| finished |" in line]
        assert len(jobs) == sweep_jobs(shlex.split(command)), table.read_text()
    if list(cfg.datasets) == ["demo"]:  # the demo's answers are judged after training, as the README shows
        judged = f" vs chosen (rules judge, {FEW_EXAMPLES} held-out prompts): win rate "
        assert result.stdout.count(judged) >= sweep_jobs(shlex.split(command))
