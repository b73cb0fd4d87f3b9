"""Plot a run's metrics.jsonl: training loss, held-out loss and accuracies, per stage.

    python -m eval.plots outputs/dpo_smollm2_135m/<time>/metrics.jsonl   # writes metrics.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("training loss", "loss"),
    ("held-out loss", "eval/loss"),
    ("held-out preference accuracy\nlog pi(chosen) > log pi(rejected)", "eval/logp_accuracy"),
    ("held-out reward accuracy", "eval/rewards/accuracy"),
    ("held-out reward margin", "eval/rewards/margin"),
]


def plot_metrics(metrics_path: Path, out_path: Path | None = None) -> Path:
    """One panel per metric; the stages follow each other along the x axis (examples seen)."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in records))
    offsets, start = {}, 0
    for stage in stages:
        offsets[stage] = start
        start += max(r["examples"] for r in records if r["stage"] == stage)
    panels = [(title, key) for title, key in PANELS if any(key in r for r in records)]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for axis, (title, key) in zip(axes[0], panels, strict=True):
        for color, stage in enumerate(stages):
            points = [(offsets[stage] + r["examples"], r[key]) for r in records if r["stage"] == stage and key in r]
            if points:
                marker = "o" if key.startswith("eval/") else None
                axis.plot(*zip(*points, strict=True), marker=marker, markersize=3, color=f"C{color}", label=stage)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("examples seen")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    out_path = Path(out_path or Path(metrics_path).with_name("metrics.png"))
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


if __name__ == "__main__":
    print(plot_metrics(Path(sys.argv[1])))
