"""Run a function in W gloo processes on CPU, the way torchrun would start them (for the FSDP tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.fsdp import free_port


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

