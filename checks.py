"""Start-up checks: every problem of a composed config, one line each, before any data or model loads.

`check_config` returns the loss's `LossSpec`; a config with problems raises one `ConfigError`
whose lines each name a key, its value and what is wrong. Data problems (unreadable files, broken
rows, one-sided unpaired data) are the loaders' `DataError`s, raised while the data loads, still
before any model does (`train.run`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from eval.after_training import AFTER_TRAINING, AFTER_TRAINING_PROTOCOLS, demo_only, judged_matches
from eval.backends import missing_api_key
from eval.sampling import check_generation
from eval.table import METRICS
from preference_datasets import BalancedSampler, LabelledResponse
from trainers import TRAINERS
from trainers.basic import LR_SCHEDULES, OPTIMIZERS
from trainers.losses import LossSpec
from utils import Checker, ConfigError, stage_batch_key, stage_batch_size

DTYPES = ("float32", "bfloat16")  # float16 would need loss scaling, which no trainer does
MIXED_PRECISION = ("auto", "bf16", "fp32")


def processes() -> int:
    """The processes this launch trains in (torchrun's WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg: DictConfig) -> LossSpec:
    """Every problem of the composed config at once (types, ranges, choices, divisibility); the loss spec."""
    check = Checker(cfg)
    check.choice("trainer", list(TRAINERS))
    check.whole("seed", low=0)
    check.choice("model.dtype", DTYPES, " (float16 needs loss scaling, which is not done: use bfloat16)")
    archive = check.value("model.archive")
    if archive and not (Path(str(archive)) / "config.json").is_file():
        check.fail("model.archive", "not a Hugging Face model folder (no config.json in it)")
    length, prompt_length = check.whole("max_length"), check.whole("max_prompt_length")
    if length and prompt_length and prompt_length >= length:
        check.fail("max_prompt_length", f"must be less than max_length={length}, which counts the prompt and the response")
    check_train(check)
    for stage in ("sft", "align"):
        check.positive(f"{stage}.lr")
        check.whole(f"{stage}.warmup_steps", low=0)
        check.choice(f"{stage}.lr_schedule", LR_SCHEDULES)
        if check.value(f"{stage}.warmup_ratio", None) is not None:
            check.number(f"{stage}.warmup_ratio", 0.0, 1.0)
        check.whole(f"{stage}.epochs")
        check.whole(f"{stage}.max_examples", optional=True)
        check.whole(f"{stage}.batch_size", optional=True)
    flags = ("sft.enabled", "sft.reuse", "train.skip_nonfinite", "train.packing", "train.activation_checkpointing", "reference.precompute",
             "wandb.enabled", "debug")
    for key in flags:
        check.flag(key)
    if cfg.trainer == "fsdp":
        check.choice("fsdp.mixed_precision", MIXED_PRECISION)
        check.flag("fsdp.activation_checkpointing")
    if not isinstance(check.value("datasets"), DictConfig) or not cfg.datasets:
        check.fail("datasets", "choose at least one dataset, e.g. datasets=[hh]")
    else:
        check_evaluation(check)
    spec, loss_problems = LossSpec.checked(cfg.loss)
    check.problems += loss_problems
    if not check.problems:  # the sizes it divides are valid
        check_contrast_size(check, spec)
    if check.problems:
        raise ConfigError("\n".join(check.problems))
    return spec


def check_evaluation(check: Checker) -> None:
    """`eval.*`: the rules judge knows only the demo data's questions; a judge model needs its
    protocol and, through an API, its key (a missing key would otherwise surface after training)."""
    mode = check.choice("eval.after_training", AFTER_TRAINING)
    check_generation(check, "eval.generation")
    check_objective(check, mode)
    check.whole("eval.max_prompts", optional=True)
    if mode == "rules" and not demo_only(check.cfg):
        check.fail("eval.after_training", f"the rules judge checks the demo data's answers only, not datasets {list(check.cfg.datasets)}")
    if mode in ("openai", "hf"):
        check.choice("eval.judge.protocol", AFTER_TRAINING_PROTOCOLS)
    if mode == "openai":
        problem = missing_api_key(str(check.value("eval.judge.openai.api_key_env")))
        if problem:
            check.fail("eval.judge.openai.api_key_env", problem)


JUDGED_MATCHES = [f"{evaluated} vs {baseline}" for evaluated, baseline in judged_matches(["sft", "align"])]


def check_objective(check: Checker, mode: str | None) -> None:
    """`objective`: a result every run of the config will have (a win rate needs a judge after training)."""
    objective = check.value("objective")
    judged = [f"{kind}: {match}" for kind in ("win rate", "win rate, ties half") for match in JUDGED_MATCHES]
    if objective in METRICS:
        return
    if objective not in judged:
        check.fail("objective", f"not a result of a run: give one of {', '.join([*METRICS, *judged])}")
    elif mode == "none" or (mode == "auto" and not demo_only(check.cfg)):
        check.fail("objective", "is a judged win rate, but nothing is judged after training (set eval.after_training)")


def check_train(check: Checker) -> None:
    check.choice("train.optimizer", list(OPTIMIZERS))
    check.whole("train.batch_size")
    for key in ("eval_batch_size", "log_every"):
        check.whole(f"train.{key}")
    for key in ("eval_every", "save_every", "max_eval_examples"):
        check.whole(f"train.{key}", optional=True)
    check.positive("train.max_grad_norm")
    check.positive("train.memory_budget", auto=True, what="gigabytes (a positive number)")
    micro = check.whole("train.micro_batch_size", auto=True)
    steps = check.whole("train.gradient_accumulation_steps", optional=True)
    if micro and steps:
        check.fail("train.gradient_accumulation_steps", f"and train.micro_batch_size={micro} both size the micro-batches: set one")
    parts = (steps or 1) * processes()
    for key in ("train.batch_size", "sft.batch_size", "align.batch_size"):
        batch = check.value(key, None)
        if isinstance(batch, int) and steps and batch % parts:
            sizes = [len(range(k, batch, parts)) for k in range(parts)]
            check.fail(key, f"splits unevenly into {parts} micro-batches {tuple(sizes)}: use a multiple of {parts}")


def check_contrast_size(check: Checker, spec: LossSpec) -> None:
    """A contrast matrix over one pair is DPO: refuse a contrast group (or batch) of one pair."""
    if not (spec.contrasts_across_examples and spec.paired):
        return
    batch_key = stage_batch_key(check.cfg, "align")
    batch = check.value(batch_key)
    if spec.contrast_group == 1 or batch == 1:
        key = "loss.contrast_group" if spec.contrast_group == 1 else batch_key
        check.fail(key, f"loss={spec.name} contrasts the pairs of a contrast group: with 1 pair it is plain DPO, give at least 2")


def check_unpaired_batches(cfg: DictConfig, items: Sequence[LabelledResponse]) -> None:
    """Unpaired alignment: the first batch must give each configured micro-batch of each process
    both sides (the trainer checks again once an auto micro-batch is fitted)."""
    sampler = BalancedSampler([item.desirable for item in items], cfg.seed)
    batch, steps, micro = stage_batch_size(cfg, "align"), cfg.train.gradient_accumulation_steps, cfg.train.micro_batch_size
    first = min(batch, len(items) * cfg.align.epochs, cfg.align.max_examples or batch)
    parts = (steps or (math.ceil(first / (micro * processes())) if isinstance(micro, int) else 1)) * processes()
    chosen, rejected = sampler.sides(first)
    if min(chosen, rejected) < parts:
        raise ConfigError(
            f"{stage_batch_key(cfg, 'align')}={batch}: a first batch of {first} unpaired responses holds {chosen} desirable and {rejected} "
            f"undesirable ones, too few for {parts} micro-batches that each need both: use a larger batch or fewer micro-batches"
        )
