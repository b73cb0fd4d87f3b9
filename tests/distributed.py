"""Run a function in W gloo processes on CPU, the way torchrun would start them (for the FSDP tests)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

import train
from preference_datasets import load_datasets
from trainers.basic import MetricsLog
from trainers.fsdp import free_port
from utils import main_process_first


def spawn(job: Callable, world: int, *args) -> None:
    """`job(*args)` in `world` processes joined in one gloo group; a failure in any raises here."""
    mp.spawn(_process, args=(world, free_port(), job, args), nprocs=world)


def _process(rank: int, world: int, port: int, job: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1"
    )
    dist.init_process_group("gloo")
    try:
        job(*args)
    finally:
        dist.destroy_process_group()


def build(cfg, folder: Path, stage: str = "align"):
    """A trainer of `cfg.trainer` over the configured data with a freshly initialised policy."""
    with main_process_first():
        tokenizer = train.load_tokenizer(cfg)
    examples = train.prepare_examples(cfg, load_datasets(cfg.datasets, cfg.seed))
    data = train.tokenize_examples(cfg, tokenizer, examples)
    policy = train.load_policy(cfg, tokenizer)
    metrics = MetricsLog(folder / "metrics.jsonl")
    trainer_class = train.TRAINERS[cfg.trainer]
    return trainer_class(cfg, stage, policy, tokenizer, data, folder / stage, metrics, train.contrast_embeddings(cfg, examples))
