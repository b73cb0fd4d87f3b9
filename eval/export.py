"""`python -m eval.export`: a samples file in the format a benchmark's own scorer reads (config/eval/export.yaml).

    python -m eval.export samples=<folder>/samples.jsonl generator=rpo-mistral-7b

- AlpacaEval (`prompts=alpaca_eval` samples): `alpaca_eval_outputs.json`, a JSON list of
  `{"instruction", "output", "generator", "dataset"}`, one per instruction of the set in its
  original order; scored with `alpaca_eval --model_outputs alpaca_eval_outputs.json`.
- MT-Bench and Vicuna-Bench: FastChat's answer file `<generator>.jsonl`, one line per question
  `{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}`,
  to put in FastChat's `data/<bench>/model_answer/`.

Every prompt of the set must have its answer: a missing one is an error (a partial file would
be scored as if the model had failed those prompts).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from eval.prompts import EvalPrompt, load_prompts
from eval.sampling import META, read_samples
from preference_datasets import DataError
from utils import ConfigError, atomic_write_text, exit_on

FORMATS = {"alpaca_eval": "alpaca_eval", "mt_bench": "fastchat", "vicuna_bench": "fastchat"}


def answered_prompts(samples: Path) -> tuple[str, list[EvalPrompt], dict[str, dict]]:
    """The prompt set the samples answered (from their meta.json) and the answers, all present."""
    meta_path = samples.parent / META
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; export reads the prompt set a samples file answered from it")
    meta = json.loads(meta_path.read_text())
    if meta.get("prompt_set") not in FORMATS:
        raise DataError(f"{samples}: answers prompts={meta.get('prompt_set')}; export knows {', '.join(FORMATS)}")
    prompts = load_prompts(meta["prompt_set"], path=meta.get("prompts_path"))
    rows = read_samples(samples)
    missing = [prompt.id for prompt in prompts if prompt.id not in rows]
    if missing:
        raise DataError(f"{samples}: {len(missing)} of the {len(prompts)} {meta['prompt_set']} prompts have no answer "
                        f"(first: {', '.join(missing[:5])}); sample them all (no max_prompts) before exporting")
    return meta["prompt_set"], prompts, rows


def alpaca_eval_outputs(prompts: list[EvalPrompt], rows: dict[str, dict], generator: str) -> list[dict]:
    return [{"instruction": prompt.extra["instruction"], "output": rows[prompt.id]["response"], "generator": generator,
             "dataset": prompt.extra.get("dataset")} for prompt in prompts]


def fastchat_answers(prompts: list[EvalPrompt], rows: dict[str, dict], generator: str) -> list[dict]:
    answers = []
    for prompt in prompts:
        turns = rows[prompt.id].get("responses") or [rows[prompt.id]["response"]]
        answer_id = hashlib.sha1(f"{generator}:{prompt.id}:{json.dumps(turns)}".encode()).hexdigest()[:22]
        answers.append({"question_id": int(prompt.id), "answer_id": answer_id, "model_id": generator,
                        "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
    return answers


def export(samples: Path, generator: str, output: Path | None = None) -> Path:
    """Write the benchmark file for `samples`; returns its path."""
    prompt_set, prompts, rows = answered_prompts(samples)
    if FORMATS[prompt_set] == "alpaca_eval":
        path = output or samples.parent / "alpaca_eval_outputs.json"
        atomic_write_text(path, json.dumps(alpaca_eval_outputs(prompts, rows, generator), indent=2, ensure_ascii=False))
    else:
        path = output or samples.parent / f"{generator}.jsonl"
        lines = [json.dumps(answer, ensure_ascii=False) + "\n" for answer in fastchat_answers(prompts, rows, generator)]
        atomic_write_text(path, "".join(lines))
    return path


@hydra.main(config_path="../config", config_name="eval/export", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on(ConfigError, DataError, OSError):
        if not cfg.samples or not cfg.generator:
            raise ConfigError("samples and generator: give a samples.jsonl and the name the benchmark shows for the model")
        path = export(Path(cfg.samples), str(cfg.generator), Path(cfg.output) if cfg.output else None)
    print(f"Exported: {path}")


if __name__ == "__main__":
    main()
