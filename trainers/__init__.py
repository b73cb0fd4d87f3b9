"""Trainers differ by how they run (one process, sharded), never by loss."""

from trainers.basic import BasicTrainer
from trainers.fsdp import FSDPTrainer

TRAINERS = {"basic": BasicTrainer, "fsdp": FSDPTrainer}

__all__ = ["BasicTrainer", "FSDPTrainer", "TRAINERS"]
