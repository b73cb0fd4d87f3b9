"""Trainers differ by how they run (one process, sharded), never by loss.

Imported on first use: `trainer=fsdp` pulls in torch.distributed's checkpointing, which a
one-process run (or a start-up check that refuses a config) need not pay for.
"""

from __future__ import annotations

from importlib import import_module

TRAINERS = {"basic": "trainers.basic:BasicTrainer", "fsdp": "trainers.fsdp:FSDPTrainer"}


def trainer_class(name: str) -> type:
    """The trainer class that `trainer=<name>` selects."""
    module, attribute = TRAINERS[name].split(":")
    return getattr(import_module(module), attribute)


def __getattr__(name: str) -> type:
    classes = {path.split(":")[1]: key for key, path in TRAINERS.items()}
    if name in classes:
        return trainer_class(classes[name])
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")


__all__ = ["TRAINERS", "trainer_class"]
