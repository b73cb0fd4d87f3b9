"""`python -m eval.sample`: answer a prompt set with a checkpoint or a config model (config/eval/sample.yaml).

    python -m eval.sample checkpoint=outputs/rpo_smollm2_135m/<time>              # its held-out prompts
    python -m eval.sample checkpoint=<run> prompts=mt_bench prompts_path=../shared/data/eval-prompts/mt_bench.jsonl
    python -m eval.sample model=smollm2_135m run=<run>                            # the base model on that run's split
    python -m eval.sample model=smollm2_135m datasets=[hh] datasets.hh.path=...    # hh's held-out split, no run needed

Writes `samples.jsonl` and `meta.json` (eval/sampling.py) and prints where.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from eval.prompts import PROMPT_SETS, load_prompts
from eval.sampling import GenerationSettings, check_generation, hf_generator, inference_device, load_chat_model, sample, vllm_generator
from preference_datasets import DataError
from utils import Checker, ConfigError, ModelResolutionError, exit_on, resolve_model_path, seed_everything

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Answerer:
    """The model that answers: where it comes from and the training run it belongs to (if any)."""

    label: str  # what meta.json and every sample row name as the model
    folder: Path | None  # an HF model folder (None: the config model)
    run: Path | None  # the training run it came out of
    stage: str | None


def answerer(cfg: DictConfig) -> Answerer:
    """Resolve `checkpoint`: a run folder means its last finished stage's model."""
    if cfg.checkpoint is None:
        return Answerer(cfg.model.name, None, Path(cfg.run) if cfg.run else None, None)
    folder = Path(cfg.checkpoint)
    if (folder / "config.yaml").is_file():  # a training run: its last stage's final model
        stages = [stage for stage in ("align", "sft") if (folder / stage / "final" / "config.json").is_file()]
        if not stages:
            raise ConfigError(f"checkpoint={folder}: this run has no finished stage (no <stage>/final/config.json)")
        return Answerer(str(folder / stages[0] / "final"), folder / stages[0] / "final", folder, stages[0])
    if not (folder / "config.json").is_file():
        raise ConfigError(f"checkpoint={folder}: neither a training run (config.yaml) nor a model folder (config.json)")
    run = folder.parent.parent if (folder.parent.parent / "config.yaml").is_file() else None
    return Answerer(str(folder), folder, run, folder.parent.name if run else None)


def check(cfg: DictConfig) -> GenerationSettings:
    check = Checker(cfg)
    check.choice("prompts", PROMPT_SETS)
    check.choice("backend", BACKENDS)
    check.whole("max_prompts", optional=True)
    check_generation(check, "generation")
    if check.problems:
        raise ConfigError("\n".join(check.problems))
    return GenerationSettings(**cfg.generation)


def load_answering_model(cfg: DictConfig, source: Answerer):
    """The model and tokenizer: the checkpoint folder's (the trainer saves the tokenizer with it), or
    the config model's, loaded the way training loads it."""
    import train

    if source.folder is not None:
        return load_chat_model(source.folder)
    tokenizer = train.load_tokenizer(cfg)
    return train.load_policy(cfg, tokenizer).to(inference_device()), tokenizer


def model_folder(cfg: DictConfig, source: Answerer) -> str:
    """Where vLLM loads the model from: the checkpoint folder, or the config model's resolved copy."""
    return str(source.folder) if source.folder is not None else resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)


def output_folder(cfg: DictConfig, source: Answerer) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if source.run is not None and source.stage is not None:
        return source.run / "samples" / f"{source.stage}_{cfg.prompts}"
    return Path(cfg.runs_root) / "samples" / f"{Path(source.label).name}_{cfg.prompts}"


def run(cfg: DictConfig) -> Path:
    settings = check(cfg)
    source = answerer(cfg)
    run_dir = Path(cfg.run) if cfg.run else source.run
    if cfg.prompts == "heldout" and run_dir is not None and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run={run_dir}: not a training run folder (no config.yaml)")
    if run_dir is not None:
        run_config = OmegaConf.load(run_dir / "config.yaml")
    else:  # the split training would hold out of these datasets
        run_config = OmegaConf.create({"datasets": cfg.datasets, "heldout": None}) if cfg.get("datasets") else None
    prompts = load_prompts(cfg.prompts, path=cfg.prompts_path, run_config=run_config)[: cfg.max_prompts or None]
    seed_everything(cfg.seed)
    generate = vllm_generator(str(model_folder(cfg, source))) if cfg.backend == "vllm" else hf_generator(*load_answering_model(cfg, source))
    meta = {"checkpoint": source.label, "model": cfg.model.name if source.folder is None else None,
            "prompt_set": cfg.prompts,
            "prompts_path": str(Path(cfg.prompts_path).resolve()) if cfg.prompts_path else None, "run": str(run_dir) if run_dir else None}
    return sample(prompts, generate, settings, output_folder(cfg, source), meta)


@hydra.main(config_path="../config", config_name="eval/sample", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on(ConfigError, DataError, ModelResolutionError):
        path = run(cfg)
    print(f"Samples: {path}")


if __name__ == "__main__":
    main()
