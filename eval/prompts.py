"""Prompt sets to sample from: the held-out split of the training data, AlpacaEval, MT-Bench, Vicuna-Bench.

Every set becomes a list of `EvalPrompt`: an id that is stable across reruns (resuming and pairing
two models' answers rely on it), the conversation up to the first answer, the follow-up questions
(MT-Bench's second turn, asked after the model's own first answer), and what a judge may need: the
dataset's chosen response (the RPO papers' baseline) or a benchmark's reference answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from preference_datasets import (
    DataError,
    Example,
    LabelledResponse,
    Messages,
    fingerprint,
    load_datasets,
    prompt_key,
    read_records,
)

# name -> (hub data set repository, file in it): the default source when no local file is given;
# None: no copy on the hub, a local file is needed
BENCHMARKS = {
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval.json"),
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", "raw/question.jsonl"),  # FastChat's question.jsonl, ids 81-160
    "vicuna_bench": None,
}
PROMPT_SETS = ("heldout", *BENCHMARKS)


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    messages: Messages  # the conversation up to the first answer
    follow_ups: tuple[str, ...] = ()  # later user turns, each asked after the model's previous answer
    chosen: str | None = None  # the dataset's preferred response (held-out pairs)
    references: tuple[str, ...] = ()  # a benchmark's reference answers, one per turn
    category: str = ""
    extra: Mapping = field(default_factory=dict)  # fields an export needs back (AlpacaEval's `dataset`)

    @property
    def turns(self) -> int:
        return 1 + len(self.follow_ups)


def load_prompts(name: str, *, path: str | None = None, run_config: DictConfig | None = None) -> list[EvalPrompt]:
    """The prompt set `name`: `heldout` needs the training run's config (its datasets and the
    held-out split it recorded); the benchmarks come from `path` or else from the hub."""
    if name == "heldout":
        if run_config is None:
            raise DataError("prompts=heldout: give the training run (run=<run folder>) whose held-out split to sample, or datasets=[...]")
        return heldout_prompts(run_config)
    if name not in BENCHMARKS:
        raise DataError(f"prompts={name!r}: choose one of {', '.join(PROMPT_SETS)}")
    records = read_records(Path(path) if path else hub_file(name))
    convert = alpaca_prompt if name == "alpaca_eval" else bench_prompt
    return [convert(row, where, index) for index, (where, row) in enumerate(records)]


def hub_file(name: str) -> Path:
    """The prompt set's file from the Hugging Face hub (cached by huggingface_hub)."""
    if BENCHMARKS[name] is None:
        raise DataError(f"prompts={name}: no copy on the hub; give prompts_path=<FastChat's fastchat/llm_judge/data/{name}/question.jsonl>")
    from huggingface_hub import hf_hub_download

    repository, filename = BENCHMARKS[name]
    try:
        return Path(hf_hub_download(repository, filename, repo_type="dataset"))
    except Exception as error:  # offline, moved, gated: many kinds
        raise DataError(f"prompts={name}: {repository}/{filename} cannot be loaded from the hub ({type(error).__name__}); "
                        "offline, give prompts_path=<a local copy>") from None


def alpaca_prompt(row: Mapping, where: str, index: int) -> EvalPrompt:
    """An AlpacaEval instruction; its id is its position, the order the export must keep."""
    if not isinstance(row.get("instruction"), str):
        raise DataError(f"{where}: no 'instruction' text")
    return EvalPrompt(
        id=f"alpaca_eval-{index:03d}",
        messages=[{"role": "user", "content": row["instruction"]}],
        category=str(row.get("dataset", "")),
        extra={"instruction": row["instruction"], "dataset": row.get("dataset")},
    )


def bench_prompt(row: Mapping, where: str, index: int) -> EvalPrompt:
    """An MT-Bench or Vicuna-Bench question (FastChat's `question.jsonl` layout)."""
    turns = row.get("turns") or row.get("prompt")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise DataError(f"{where}: 'turns' must be a list of questions")
    if "question_id" not in row:
        raise DataError(f"{where}: no 'question_id'")
    return EvalPrompt(
        id=str(row["question_id"]),
        messages=[{"role": "user", "content": turns[0]}],
        follow_ups=tuple(turns[1:]),
        references=tuple(row.get("reference") or ()),
        category=str(row.get("category", "")),
    )


def heldout_prompts(run_config: DictConfig) -> list[EvalPrompt]:
    """The prompts of the held-out split a training run used (checked against the fingerprint the
    run recorded), once each, with the preferred response as the baseline answer."""
    loaded = load_datasets(run_config.datasets)["test"]
    recorded = run_config.get("heldout")
    if recorded and recorded.get("fingerprint") != fingerprint(loaded):
        raise DataError(
            f"the datasets {list(run_config.datasets)} no longer give the held-out split the run recorded "
            f"({recorded.get('examples')} examples, fingerprint {recorded.get('fingerprint')}): the data changed"
        )
    return prompts_of(loaded)


def prompts_of(examples: Sequence[Example]) -> list[EvalPrompt]:
    """One prompt per distinct conversation, in first-seen order; its chosen response when it has one."""
    prompts: dict[str, EvalPrompt] = {}
    for example in examples:
        key = prompt_key(example)
        if key in prompts:
            continue
        if isinstance(example, LabelledResponse):
            chosen = example.response if example.desirable else None
        else:
            chosen = example.chosen
        source = example.source or "data"
        prompts[key] = EvalPrompt(id=f"{source}-{len(prompts):05d}", messages=list(example.prompt), chosen=chosen)
    return list(prompts.values())
