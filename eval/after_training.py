"""Judge a training run when it ends (`eval.after_training` in config/config.yaml).

Answer the held-out prompts (the first `eval.max_prompts`) with the SFT model and the aligned
model, then judge aligned vs SFT, aligned vs the dataset's chosen answers and SFT vs chosen.
`rules` (what `auto` means on the demo data) checks the demo's answers; `openai` and `hf` ask a
judge model the RPO papers' way (`eval.judge.protocol`: `rpo_dialogue`, or `rpo_summary` for
TL;DR), so that a sweep of a paper's table ends judged. The samples and judgements stay in the run
folder (`samples/`); the win rates go into `summary.json` under `judged` and are printed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eval.judge import judge_files, make_judge
from eval.judges import RulesJudge
from eval.prompts import heldout_prompts
from eval.sampling import GenerationSettings, hf_generator, load_chat_model, sample
from eval.stats import describe

DEMO_LOADERS = ("demo",)
SUMMARY_LOADERS = ("tldr",)
AFTER_TRAINING = ("auto", "rules", "openai", "hf", "none")  # eval.after_training
AFTER_TRAINING_PROTOCOLS = ("auto", "rpo_dialogue", "rpo_summary")  # eval.judge.protocol: a response against chosen


def demo_only(cfg: DictConfig) -> bool:
    return all(options.get("loader", name) in DEMO_LOADERS for name, options in cfg.datasets.items())


def judge_mode(cfg: DictConfig) -> str | None:
    """The judge to run after training: `auto` is the rules judge when every dataset is the demo data."""
    mode = cfg.eval.after_training
    if mode == "auto":
        return "rules" if demo_only(cfg) else None
    return None if mode == "none" else mode


def judge_protocol(cfg: DictConfig) -> str:
    """`eval.judge.protocol`; `auto`: the summary protocol when every dataset is TL;DR, else the dialogue one."""
    protocol = cfg.eval.judge.protocol
    if protocol != "auto":
        return protocol
    summaries = all(options.get("loader", name) in SUMMARY_LOADERS for name, options in cfg.datasets.items())
    return "rpo_summary" if summaries else "rpo_dialogue"


def run_judge(cfg: DictConfig, mode: str):
    """The judge of `eval.after_training`: the rules judge, or a judge model asked by the protocol."""
    if mode == "rules":
        return RulesJudge()
    judge = cfg.eval.judge
    return make_judge(OmegaConf.create({"judge": mode, "protocol": judge_protocol(cfg), "seed": judge.seed, "judge_prompts": None,
                                        "openai": judge.openai, "hf": judge.hf, "cache_dir": cfg.cache_dir}))


def heldout_samples_folder(run_dir: Path, stage: str) -> Path:
    """Where a run's `stage` model's answers to the held-out prompts are written (eval.table's head-to-heads read them)."""
    return run_dir / "samples" / f"{stage}_heldout"


def judged_matches(stages: list[str]) -> list[tuple[str, str]]:
    """The (evaluated, baseline) comparisons judged after a run of these stages: aligned vs SFT, then each vs chosen."""
    matches = [(stage, "chosen") for stage in reversed(stages)]
    if "sft" in stages and "align" in stages:
        matches.insert(0, ("align", "sft"))
    return matches


def evaluate_run(cfg: DictConfig, run_dir: Path, stages: list[str]) -> dict | None:
    """Sample the held-out prompts from each stage's final model and judge them; None when off."""
    mode = judge_mode(cfg)
    if mode is None:
        return None
    judge = run_judge(cfg, mode)  # before sampling: a judge that cannot be built fails fast
    prompts = heldout_prompts(cfg)[: cfg.eval.get("max_prompts") or None]
    settings = GenerationSettings(**cfg.eval.generation)
    samples = {}
    for stage in stages:
        final = run_dir / stage / "final"
        model, tokenizer = load_chat_model(final)
        meta = {"checkpoint": str(final), "model": None, "prompt_set": "heldout", "prompts_path": None, "run": str(run_dir)}
        print(f"Sampling {len(prompts)} held-out prompts from the {stage} model")
        samples[stage] = sample(prompts, hf_generator(model, tokenizer), settings,
                                heldout_samples_folder(run_dir, stage), meta)
        del model
    judged = {}
    for evaluated, baseline in judged_matches(stages):
        against = "chosen" if baseline == "chosen" else samples[baseline]
        summary = judge_files(samples[evaluated], against, judge, run_dir / "samples" / f"{evaluated}_vs_{baseline}")
        judged[f"{evaluated} vs {baseline}"] = summary
        print(f"{evaluated} vs {baseline} ({judge.name} judge, {summary['comparisons']} held-out prompts): {describe(summary)}")
    return judged
