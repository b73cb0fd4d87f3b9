"""`python -m eval.leaderboard`: the Open LLM Leaderboard (v1) of a checkpoint through `lm-eval`.

    python -m eval.leaderboard checkpoint=outputs/rpo_mistral7b/<time>

Runs each task of `tasks` with its `task_settings` (config/eval/leaderboard.yaml: ARC-Challenge 25-shot acc_norm,
HellaSwag 10-shot acc_norm, Winogrande 5-shot acc, MMLU 5-shot acc, TruthfulQA 0-shot mc2, GSM8K
5-shot exact match) with lm-evaluation-harness on one loaded model, and writes `leaderboard.json`
and `leaderboard.md` (score and standard error per task, and the average of the six, as the
RPO v2 and Sr-DPO papers report it). `lm-eval` downloads the tasks' data from the hub; local task
files (`include_path`) run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from eval.sample import Answerer, answerer
from eval.sampling import inference_device
from preference_datasets import DataError
from utils import Checker, ConfigError, atomic_write_text, exit_on, resolve_model_path


def metric_key(result: dict, metric: str) -> str:
    """lm-eval names a score `<metric>,<filter>`: `acc` means `acc,none`; `exact_match,strict-match` is given whole."""
    key = metric if "," in metric else f"{metric},none"
    if key not in result:
        raise DataError(f"lm-eval reported {sorted(k for k in result if ',' in k)}, not {key}: fix task_settings.<task>.metric")
    return key


def run_tasks(model_path: str, tasks: dict, include_path: str | None, limit: int | None, batch_size: int) -> list[dict]:
    """One row per task: its shots, metric, score and standard error, the model loaded once."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=model_path, batch_size=batch_size, device=inference_device())
    manager = TaskManager(include_path=include_path)
    rows = []
    for name, spec in tasks.items():
        output = lm_eval.simple_evaluate(model=model, tasks=[name], num_fewshot=spec["shots"], limit=limit, task_manager=manager,
                                         random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        result = output["results"][name]
        key = metric_key(result, spec["metric"])
        stderr = result.get(key.replace(",", "_stderr,", 1))
        shots = output.get("n-shot", {}).get(name, spec["shots"])  # as lm-eval ran it
        rows.append({"task": name, "shots": shots, "metric": spec["metric"], "score": float(result[key]),
                     "stderr": float(stderr) if isinstance(stderr, int | float) else None})
    return rows


def table(rows: list[dict], source: str) -> str:
    lines = [f"Open LLM Leaderboard (v1 tasks) of {source}", "", "| task | shots | metric | score | stderr |", "|---|---|---|---|---|"]
    for row in rows:
        stderr = f"{100 * row['stderr']:.2f}" if row["stderr"] is not None else ""
        lines.append(f"| {row['task']} | {row['shots']} | {row['metric']} | {100 * row['score']:.2f} | {stderr} |")
    lines.append(f"| **average** | | | {100 * sum(row['score'] for row in rows) / len(rows):.2f} | |")
    return "\n".join(lines) + "\n"


def check(cfg: DictConfig) -> None:
    check = Checker(cfg)
    check.whole("limit", optional=True)
    check.whole("batch_size")
    if not cfg.tasks:
        check.fail("tasks", "name at least one lm-eval task")
    for name in cfg.tasks or ():
        check.whole(f"task_settings.{name}.shots", low=0)
        if not isinstance(check.value(f"task_settings.{name}.metric"), str):
            check.fail(f"task_settings.{name}.metric", "name the score lm-eval reports (acc, acc_norm, exact_match,strict-match)")
    if check.problems:
        raise ConfigError("\n".join(check.problems))


def output_folder(cfg: DictConfig, source: Answerer) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if source.run is not None:
        return source.run / "leaderboard" / (source.stage or "model")
    return Path(cfg.runs_root) / "leaderboard" / Path(source.label).name


def run(cfg: DictConfig) -> Path:
    check(cfg)
    source = answerer(cfg)
    model_path = str(source.folder) if source.folder is not None else resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
    tasks = {name: dict(cfg.task_settings[name]) for name in cfg.tasks}
    rows = run_tasks(model_path, tasks, cfg.include_path, cfg.limit, cfg.batch_size)
    folder = output_folder(cfg, source)
    folder.mkdir(parents=True, exist_ok=True)
    average = sum(row["score"] for row in rows) / len(rows)
    scores = {"model": source.label, "limit": cfg.limit, "tasks": rows, "average": average}
    atomic_write_text(folder / "leaderboard.json", json.dumps(scores, indent=2))
    markdown = table(rows, source.label)
    atomic_write_text(folder / "leaderboard.md", markdown)
    print(markdown)
    return folder


@hydra.main(config_path="../config", config_name="eval/leaderboard", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on(ConfigError, DataError):
        folder = run(cfg)
    print(f"Leaderboard: {folder / 'leaderboard.md'}")


if __name__ == "__main__":
    main()
