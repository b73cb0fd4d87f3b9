"""Trainers differ by how they run (one process, sharded), never by loss."""

from trainers.basic import BasicTrainer

TRAINERS = {"basic": BasicTrainer}

__all__ = ["BasicTrainer", "TRAINERS"]
