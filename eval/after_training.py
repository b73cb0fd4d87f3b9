"""Judge a training run when it ends (`eval.after_training` in config/config.yaml).

`rules` (what `auto` means on the demo data): answer the held-out prompts with the SFT model and
the aligned model, then judge aligned vs SFT, aligned vs the dataset's chosen answers and SFT vs
chosen with the rules judge. The samples and judgements stay in the run folder (`samples/`); the
win rates go into `summary.json` under `judged` and are printed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from eval.judge import judge_files
from eval.judges import RulesJudge
from eval.prompts import heldout_prompts
from eval.sampling import GenerationSettings, hf_generator, load_chat_model, sample
from eval.stats import describe

DEMO_LOADERS = ("demo",)
AFTER_TRAINING = ("auto", "rules", "none")  # eval.after_training


def demo_only(cfg: DictConfig) -> bool:
    return all(options.get("loader", name) in DEMO_LOADERS for name, options in cfg.datasets.items())


def judge_mode(cfg: DictConfig) -> str | None:
    """The judge to run after training: `auto` is the rules judge when every dataset is the demo data."""
    mode = cfg.eval.after_training
    if mode == "auto":
        return "rules" if demo_only(cfg) else None
    return None if mode == "none" else mode


def evaluate_run(cfg: DictConfig, run_dir: Path, stages: list[str]) -> dict | None:
    """Sample the held-out prompts from each stage's final model and judge them; None when off."""
    mode = judge_mode(cfg)
    if mode is None:
        return None
    prompts = heldout_prompts(cfg)
    settings = GenerationSettings(**cfg.eval.generation)
    samples = {}
    for stage in stages:
        final = run_dir / stage / "final"
        model, tokenizer = load_chat_model(final)
        meta = {"checkpoint": str(final), "model": None, "prompt_set": "heldout", "prompts_path": None, "run": str(run_dir)}
        print(f"Sampling {len(prompts)} held-out prompts from the {stage} model")
        samples[stage] = sample(prompts, hf_generator(model, tokenizer), settings,
                                run_dir / "samples" / f"{stage}_heldout", meta)
        del model
    matches = [(stage, "chosen") for stage in reversed(stages)]
    if "sft" in stages and "align" in stages:
        matches.insert(0, ("align", "sft"))
    judged = {}
    for evaluated, baseline in matches:
        against = "chosen" if baseline == "chosen" else samples[baseline]
        summary = judge_files(samples[evaluated], against, RulesJudge(), run_dir / "samples" / f"{evaluated}_vs_{baseline}")
        judged[f"{evaluated} vs {baseline}"] = summary
        print(f"{evaluated} vs {baseline} ({mode} judge, {summary['comparisons']} held-out prompts): {describe(summary)}")
    return judged
