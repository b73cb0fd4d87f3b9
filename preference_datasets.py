"""Preference data: loaders, the synthetic `demo` set, tokenization (once per run) and batching.

Every loader returns `PreferencePair` records: a prompt as chat messages and two response
strings. Tokenization renders the prompt with the model's chat template when it has one (the
HH "Human:/Assistant:" text format otherwise), so the prompt/response boundary is the same
for the chosen and the rejected response of a pair.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from utils import PADDING, SHARED_PREFIX, pad_to_longest

Messages = list[dict[str, str]]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class LabelledResponse:
    """One response judged alone (unpaired data, KTO): desirable or not."""

    prompt: Messages
    response: str
    desirable: bool
    source: str = ""


Example = PreferencePair | LabelledResponse
ExampleT = TypeVar("ExampleT", bound=Example)


class DataError(ValueError):
    """Bad preference data: the message names the file, the line and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF


HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def split_hh_dialogue(text: str) -> tuple[Messages, str]:
    """Split an HH dialogue into the prompt turns (up to the last "Assistant:") and the response."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    messages: Messages = []
    for chunk in text[:cut].split(HUMAN)[1:]:
        human, *assistant = chunk.split(ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        messages.extend({"role": "assistant", "content": turn.strip()} for turn in assistant)
    if not messages:
        raise ValueError("no '\\n\\nHuman:' turn before the last Assistant turn")
    return messages, text[cut + len(ASSISTANT) :].strip()


def hh_pairs(rows: Sequence[Mapping], origin: str) -> tuple[list[PreferencePair], int]:
    """Pairs from HH rows; rows whose prompts differ or whose responses are equal are skipped."""
    pairs, skipped = [], 0
    for line, row in enumerate(rows, start=1):
        try:
            prompt, chosen = split_hh_dialogue(row["chosen"])
            rejected_prompt, rejected = split_hh_dialogue(row["rejected"])
        except (KeyError, ValueError) as error:
            raise DataError(f"{origin}, row {line}: not an HH dialogue pair ({error})") from error
        if rejected_prompt != prompt or chosen == rejected:
            skipped += 1
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, "hh"))
    return pairs, skipped


def load_hh(options: Mapping) -> dict[str, list[PreferencePair]]:
    """HH-RLHF from the hub (`Anthropic/hh-rlhf`) or a local folder of the original files.

    A local folder holds `<subset>/{train,test}.jsonl.gz`. Where it has no train files (the
    offline slice in ../shared/data has only test files) the test files are split into train
    and held-out parts, `options.holdout` of them held out.
    """
    subsets = list(options.get("subsets") or HH_SUBSETS)
    splits: dict[str, list[PreferencePair]] = {split: [] for split in SPLITS}
    skipped = 0
    if options.get("path"):
        root = Path(options["path"]).expanduser()
        if not root.is_dir():
            raise DataError(f"datasets.hh.path: {root} is not a folder")
        for split in SPLITS:
            for file in sorted(root.glob(f"*/{split}.jsonl.gz")):
                if file.parent.name in subsets:
                    pairs, dropped = hh_pairs([row for _, row in read_records(file)], str(file))
                    splits[split] += pairs
                    skipped += dropped
        if not splits["test"] and not splits["train"]:
            raise DataError(f"datasets.hh.path: no <subset>/{{train,test}}.jsonl.gz files of {subsets} in {root}")
        if not splits["train"]:
            print(f"hh: {root} has no train files; holding out {options['holdout']} test pairs, training on the rest")
            splits = holdout_split(splits["test"], options)
    else:
        for split in SPLITS:
            for subset in subsets:
                rows = load_hub_dataset(options["hub_name"], data_dir=subset, split=split)
                pairs, dropped = hh_pairs(rows, f"{options['hub_name']}/{subset}/{split}")
                splits[split] += pairs
                skipped += dropped
    if skipped:
        print(f"hh: skipped {skipped} rows whose prompts differ or whose responses are identical")
    return splits


def prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def example_key(example: Example) -> str:
    return json.dumps(asdict(example), sort_keys=True)


def holdout_split(examples: list[ExampleT], options: Mapping) -> dict[str, list[ExampleT]]:
    """Hold out `options.holdout` examples, whole prompts at a time, drawn with the dataset's own
    `options.seed` (never the run's): every run of a config, whatever its seed, trains and
    evaluates on the same sets, and no prompt is on both sides.

    Prompts are drawn in a seeded random order until their examples reach `holdout` (the last
    prompt may bring a few more); the held-out examples come in that drawn order.
    """
    holdout = options["holdout"]
    key = getattr(options, "_get_full_key", lambda name: name)("holdout")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 < holdout < len(examples):
        raise DataError(f"{key}={holdout!r}: hold out a whole number of examples between 0 and the {len(examples)} loaded (exclusive)")
    by_prompt: dict[str, list[ExampleT]] = {}
    for example in examples:
        by_prompt.setdefault(prompt_key(example), []).append(example)
    drawn = list(by_prompt)
    random.Random(int(options.get("seed", 0))).shuffle(drawn)
    test: list[ExampleT] = []
    for key in drawn:
        if len(test) >= holdout:
            break
        test += by_prompt.pop(key)
    if not by_prompt:
        raise DataError(f"{key}={holdout}: the {len(examples)} examples have too few distinct prompts to leave any for training")
    return {"test": test, "train": [example for group in by_prompt.values() for example in group]}


def evaluation_slice(examples: list[ExampleT], limit: int | None) -> list[ExampleT]:
    """The held-out examples each evaluation scores: the first `limit`; of unpaired responses, the
    first of each side in the held-out set's proportions (at least one of each where both exist)."""
    if not limit or len(examples) <= limit or not isinstance(examples[0], LabelledResponse):
        return list(examples[: limit or None])
    sides = [i for i, e in enumerate(examples) if e.desirable], [i for i, e in enumerate(examples) if not e.desirable]
    desirable = min(len(sides[0]), max(1, round(limit * len(sides[0]) / len(examples))), limit - bool(sides[1]))
    return [examples[i] for i in sorted(sides[0][:desirable] + sides[1][: limit - desirable])]


def fingerprint(examples: Sequence[Example]) -> str:
    """A content hash of a set of examples (order aside): equal for runs evaluated on the same ones."""
    return hashlib.sha1(json.dumps(sorted(map(example_key, examples))).encode()).hexdigest()


def drop_leaked(name: str, splits: dict[str, list[ExampleT]]) -> dict[str, list[ExampleT]]:
    """Where a dataset comes with both splits: report training examples that are exact duplicates
    of held-out ones (dropped from train) and prompts on both sides (kept: the dataset's own split)."""
    held_out = {example_key(example) for example in splits["test"]}
    held_out_prompts = {prompt_key(example) for example in splits["test"]}
    train = [example for example in splits["train"] if example_key(example) not in held_out]
    dropped = len(splits["train"]) - len(train)
    shared = len({prompt_key(example) for example in train} & held_out_prompts)
    if dropped:
        print(f"{name}: dropped {dropped} training examples that are exact duplicates of held-out ones")
    if shared:
        print(f"{name}: {shared} training prompts also appear in the held-out split (with other responses; kept)")
    return {**splits, "train": train}


# ---------------------------------------------------------------------------------------------
# Local JSON Lines


def _as_prompt(value: object, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")


def _as_response(value: object, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1]["content"]
    raise DataError(f"{where}: '{key}' must be a string or a message list ending with an assistant message")


def read_pairs_jsonl(path: Path) -> list[PreferencePair]:
    """Records with `prompt`, `chosen`, `rejected`: strings or chat-message lists. Rows with an
    empty response or two identical ones are skipped (as the hub loaders do), and counted."""
    pairs, skipped = [], Counter()
    for where, record in read_records(path):
        _require(record, {"prompt", "chosen", "rejected"}, where)
        chosen, rejected = _as_response(record["chosen"], where, "chosen"), _as_response(record["rejected"], where, "rejected")
        pair = _pair(_as_prompt(record["prompt"], where), chosen, rejected, "jsonl")
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            pairs.append(pair)
    if skipped:
        print(f"{path}: skipped {sum(skipped.values())} rows: " + ", ".join(f"{n} with {reason}" for reason, n in skipped.items()))
    if not pairs:
        raise DataError(f"{path}: no usable pairs (every row has an empty or a repeated response)")
    return pairs


def load_jsonl(options: Mapping) -> dict[str, list[PreferencePair]]:
    if not options.get("train_path"):
        raise DataError("datasets.jsonl.train_path: set it to a .jsonl file of prompt/chosen/rejected records")
    train = read_pairs_jsonl(Path(options["train_path"]).expanduser())
    if options.get("test_path"):
        return {"train": train, "test": read_pairs_jsonl(Path(options["test_path"]).expanduser())}
    return holdout_split(train, options)


# ---------------------------------------------------------------------------------------------
# The synthetic demo set: small, deterministic, learnable in minutes, with topics that repeat.

# Capitals whose best-known city is not the capital: the tempting wrong answer is that city.
CAPITALS = {
    "Australia": ("Canberra", "Sydney"), "Turkey": ("Ankara", "Istanbul"), "Canada": ("Ottawa", "Toronto"),
    "Brazil": ("Brasilia", "Rio de Janeiro"), "Nigeria": ("Abuja", "Lagos"), "Morocco": ("Rabat", "Casablanca"),
    "Vietnam": ("Hanoi", "Ho Chi Minh City"), "New Zealand": ("Wellington", "Auckland"),
    "Pakistan": ("Islamabad", "Karachi"), "Switzerland": ("Bern", "Zurich"), "Myanmar": ("Naypyidaw", "Yangon"),
    "Tanzania": ("Dodoma", "Dar es Salaam"), "Kazakhstan": ("Astana", "Almaty"), "Bolivia": ("Sucre", "La Paz"),
    "South Africa": ("Pretoria", "Johannesburg"), "the United States": ("Washington, D.C.", "New York"),
    "India": ("New Delhi", "Mumbai"), "China": ("Beijing", "Shanghai"), "Scotland": ("Edinburgh", "Glasgow"),
    "Israel": ("Jerusalem", "Tel Aviv"),
}
# Question phrasings per topic: train prompts use the first ones, held-out prompts the last one,
# so the test split asks about the same topics in words the policy never trained on.
PHRASINGS = {
    "capitals": ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}."],
    "addition": ["What is {} plus {}?", "Please add {} and {}.", "Compute the sum of {} and {}."],
    "decimals": ["Which is larger, {} or {}?", "Which number is bigger: {} or {}?", "Is {} or {} the greater number?"],
    "times": ["What is {} times {}?", "Multiply {} by {}.", "What do you get when you multiply {} and {}?"],
}
DEMO_TOPICS = tuple(PHRASINGS)


def _demo_item(topic: str, rng: random.Random, held_out: bool) -> tuple[str, str, str]:
    """One (question, correct answer, plausible wrong answer) of a topic."""
    phrasings = PHRASINGS[topic][-1:] if held_out else PHRASINGS[topic][:-1]
    ask = rng.choice(phrasings).format
    if topic == "capitals":
        country = rng.choice(sorted(CAPITALS))
        capital, famous_city = CAPITALS[country]
        answer = "The capital of {} is {}."
        return ask(country), answer.format(country, capital), answer.format(country, famous_city)
    if topic == "addition":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        wrong = a + b + rng.choice([-100, -10, -1, 1, 10, 100])
        return ask(a, b), f"{a} plus {b} equals {a + b}.", f"{a} plus {b} equals {wrong}."
    if topic == "decimals":  # the 9.11-versus-9.9 trap: more digits is not a larger number
        whole, tenths = rng.randint(1, 20), rng.randint(2, 9)
        longer = f"{whole}.{rng.randint(10, tenths * 10 - 1)}"
        shorter = f"{whole}.{tenths}"
        first, second = (longer, shorter) if rng.random() < 0.5 else (shorter, longer)
        answer = "{} is larger than {}."
        return ask(first, second), answer.format(shorter, longer), answer.format(longer, shorter)
    a, b = rng.randint(6, 19), rng.randint(6, 19)
    wrong = a * b + rng.choice([-a, a, -b, b, -10, 10])
    return ask(a, b), f"{a} times {b} equals {a * b}.", f"{a} times {b} equals {wrong}."


def make_demo_pairs(count: int, seed: int, held_out: bool = False) -> list[PreferencePair]:
    """`count` pairs cycling over the demo topics: the chosen answer is correct, the rejected one
    a plausible mistake (the famous city for the capital, a near-miss sum or product, the
    longer decimal). SmolLM2-135M prefers the chosen answer for only about two pairs in three."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        question, correct, wrong = _demo_item(DEMO_TOPICS[index % len(DEMO_TOPICS)], rng, held_out)
        pairs.append(PreferencePair([{"role": "user", "content": question}], correct, wrong, "demo"))
    return pairs


def load_demo(options: Mapping) -> dict[str, list[PreferencePair]]:
    """Generated, so it is the same on every machine; the seed is the data's own, not the run's."""
    data_seed = int(options["seed"])
    return {
        "train": make_demo_pairs(int(options["train_size"]), data_seed),
        "test": make_demo_pairs(int(options["test_size"]), data_seed + 1, held_out=True),
    }


# ---------------------------------------------------------------------------------------------
# UltraFeedback, TL;DR comparisons and unpaired (KTO) data: from the hub or local files

Record = tuple[str, Mapping]  # a raw row and where it came from ("<file>, line 3" or "<hub>/<split>, row 3")
Convert = Callable[[Mapping, str, str], Example | str]  # (row, where, source) -> an example, or why the row is skipped
_ARRAY_GAP = re.compile(r"[\s,]*")


def _json_lines(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                records.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: invalid JSON ({error.msg})") from error
    return records


def _json_array(path: Path, text: str) -> list[Record]:
    """The items of one JSON array (LLaMA-Factory's format), each named by the line it starts on."""
    try:
        count = len(json.loads(text))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from error
    decoder, records = json.JSONDecoder(), []
    position, line, counted = text.index("[") + 1, 1, 0
    for _ in range(count):  # the text is valid JSON, so only whitespace and one comma separate items
        position = _ARRAY_GAP.match(text, position).end()
        line, counted = line + text.count("\n", counted, position), position
        item, position = decoder.raw_decode(text, position)
        records.append((f"{path}, line {line}", item))
    return records


def read_records(path: Path) -> list[Record]:
    """The JSON objects of a file: JSON Lines (`.jsonl`, or `.json` as in OpenAI's TL;DR release) or
    one JSON array, told apart by the first character; gzip-compressed where the name ends in `.gz`."""
    text = read_text(path)
    records = _json_array(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return records


def read_text(path: Path) -> str:
    """The UTF-8 text of a file (gunzipped where the name ends in `.gz`); a `DataError` naming the
    file (and the line of a byte that is not UTF-8) when it cannot be read."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'a file'} ({error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}, line {line}: byte {data[error.start]:#04x} is not UTF-8 text") from None


def load_hub_dataset(hub_name: str, *args: object, **kwargs: object):
    """`datasets.load_dataset`, with a failure to reach or read the hub as a one-line `DataError`."""
    import datasets

    try:
        return datasets.load_dataset(hub_name, *args, **kwargs)
    except Exception as error:  # offline, unknown name, gated: the datasets library raises many kinds
        raise DataError(
            f"{hub_name}: cannot be loaded from the Hugging Face hub ({type(error).__name__}: {error}); "
            "offline, give the dataset's local copy (datasets.<name>.path or train_path; README: Configuration)"
        ) from None


def _hub_records(hub_name: str, split: str, config: str | None = None) -> list[Record]:
    rows = load_hub_dataset(hub_name, config, split=split)
    origin = "/".join(part for part in (hub_name, config, split) if part)
    return [(f"{origin}, row {number}", row) for number, row in enumerate(rows, start=1)]


def _folder(name: str, path: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"datasets.{name}.path: {root} is not a folder")
    return root


def _require(row: Mapping, keys: set[str], where: str) -> None:
    missing = keys - row.keys()
    if missing:
        raise DataError(f"{where}: missing key(s) {sorted(missing)}")


def _pair(prompt: Messages, chosen: str, rejected: str, source: str) -> PreferencePair | str:
    if not chosen.strip() or not rejected.strip():
        return "an empty response"
    if chosen == rejected:
        return "identical responses"
    return PreferencePair(prompt, chosen, rejected, source)


def _context(value: object, where: str) -> Messages | None:
    """The turns before the response in a message list; None for a string or a lone response."""
    return _as_prompt(value[:-1], where) if isinstance(value, list) and len(value) > 1 else None


def ultrafeedback_pair(row: Mapping, where: str, source: str) -> PreferencePair | str:
    """Flat strings (the offline slice), or the hub's message lists whose last message is the response:
    there the turns before it are the prompt (the `prompt` string is only the first user turn)."""
    _require(row, {"prompt", "chosen", "rejected"}, where)
    chosen_context, rejected_context = _context(row["chosen"], where), _context(row["rejected"], where)
    if chosen_context and rejected_context and chosen_context != rejected_context:
        return "different prompts"
    prompt = chosen_context or rejected_context or _as_prompt(row["prompt"], where)
    return _pair(prompt, _as_response(row["chosen"], where, "chosen"), _as_response(row["rejected"], where, "rejected"), source)


TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
TLDR_HUB_SPLITS = {"train": "train", "test": "validation"}  # of the hub's `comparisons` config


def tldr_pair(row: Mapping, where: str, source: str) -> PreferencePair | str:
    """Two summaries of one Reddit post; `choice` is the index of the one the labeller preferred.

    The prompt is the format of the summarize-from-feedback paper (Stiennon et al. 2020),
    TLDR_PROMPT. The hub's validation split also holds CNN/DM comparisons (an `article`, no
    `post`): those are skipped, not errors.
    """
    _require(row, {"info", "summaries", "choice"}, where)
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if isinstance(info, Mapping) and info.get("post") is None and info.get("article") is not None:
        return "a news article, not a Reddit post"
    try:
        fields = {key: info[key].strip() for key in ("subreddit", "title", "post")}
        texts = [summary["text"].strip() for summary in summaries]
    except (KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{where}: need info.subreddit/title/post and summaries[].text strings ({error!r})") from error
    if len(texts) != 2 or choice not in (0, 1):
        raise DataError(f"{where}: need two summaries and a choice of 0 or 1, got {len(texts)} and {choice!r}")
    prompt = [{"role": "user", "content": TLDR_PROMPT.format(**fields)}]
    return _pair(prompt, texts[choice], texts[1 - choice], source)


def labelled_response(row: Mapping, where: str, source: str) -> LabelledResponse | str:
    """`prompt` / `completion` / `label` records (strings or message lists; the response is the
    completion's last, assistant, message), or LLaMA-Factory's KTO records: `messages` / `label`,
    the last message the judged response and the ones before it the prompt."""
    if "messages" in row:
        if not isinstance(row["messages"], list) or len(row["messages"]) < 2:
            raise DataError(f"{where}: 'messages' must list the prompt turns, then the assistant response")
        row = {**row, "prompt": row["messages"][:-1], "completion": row["messages"]}
    _require(row, {"prompt", "completion", "label"}, where)
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: 'label' must be true or false, got {row['label']!r}")
    response = _as_response(row["completion"], where, "completion")
    if not response.strip():
        return "an empty response"
    return LabelledResponse(_as_prompt(row["prompt"], where), response, row["label"], source)


def _hold_out(name: str, splits: dict[str, list[ExampleT]], options: Mapping, origin: str) -> dict[str, list[ExampleT]]:
    """Where the data has one split only, `options.holdout` of its examples become the test split."""
    if splits["train"] and splits["test"]:
        return splits
    examples = splits["train"] or splits["test"]
    if not examples:
        raise DataError(f"datasets.{name}: no usable examples in {origin}")
    print(f"{name}: {origin} has one split only; holding out {options['holdout']} of its {len(examples)} examples for test")
    return holdout_split(examples, options)


def _build(
    name: str, records: dict[str, list[Record]], convert: Convert, options: Mapping, origin: str
) -> dict[str, list[Example]]:
    """Convert every split's rows, report the skipped ones by reason, and hold out a test split if there is none."""
    splits: dict[str, list[Example]] = {}
    skipped: Counter[str] = Counter()
    for split in SPLITS:
        converted = [convert(row, where, name) for where, row in records[split]]
        splits[split] = [example for example in converted if not isinstance(example, str)]
        skipped.update(reason for reason in converted if isinstance(reason, str))
    if skipped:
        print(f"{name}: skipped {skipped.total()} rows ({', '.join(f'{reason}: {count}' for reason, count in skipped.items())})")
    return _hold_out(name, splits, options, origin)


def _load_ultrafeedback_format(name: str, options: Mapping, hub_splits: Mapping[str, str]) -> dict[str, list[Example]]:
    """Prompt and message-list (or flat string) responses: the hub's `hub_splits`, or a local folder
    holding `{train,test}.jsonl` or `.jsonl.gz`."""
    if not options.get("path"):
        records = {split: _hub_records(options["hub_name"], hub_splits[split]) for split in SPLITS}
        return _build(name, records, ultrafeedback_pair, options, options["hub_name"])
    root = _folder(name, options["path"])
    files = {split: [file for file in (root / f"{split}.jsonl", root / f"{split}.jsonl.gz") if file.is_file()] for split in SPLITS}
    if not any(files.values()):
        raise DataError(f"datasets.{name}.path: no train/test .jsonl or .jsonl.gz files in {root}")
    records = {split: [record for file in files[split] for record in read_records(file)] for split in SPLITS}
    return _build(name, records, ultrafeedback_pair, options, str(root))


def load_ultrafeedback(options: Mapping) -> dict[str, list[Example]]:
    """UltraFeedback binarized: the hub's `train_prefs` / `test_prefs`, or a local folder holding
    `{train,test}.jsonl` or `.jsonl.gz` (../shared/data/ultrafeedback-binarized: flat strings)."""
    return _load_ultrafeedback_format("ultrafeedback", options, {"train": "train_prefs", "test": "test_prefs"})


def load_llama3_armorm(options: Mapping) -> dict[str, list[Example]]:
    """SimPO's on-policy UltraFeedback pairs for Llama-3-8B-Instruct (princeton-nlp/llama3-ultrafeedback-armorm):
    five samples per prompt scored by ArmoRM, the best chosen and the worst rejected; `train` / `test`."""
    return _load_ultrafeedback_format("llama3_armorm", options, {"train": "train", "test": "test"})


def load_gemma2_armorm(options: Mapping) -> dict[str, list[Example]]:
    """The same for gemma-2-9b-it (princeton-nlp/gemma2-ultrafeedback-armorm)."""
    return _load_ultrafeedback_format("gemma2_armorm", options, {"train": "train", "test": "test"})


def _load_unpaired(name: str, options: Mapping) -> dict[str, list[Example]]:
    """One set of labelled responses, the hub's `train` split or a local file: `holdout` of them are the test split."""
    if options.get("path"):
        path = Path(options["path"]).expanduser()
        return _build(name, {"train": read_records(path), "test": []}, labelled_response, options, str(path))
    records = {"train": _hub_records(options["hub_name"], "train"), "test": []}
    return _build(name, records, labelled_response, options, options["hub_name"])


def load_ultrafeedback_unpaired(options: Mapping) -> dict[str, list[Example]]:
    """UltraFeedback for KTO (argilla's cleaned binarization): single-turn string prompts and completions,
    `label` true for a preferred response. Local `path`: a .jsonl or .jsonl.gz file of the same columns."""
    return _load_unpaired("ultrafeedback_unpaired", options)


def load_capybara_unpaired(options: Mapping) -> dict[str, list[Example]]:
    """Capybara for KTO (argilla's distilabel binarization): multi-turn prompts as chat messages, the
    response in a message list. Local `path`: a .jsonl or .jsonl.gz file of the same columns."""
    return _load_unpaired("capybara_unpaired", options)


def _tldr_local_records(root: Path) -> dict[str, list[Record]]:
    """Rows of `batch*.json[.gz]` by their `split`: train* to train, the rest (valid1, valid2) to test."""
    files = sorted([*root.glob("batch*.json"), *root.glob("batch*.json.gz")])
    if not files:
        raise DataError(f"datasets.tldr.path: no batch*.json or batch*.json.gz files in {root}")
    records: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for file in files:
        for where, row in read_records(file):
            if not isinstance(row.get("split"), str):
                raise DataError(f"{where}: 'split' must be a string such as 'train' or 'valid1'")
            records["train" if row["split"].startswith("train") else "test"].append((where, row))
    return records


def load_tldr(options: Mapping) -> dict[str, list[Example]]:
    """OpenAI's summarize-from-feedback TL;DR comparisons: the hub's `comparisons` config (train and
    validation), or a local folder of the release's batch files (../shared/data/tldr-comparisons
    has validation batches only, so `holdout` of them are held out and the rest trained on)."""
    if options.get("path"):
        root = _folder("tldr", options["path"])
        return _build("tldr", _tldr_local_records(root), tldr_pair, options, str(root))
    records = {split: _hub_records(options["hub_name"], hub_split, "comparisons") for split, hub_split in TLDR_HUB_SPLITS.items()}
    return _build("tldr", records, tldr_pair, options, options["hub_name"])


def load_kto_jsonl(options: Mapping) -> dict[str, list[Example]]:
    """Local unpaired data: JSON Lines of prompt/completion/label records, or LLaMA-Factory's KTO JSON
    array (../shared/data/llama-factory-demo/kto_en_demo.json); no `test_path`: `holdout` are held out."""
    if not options.get("train_path"):
        raise DataError("datasets.kto_jsonl.train_path: set it to a .jsonl, .jsonl.gz or .json file of prompt/completion/label records")
    records = {"train": read_records(Path(options["train_path"]).expanduser()), "test": []}
    if options.get("test_path"):
        records["test"] = read_records(Path(options["test_path"]).expanduser())
    return _build("kto_jsonl", records, labelled_response, options, options["train_path"])


LOADERS: dict[str, Callable[[Mapping], dict[str, list[Example]]]] = {
    "hh": load_hh,
    "jsonl": load_jsonl,
    "demo": load_demo,
    "ultrafeedback": load_ultrafeedback,
    "llama3_armorm": load_llama3_armorm,
    "gemma2_armorm": load_gemma2_armorm,
    "ultrafeedback_unpaired": load_ultrafeedback_unpaired,
    "capybara_unpaired": load_capybara_unpaired,
    "tldr": load_tldr,
    "kto_jsonl": load_kto_jsonl,
}


def load_datasets(datasets_cfg: Mapping) -> dict[str, list[Example]]:
    """Load and mix the configured datasets (`datasets.<name>.*`) into train and test lists.

    Which examples are held out depends on the datasets' options alone (their `seed`), never on
    the run's seed; no training example is an exact duplicate of a held-out one."""
    if not datasets_cfg:
        raise DataError("datasets: the list is empty; choose at least one, e.g. datasets=[demo]")
    mixed: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for name, options in datasets_cfg.items():
        loader = LOADERS.get(options.get("loader", name))
        if loader is None:
            raise DataError(f"datasets.{name}: no loader named {options.get('loader', name)!r} (known: {', '.join(LOADERS)})")
        splits = drop_leaked(name, loader(options))
        for split in SPLITS:
            limit = options.get(f"max_{split}_examples")
            mixed[split] += splits[split][:limit] if limit else splits[split]
    for split in SPLITS:
        if not mixed[split]:
            raise DataError(f"datasets: the {split} split is empty for {list(datasets_cfg)}")
    return mixed


# ---------------------------------------------------------------------------------------------
# Tokenization and batching


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    augmented: TokenizedPair | None = None  # the pair on the self-refinement query p + x


def augment(messages: Messages, sr_prompt: str) -> Messages:
    """p + x: the self-refinement prompt prepended to the first user turn (before any chat template)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise DataError("self-refinement prepends loss.sr_prompt to the first user turn, but this prompt has none")
    augmented = [dict(m) for m in messages]
    augmented[first]["content"] = f"{sr_prompt} {augmented[first]['content']}"
    return augmented


@dataclass(frozen=True)
class TokenizedResponse:
    """One response of unpaired data, and the response of another item that KTO's KL term pairs
    with this item's prompt (fixed per item, so its reference log-prob can be cached)."""

    prompt: list[int]
    response: list[int]
    desirable: bool
    mismatched: list[int]


def as_items(examples: Sequence[Example]) -> list[LabelledResponse]:
    """Unpaired view of any data: a pair gives a desirable and an undesirable response."""
    items = []
    for example in examples:
        if isinstance(example, PreferencePair):
            items.append(LabelledResponse(example.prompt, example.chosen, True, example.source))
            items.append(LabelledResponse(example.prompt, example.rejected, False, example.source))
        else:
            items.append(example)
    return items


def require_pairs(examples: Sequence[Example], loss_name: str) -> list[PreferencePair]:
    unpaired = {e.source for e in examples if isinstance(e, LabelledResponse)}
    if unpaired:
        raise DataError(
            f"loss {loss_name!r} contrasts responses of the same prompt, but datasets {sorted(unpaired)} hold single "
            "labelled responses: use loss=rpo_unpaired or loss=kto (or loss.paired=false)"
        )
    return list(examples)


class PairTokenizer:
    """Turns pairs into token ids exactly once per run.

    * The prompt is rendered with the chat template (generation prompt added) when the
      tokenizer has one, else in the HH text format; it gets one BOS where the model expects
      one, never two, and is truncated to `max_prompt_length` keeping its end (and its BOS).
    * Each response ends with the end-of-turn token (EOS) and is cut to fit `max_length`
      together with its prompt; a response cut short loses its EOS, since it did not end.
    * With `sr_prompt` (self-refinement) each pair also gets its augmented twin: the same
      responses after the prompt p + x, where truncation cuts the query just after p and
      never p itself.
    """

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, sr_prompt: str | None = None):
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.sr_prompt = sr_prompt
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None
        self.end_of_turn = self._end_of_turn()

    def _end_of_turn(self) -> int:
        """The token the chat template closes an assistant turn with (EOS without a template)."""
        if self.chat:
            marker = "\x00RESPONSE\x00"
            turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
            text = self.tokenizer.apply_chat_template(turn, tokenize=False)
            closing = self.tokenizer(text.split(marker)[-1].strip(), add_special_tokens=False).input_ids
            if closing and closing[0] in self.tokenizer.all_special_ids:
                return closing[0]
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end responses with")
        return self.tokenizer.eos_token_id

    def prompt_text(self, messages: Messages) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        turns = "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages)
        return turns + ASSISTANT

    def strip_bos(self, ids: list[int]) -> list[int]:
        while self.bos is not None and ids[:1] == [self.bos]:
            ids = ids[1:]
        return ids

    def encode_prompt(self, messages: Messages) -> list[int]:
        ids = self.strip_bos(self.tokenizer(self.prompt_text(messages), add_special_tokens=False).input_ids)
        if self.bos is not None:
            return [self.bos] + ids[-(self.max_prompt_length - 1) :]
        return ids[-self.max_prompt_length :]

    def encode_augmented_prompt(self, messages: Messages) -> list[int]:
        """The prompt p + x, cut (when too long) right after p so that p stays whole."""
        text = self.prompt_text(augment(messages, self.sr_prompt))
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        p_end = text.index(self.sr_prompt) + len(self.sr_prompt)
        ids, offsets = encoding.input_ids, encoding.offset_mapping
        query_start = next(k for k, (start, _) in enumerate(offsets) if start >= p_end)
        room = self.max_prompt_length - (self.bos is not None)
        excess = len(self.strip_bos(ids)) - room
        if excess > 0:
            if query_start + excess >= len(ids):
                raise ValueError(f"max_prompt_length={self.max_prompt_length} leaves no room for the query after loss.sr_prompt")
            ids = ids[:query_start] + ids[query_start + excess :]
        ids = self.strip_bos(ids)
        return ([self.bos] if self.bos is not None else []) + ids

    def encode_response(self, text: str, room: int) -> list[int]:
        text = text if self.chat else " " + text
        ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.end_of_turn]
        return ids[:room]

    def __call__(self, pair: PreferencePair) -> TokenizedPair:
        prompt = self.encode_prompt(pair.prompt)
        room = self.max_length - len(prompt)
        chosen, rejected = self.encode_response(pair.chosen, room), self.encode_response(pair.rejected, room)
        augmented = None
        if self.sr_prompt:
            augmented_prompt = self.encode_augmented_prompt(pair.prompt)
            room = self.max_length - len(augmented_prompt)
            augmented = TokenizedPair(augmented_prompt, chosen[:room], rejected[:room])
        return TokenizedPair(prompt, chosen, rejected, augmented)

    def items(self, items: Sequence[LabelledResponse], seed: int) -> list[TokenizedResponse]:
        """Tokenize unpaired items, each with the response of an item of another prompt (KTO's
        mismatched pair; `mismatched_partners`)."""
        prompts = [self.encode_prompt(item.prompt) for item in items]
        partner = mismatched_partners([tuple(prompt) for prompt in prompts], seed)
        return [
            TokenizedResponse(
                prompt,
                self.encode_response(item.response, self.max_length - len(prompt)),
                item.desirable,
                self.encode_response(items[partner[i]].response, self.max_length - len(prompt)),
            )
            for i, (item, prompt) in enumerate(zip(items, prompts, strict=True))
        ]


def mismatched_partners(prompts: Sequence[Hashable], seed: int) -> list[int]:
    """For each item, another item whose prompt differs, fixed by `seed` (KTO's mismatched pairs).

    Items in a seeded random order are paired with the item `shift` places further round the
    circle, for the smallest shift that never lands on the same prompt, so every response is used
    once (a prompt's few responses sit in random places: small shifts usually work). When none
    does (one prompt holds most items), each item takes the next item round the circle with
    another prompt, or the next item at all if every item shares its prompt.
    """
    count = len(prompts)
    order = epoch_order(count, seed, epoch=-1)
    for shift in range(1, count):
        if all(prompts[order[k]] != prompts[order[(k + shift) % count]] for k in range(count)):
            partner = {order[k]: order[(k + shift) % count] for k in range(count)}
            return [partner[i] for i in range(count)]
    partner = {}
    for k, i in enumerate(order):
        following = (order[(k + step) % count] for step in range(1, count))
        partner[i] = next((j for j in following if prompts[j] != prompts[i]), order[(k + 1) % count])
    return [partner[i] for i in range(count)]


def collate_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> dict:
    """Prompt + response sequences padded to the longest; labels -100 on the prompt and padding."""
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    labels = [[-100] * len(p) + r for p, r in zip(prompts, responses, strict=True)]
    return {
        "input_ids": pad_to_longest(sequences, pad_id),
        "attention_mask": pad_to_longest([[1] * len(s) for s in sequences], 0),
        "labels": pad_to_longest(labels, -100),
        "sequences": len(sequences),
        "tokens": sum(map(len, sequences)),
    }


def shared_prefix_length(prompts: Sequence[list[int]]) -> int:
    """How many leading tokens all of several prompts share (a chat template's header, the
    self-refinement prompt p): at most all but the last token of the shortest, which must stay in
    its segment to predict its responses' first tokens. 0 for a single prompt or an empty one."""
    shortest = min(map(len, prompts))
    if len(prompts) < 2 or not shortest:
        return 0
    first, limit = prompts[0], shortest - 1
    return next((n for n in range(limit) if any(p[n] != first[n] for p in prompts)), limit)


def fill_rows(lengths: Sequence[int], room: int) -> list[list[int]]:
    """Segments (by index) in rows of `room` tokens: longest first, each in the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        row = next((r for r, left in enumerate(free) if left >= lengths[s]), None)
        if row is None:
            rows.append([])
            free.append(room)
            row = len(rows) - 1
        rows[row].append(s)
        free[row] -= lengths[s]
    return rows


def row_layout(lengths: Sequence[int], prefix: int, position_cost: float) -> tuple[int, list[list[int]]]:
    """The row width and the rows of the cheapest packing of segments of `lengths` behind a shared
    prefix of `prefix` tokens. Without a prefix, or a `position_cost` of 0, rows are as long as the
    longest segment. Otherwise widths fitting 1 to all segments of the longest's length are tried,
    each costing rows x (width x position_cost + width^2): a position's work outside attention, and
    the attention over a row, whose mask makes every position score every other."""
    layouts = [(prefix + max(lengths), fill_rows(lengths, max(lengths)))]
    while prefix and position_cost and len(layouts[-1][1]) > 1:  # wider rows than one that holds all cost more
        room = (len(layouts) + 1) * max(lengths)
        layouts.append((prefix + room, fill_rows(lengths, room)))
    return min(layouts, key=lambda layout: len(layout[1]) * (layout[0] * position_cost + layout[0] ** 2))


def pack_sequences(
    prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]], pad_id: int, position_cost: float = 0
) -> dict:
    """Prompts and their responses laid out for one forward that computes each prompt once and no
    padding between sequences: what `utils.packed_response_logps` scores.

    Segment s is prompt s followed by its responses (a pair's chosen and rejected, or one response).
    Each response attends to its prompt and to itself, never to a sibling, and its position ids
    continue from the prompt's end, so its log-prob is that of prompt + response alone. Segments
    are packed into rows (longest first, first row with room) as long as the longest segment.
    Sequence k * len(prompts) + s is segment s's response k (pairs: chosen first, then rejected).

    The tokens every prompt starts with (`shared_prefix_length`: a chat template's header, the
    self-refinement prompt) are computed once per row, at its start (segment `SHARED_PREFIX`), and
    each segment attends to them before its own tokens. Rows may then be wider, so that more
    segments share one prefix: `row_layout` picks the width by `position_cost`.

    Returns input_ids, position_ids, segment (-1: padding, -2: shared prefix) and part (0: prompt,
    k + 1: response k) [rows, width]; for every response token, the flattened position that predicts
    it (predict_at), the token (targets) and its sequence (owners); the number of sequences and of
    the tokens the padded layout would hold (`tokens`, the work a step does whatever its layout).
    """
    prefix = prompts[0][: shared_prefix_length(prompts)]
    rests = [p[len(prefix) :] for p in prompts]
    lengths = [len(p) + sum(map(len, rs)) for p, rs in zip(rests, responses, strict=True)]
    width, rows = row_layout(lengths, len(prefix), position_cost)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), PADDING, dtype=torch.long)
    part = torch.full((len(rows), width), -1, dtype=torch.long)
    predict_at, targets, owners = [], [], []
    for r, members in enumerate(rows):
        input_ids[r, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        position_ids[r, : len(prefix)] = torch.arange(len(prefix))
        segment[r, : len(prefix)], part[r, : len(prefix)] = SHARED_PREFIX, 0
        start = len(prefix)
        for s in members:
            prompt = rests[s]
            prompt_end = r * width + start + len(prompt) - 1  # predicts each response's first token
            after_prompt = len(prefix) + len(prompt)
            pieces = [(prompt, len(prefix), 0)] + [(response, after_prompt, k + 1) for k, response in enumerate(responses[s])]
            for tokens, first_position, piece in pieces:
                end = start + len(tokens)
                input_ids[r, start:end] = torch.tensor(tokens, dtype=torch.long)
                position_ids[r, start:end] = torch.arange(first_position, first_position + len(tokens))
                segment[r, start:end], part[r, start:end] = s, piece
                if piece:  # without a prompt the first token has no predictor (as in the padded layout)
                    predicted = tokens if prompt else tokens[1:]
                    predict_at += ([prompt_end] if prompt and tokens else []) + list(range(r * width + start, r * width + end - 1))
                    targets += predicted
                    owners += [(piece - 1) * len(prompts) + s] * len(predicted)
                start = end
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment,
        "part": part,
        "predict_at": torch.tensor(predict_at, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "owners": torch.tensor(owners, dtype=torch.long),
        "sequences": max(map(len, responses)) * len(prompts),
        "tokens": sum(len(p) * len(rs) + sum(map(len, rs)) for p, rs in zip(prompts, responses, strict=True)),
    }


def pack_items(items: Sequence[TokenizedResponse], pad_id: int, position_cost: float, continue_prompts: bool) -> dict:
    """`pack_sequences` of unpaired items, with items of one prompt as responses of one segment (the
    prompt computed once); `owners` and `sequences` count items, in order. Their mismatched KL
    sequences go under `mismatched`: continuations of the items' own segments (`continuation_layout`)
    with `continue_prompts`, otherwise each laid out with its prompt, to be run alone."""
    segment_of: dict[tuple[int, ...], int] = {}
    for item in items:
        segment_of.setdefault(tuple(item.prompt), len(segment_of))
    segments = [segment_of[tuple(item.prompt)] for item in items]
    responses: list[list[list[int]]] = [[] for _ in segment_of]
    slots = []  # pack_sequences' sequence k * segments + s: segment s's response k
    for item, s in zip(items, segments, strict=True):
        slots.append(len(responses[s]) * len(segment_of) + s)
        responses[s].append(item.response)
    layout = pack_sequences([list(prompt) for prompt in segment_of], responses, pad_id, position_cost)
    item_of_slot = torch.full((layout["sequences"],), -1, dtype=torch.long)
    item_of_slot[slots] = torch.arange(len(items))
    layout.update(owners=item_of_slot[layout["owners"]], sequences=len(items))
    if continue_prompts:
        layout["mismatched"] = continuation_layout(layout, list(zip(segments, [item.mismatched for item in items], strict=True)), pad_id)
    else:
        layout["mismatched"] = pack_sequences([item.prompt for item in items], [[item.mismatched] for item in items], pad_id, position_cost)
    return layout


def continuation_layout(layout: Mapping, continuations: Sequence[tuple[int, list[int]]], pad_id: int) -> dict:
    """Continuations (segment s, tokens) of `layout`'s prompts, for a second forward that reads
    `layout`'s keys and values (`utils.packed_logps_and_continuation`): each in the row that holds
    its segment, after the row's earlier continuations, with position ids that continue from its
    prompt's end (where the segment's responses start).

    A continuation's first token is predicted by its prompt's last position in `layout`, the others
    by its own positions: `predict_at` indexes the hidden states of `layout`'s rows followed by those
    of these rows, both flattened. Returns input_ids, position_ids, segment (the prompt's) and
    sequence (the continuation's index; both -1 on padding) [rows, width], predict_at, targets,
    owners (continuation indices) and the number of sequences."""
    segment, part, positions = layout["segment"], layout["part"], layout["position_ids"]
    rows, width = segment.shape
    members: list[list[int]] = [[] for _ in range(rows)]
    for k, (s, _) in enumerate(continuations):
        members[int((segment == s).any(1).nonzero()[0])].append(k)
    room = max(1, *(sum(len(continuations[k][1]) for k in row) for row in members))
    input_ids = torch.full((rows, room), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, room), dtype=torch.long)
    segment_at = torch.full((rows, room), PADDING, dtype=torch.long)
    sequence_at = torch.full((rows, room), PADDING, dtype=torch.long)
    predict_at, targets, owners = [], [], []
    for r, row in enumerate(members):
        start = 0
        for k in row:
            s, tokens = continuations[k]
            end = start + len(tokens)
            prompt = ((segment[r] == s) & (part[r] == 0)).nonzero().flatten()  # empty only for an empty prompt
            first_position = int(positions[r, prompt[-1]]) + 1 if len(prompt) else 0
            input_ids[r, start:end] = torch.tensor(tokens, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(first_position, first_position + len(tokens))
            segment_at[r, start:end], sequence_at[r, start:end] = s, k
            predicted = tokens if len(prompt) else tokens[1:]  # without a prompt the first token has no predictor
            predict_at += ([r * width + int(prompt[-1])] if len(prompt) and tokens else [])
            predict_at += range(rows * width + r * room + start, rows * width + r * room + end - 1)
            targets += predicted
            owners += [k] * len(predicted)
            start = end
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment_at,
        "sequence": sequence_at,
        "predict_at": torch.tensor(predict_at, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "owners": torch.tensor(owners, dtype=torch.long),
        "sequences": len(continuations),
    }


def collate(
    examples: Sequence[TokenizedPair],
    indices: Sequence[int],
    pad_id: int,
    with_rejected: bool = True,
    packed: bool = False,
    position_cost: float = 0,
) -> dict:
    """One batch of pairs: chosen sequences first, then rejected ones, for ONE concatenated forward
    (`packed`: each prompt once, see `pack_sequences`, with `position_cost`)."""
    index = {"index": torch.tensor(list(indices), dtype=torch.long)}
    if packed:
        responses = [[e.chosen, e.rejected] if with_rejected else [e.chosen] for e in examples]
        return {**pack_sequences([e.prompt for e in examples], responses, pad_id, position_cost), **index}
    responses = [e.chosen for e in examples] + ([e.rejected for e in examples] if with_rejected else [])
    prompts = [e.prompt for e in examples] * (2 if with_rejected else 1)
    return {**collate_sequences(prompts, responses, pad_id), **index}


def collate_items(
    items: Sequence[TokenizedResponse],
    indices: Sequence[int],
    pad_id: int,
    packed: bool = False,
    position_cost: float = 0,
    continue_prompts: bool = False,
) -> dict:
    """One batch of unpaired items (desirable ones first), with their mismatched KL sequences under
    `mismatched` (`packed`, `position_cost`, `continue_prompts`: see `pack_items`)."""
    if packed:
        layout = pack_items(items, pad_id, position_cost, continue_prompts)
    else:
        prompts = [item.prompt for item in items]
        layout = {
            **collate_sequences(prompts, [item.response for item in items], pad_id),
            "mismatched": collate_sequences(prompts, [item.mismatched for item in items], pad_id),
        }
    return {
        **layout,
        "desirable": torch.tensor([item.desirable for item in items]),
        # equal for items of one prompt, in any batch and process (a tuple of ints hashes the same everywhere)
        "prompt_ids": torch.tensor([hash(tuple(item.prompt)) for item in items], dtype=torch.long),
        "index": torch.tensor(list(indices), dtype=torch.long),
    }


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) alone, so resume can rebuild it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


class EpochSampler:
    """Indices of `pool` in (seed, epoch) order, one epoch after the other; its state is two ints."""

    def __init__(self, pool: Sequence[int], seed: int):
        self.pool, self.seed = list(pool), seed
        self.epoch = self.position = 0

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            order = epoch_order(len(self.pool), self.seed, self.epoch)
            step = order[self.position : self.position + count - len(taken)]
            taken += [self.pool[k] for k in step]
            self.position += len(step)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return taken

    def state(self) -> list[int]:
        return [self.epoch, self.position]

    def load(self, state: Sequence[int]) -> None:
        self.epoch, self.position = state


class BalancedSampler:
    """Unpaired batches that always hold both sides: desirable and undesirable items come from two
    streams, in proportion to their counts (at least one of each), so no batch is one-sided."""

    def __init__(self, desirable: Sequence[bool], seed: int):
        chosen = [i for i, d in enumerate(desirable) if d]
        rejected = [i for i, d in enumerate(desirable) if not d]
        if not chosen or not rejected:
            raise DataError(f"unpaired training needs desirable and undesirable responses: got {len(chosen)} and {len(rejected)}")
        self.share = len(chosen) / len(desirable)
        self.streams = (EpochSampler(chosen, seed), EpochSampler(rejected, seed + 1))

    def sides(self, count: int) -> tuple[int, int]:
        """How many desirable and undesirable items a batch of `count` takes (both > 0 from 2 on)."""
        chosen = min(max(round(count * self.share), 1), count - 1)
        return chosen, count - chosen

    def take(self, count: int) -> list[int]:
        if count < 2:
            raise DataError(f"an unpaired batch needs room for both sides: batch of {count}")
        chosen, rejected = self.sides(count)
        return self.streams[0].take(chosen) + self.streams[1].take(rejected)

    def state(self) -> list[int]:
        return self.streams[0].state() + self.streams[1].state()

    def load(self, state: Sequence[int]) -> None:
        self.streams[0].load(state[:2])
        self.streams[1].load(state[2:])
