"""Sample a model's answers to a prompt set: batched `generate` with the model's chat template.

    python -m eval.sample checkpoint=outputs/rpo_smollm2_135m/<time> prompts=heldout
    python -m eval.sample model=smollm2_135m prompts=mt_bench prompts_path=question.jsonl

Output, in `output_dir`: `samples.jsonl` (one line per prompt: its id, the conversation, the
answer, one per turn for multi-turn sets, the checkpoint and the generation settings) and
`meta.json`. The prompts are cut into fixed batches, each generated with its own seed
(`seed` + batch number) and written whole, so a rerun skips the batches already written and writes
exactly what an uninterrupted run would have, sampled or greedy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eval.prompts import EvalPrompt
from preference_datasets import DataError, Messages
from utils import Checker, ConfigError, atomic_write_text

SAMPLES = "samples.jsonl"
META = "meta.json"


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8


def check_generation(check: Checker, key: str) -> None:
    """The generation settings under `key`, one problem line each."""
    check.number(f"{key}.temperature", 0.0)
    check.number(f"{key}.top_p", 0.0, 1.0, open_low=True)
    for name in ("max_new_tokens", "batch_size"):
        check.whole(f"{key}.{name}")
    check.whole(f"{key}.seed", low=0)


Generate = Callable[[list[Messages], GenerationSettings], list[str]]  # (conversations, settings) -> one answer each


def hf_generator(model: torch.nn.Module, tokenizer) -> Generate:
    """Hugging Face `generate` over a left-padded batch rendered with the tokenizer's chat template;
    each answer ends at the model's end-of-sequence token or after `max_new_tokens`."""
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()

    def generate(conversations: list[Messages], settings: GenerationSettings) -> list[str]:
        texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in conversations]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        with torch.no_grad():
            output = model.generate(
                **batch,
                **(sampling if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers = output[:, batch["input_ids"].shape[1] :]
        return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]

    return generate


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_model(source: str | Path, dtype: torch.dtype | str = torch.float32):
    """A Hugging Face model folder's model (on the inference device, in eval mode) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(inference_device()).eval()
    return model, AutoTokenizer.from_pretrained(source)


def vllm_generator(model_path: str) -> Generate:
    """vLLM (GPUs; `pip install vllm`, imported only here) with the same chat template, settings and
    output as `hf_generator`; each batch's seed (set by `answer_batch`) seeds its requests."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("backend=vllm: vLLM is not installed (pip install vllm, on a GPU machine); backend=hf works everywhere") from None
    llm = LLM(model=model_path)

    def generate(conversations: list[Messages], settings: GenerationSettings) -> list[str]:
        params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_new_tokens,
                                seed=torch.initial_seed())
        return [output.outputs[0].text.strip() for output in llm.chat(conversations, params, use_tqdm=False)]

    return generate


def sample(
    prompts: Sequence[EvalPrompt],
    generate: Generate,
    settings: GenerationSettings,
    output_dir: Path,
    meta: dict,
) -> Path:
    """Answer every prompt (each follow-up turn after the model's own previous answer) into
    `output_dir/samples.jsonl`; batches already written are skipped. Returns the samples file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "generation": asdict(settings), "prompts": len(prompts)}
    refuse_other_setting(output_dir / META, meta, "samples of another setting", ("checkpoint", "model", "prompt_set", "generation"))
    atomic_write_text(output_dir / META, json.dumps(meta, indent=2))
    path = output_dir / SAMPLES
    done = written_ids(path)
    batches = [prompts[start : start + settings.batch_size] for start in range(0, len(prompts), settings.batch_size)]
    with open(path, "a") as out, tqdm(total=len(prompts), desc="sampling", unit="prompt") as bar:
        for number, batch in enumerate(batches):
            if all(prompt.id in done for prompt in batch):
                bar.update(len(batch))
                continue
            for row in answer_batch(batch, generate, settings, settings.seed + number):
                if row["id"] not in done:
                    out.write(json.dumps({**row, "checkpoint": meta.get("checkpoint"), "generation": asdict(settings)}) + "\n")
            out.flush()
            bar.update(len(batch))
    return path


def answer_batch(batch: Sequence[EvalPrompt], generate: Generate, settings: GenerationSettings, seed: int) -> list[dict]:
    """One batch's answers, turn by turn: turn k of every prompt that has it, in one generate call.
    The batch's own seed makes its samples the same whichever batches ran before it."""
    torch.manual_seed(seed)
    conversations = [list(prompt.messages) for prompt in batch]
    answers: list[list[str]] = [[] for _ in batch]
    for turn in range(max(prompt.turns for prompt in batch)):
        active = [i for i, prompt in enumerate(batch) if prompt.turns > turn]
        if turn:
            for i in active:
                conversations[i] += [{"role": "assistant", "content": answers[i][-1]},
                                     {"role": "user", "content": batch[i].follow_ups[turn - 1]}]
        for i, answer in zip(active, generate([conversations[i] for i in active], settings), strict=True):
            answers[i].append(answer)
    return [
        {"id": prompt.id, "prompt": list(prompt.messages), "turns": [prompt.messages[-1]["content"], *prompt.follow_ups],
         "response": answers[i][0], "responses": answers[i], **baselines(prompt)}
        for i, prompt in enumerate(batch)
    ]


def baselines(prompt: EvalPrompt) -> dict:
    """What a judge compares against besides another model: the dataset's chosen response, a
    benchmark's reference answers, the fields an export needs back."""
    found = {"chosen": prompt.chosen, "references": list(prompt.references), "category": prompt.category, "extra": dict(prompt.extra)}
    return {key: value for key, value in found.items() if value}


def written_ids(path: Path) -> set[str]:
    """Ids already in a samples file; a last line cut short by a crash is dropped (rewritten)."""
    if not path.exists():
        return set()
    lines = path.read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    if len(complete) < len(lines):
        path.write_text("".join(complete))
    return {json.loads(line)["id"] for line in complete}


def refuse_other_setting(record: Path, setting: Mapping, what: str, keys: Sequence[str] | None = None) -> None:
    """A folder holds the work of one setting (recorded in the JSON file `record`): refuse to mix in
    another's, naming each difference of `keys` (all the keys of both by default)."""
    if not record.exists():
        return
    saved = json.loads(record.read_text())
    compared = keys or dict.fromkeys([*saved, *setting])
    differences = [f"{key}: {saved.get(key)!r} -> {setting.get(key)!r}" for key in compared if saved.get(key) != setting.get(key)]
    if differences:
        raise ConfigError(f"{record.parent} holds {what} ({'; '.join(differences)}): choose another output_dir")


def read_samples(path: Path) -> dict[str, dict]:
    """A samples file as id -> row (the response files the judges compare)."""
    rows = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not JSON ({error.msg})") from None
            rows[str(row["id"])] = row
    return rows
