"""Evaluation helpers: plots of a run's metrics (sampling and judging come with later issues)."""
