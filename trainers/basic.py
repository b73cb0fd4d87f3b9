"""BasicTrainer: one process, one loop, any loss.

A trainer runs one stage of a run (`sft` or `align`). The loss comes from the config
(`trainers/losses.py`); trainers differ only by how they run, so a subclass overrides how the
model is wrapped (`wrap_model`), how batches are split (`split_sides`, `assigned`, `gather`, `rank`), how
metrics are reduced (`sum_over_processes`, `merge`) and how checkpoints are written
(`exported_state`, `save_training_state`, `load_training_state`): `trainers/fsdp.py`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, replace
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from tqdm import tqdm

from preference_datasets import BalancedSampler, DataError, EpochSampler, TokenizedPair, collate, collate_items
from trainers.losses import SFT, LossSpec, kto_loss, preference_loss, rewards, sft_loss
from trainers.memory import (
    GB,
    MemoryPlan,
    PeakMemory,
    allocation_limit,
    enable_activation_checkpointing,
    fit_line,
    fitted_micro_batch,
    in_use,
    is_out_of_memory,
    keep_large_blocks_in_heap,
    memory_budget,
    optimizer_state_bytes,
)
from utils import (
    PACKABLE_ATTENTION,
    ConfigError,
    StopSignals,
    atomic_torch_save,
    barrier,
    checksum_problem,
    gather_objects,
    is_main_process,
    load_or_compute,
    on_main_process,
    packed_logps_and_continuation,
    packed_response_logps,
    position_cost,
    positive_int,
    record_progress,
    response_logps,
    rng_state,
    seed_everything,
    set_rng_state,
    stage_batch_key,
    stage_config,
    state_fingerprint,
    text_fingerprint,
    write_checksums,
)


class CorruptCheckpoint(DataError):
    """A checkpoint whose files do not match their checksums, with no sound one to fall back on."""


class Stopped(Exception):
    """A stop signal was honoured: the stage's progress is checkpointed, the run can be resumed."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


class NonFiniteLoss(ArithmeticError):
    """A training step's loss or gradient norm was NaN or infinite (and `train.skip_nonfinite` is off)."""


LR_SCHEDULES = ("constant", "cosine")  # sft/align.lr_schedule (BasicTrainer.lr_factor)
OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
TIMING_KEYS = ("tokens_per_s", "seconds")
PROBE_SPREAD = 4  # the probes run micro-batches of 1 and 4 examples (unpaired: 2 and 8), or 3, or 2
STAGE_SEEDS = {"sft": 0, "align": 1}  # added to `seed` when a stage starts
SHRINK_STEPS = 10  # a fitted micro-batch that runs out of memory within a stage's first steps is halved


class MetricsLog:
    """`metrics.jsonl` of the run (one JSON object per line), mirrored to wandb when enabled.

    Only the main process writes: under torchrun the other processes' logs are no-ops.
    """

    def __init__(self, path: Path, wandb_run=None):
        self.path = path
        self.wandb_run = wandb_run

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop what was logged after `offset`: a resumed run logs those steps again."""
        if is_main_process() and self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(offset)

    def log(self, record: Mapping) -> None:
        if not is_main_process():
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{record['stage']}/{k}": v for k, v in record.items() if k != "stage"})


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a `save_pretrained` folder's safetensors into an existing model, in place."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()


def cast_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` in `dtype` on the CPU (a 7B export needs no second copy on the GPU), with tied
    parameters (embeddings = LM head) one tensor again, so that `save_pretrained` writes them once,
    as it does for the model itself."""
    names = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names[id(parameter)].append(name)
    cast = {key: value.to("cpu", dtype) for key, value in state.items()}
    for first, *aliases in names.values():
        for alias in aliases if first in cast else ():
            cast[alias] = cast[first]
    return cast


def merge_values(values: Sequence) -> object:
    """Per-sequence values of several micro-batches (or processes) as one: tensors concatenated,
    pairs of tensors pairwise, None kept."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(torch.cat(parts) for parts in zip(*values, strict=True))
    return torch.cat(values)


def to_device(values: Mapping, device: torch.device) -> dict:
    """`merge_values`'s dict with every tensor on `device` (plain CPU tensors travel between processes)."""
    def move(value):
        if isinstance(value, tuple):
            return tuple(part.to(device) for part in value)
        return None if value is None else value.to(device)

    return {key: move(value) for key, value in values.items()}


Stats = dict[str, tuple[float, float]]  # name -> (mean over a batch, what it averages: pairs, tokens, ...)


class WeightedMeans:
    """Means of named statistics over batches, each weighted by what it averages (a token-weighted
    loss, a pair-weighted accuracy), summed over the processes before dividing. A pair of
    `<name>_mean` and `<name>_squared` gives `<name>_std`, the standard deviation over every batch
    (not a mean of per-batch ones)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, stats: Stats, counted: bool = True) -> None:
        for key, (value, weight) in stats.items():
            self.sums[key] += value * weight * counted
            self.weights[key] += weight * counted

    def result(self, sum_over_processes: Callable[[dict[str, float]], dict[str, float]], **counts: float) -> dict[str, float]:
        """The means, and `counts` summed (not averaged) over the processes, in one reduction."""
        sums = {f"sum:{key}": value for key, value in self.sums.items()}
        totals = sum_over_processes({**sums, **{f"weight:{key}": value for key, value in self.weights.items()}, **counts})
        means = {key: totals[f"sum:{key}"] / totals[f"weight:{key}"] for key in self.sums if totals[f"weight:{key}"]}
        for key in [key for key in means if key.endswith("_squared")]:
            name = key.removesuffix("_squared")
            means[f"{name}_std"] = math.sqrt(max(means.pop(key) - means[f"{name}_mean"] ** 2, 0.0))
        return {**means, **{key: totals[key] for key in counts}}


def without_cudnn_attention() -> None:
    """Take cuDNN out of SDPA's backends on CUDA (memory-efficient and flash attention remain).
    Packed rows change width at nearly every step and carry the prompt-sharing mask; cuDNN builds an
    execution plan for each new shape, and on an H200 that was 90 % of a step's CPU time: without it a
    step took 0.32 s instead of 0.42 (docs/BENCHMARKS.md, *On a GPU*)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def same_prompt(prompt_ids: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """[desirable, undesirable] items of a batch: whether the two answer the same prompt."""
    return prompt_ids[desirable].unsqueeze(1) == prompt_ids[~desirable].unsqueeze(0)


class BasicTrainer:
    """Runs one stage: evaluation at the start, the training loop, checkpoints, the final model.

    Args:
        cfg: the composed run config.
        stage: `sft` (NLL of the chosen responses) or `align` (the loss of `cfg.loss`).
        policy: the model to train, in place. For `align` its weights at construction are the
            frozen reference.
        tokenizer: saved beside every checkpoint.
        data: tokenized `train` and `test` examples: pairs, or unpaired items (`loss.paired=false`).
        stage_dir: where `checkpoint/` and `final/` of this stage go.
        metrics: the run's metrics log.
        embeddings: per split, the [n, d] embeddings of each pair's chosen and rejected side
            (RPO's weights), computed once before training.
    """

    rank, world_size = 0, 1  # this process among the processes that train together

    @classmethod
    def launch(cls, cfg: DictConfig) -> torch.device:
        """Join the processes this trainer runs in (idempotent) and return this process's device."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1:
            raise ConfigError(f"trainer={cfg.trainer} runs in one process, but {launched} were launched: use trainer=fsdp")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __init__(
        self,
        cfg: DictConfig,
        stage: str,
        policy: torch.nn.Module,
        tokenizer,
        data: Mapping[str, Sequence[TokenizedPair]],
        stage_dir: Path,
        metrics: MetricsLog,
        embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.batch_key = stage_batch_key(cfg, stage)  # the key to name in messages about the batch
        cfg = stage_config(cfg, stage)
        self.cfg, self.stage, self.policy, self.tokenizer = cfg, stage, policy, tokenizer
        self.stage_cfg = cfg[stage]
        self.loss = LossSpec.of(cfg.loss) if stage == "align" else SFT
        self.train_set = data["train"]
        self.paired = isinstance(self.train_set[0], TokenizedPair)
        self.test_set = self.checked_held_out(data["test"])
        self.stage_dir, self.metrics, self.embeddings = stage_dir, metrics, embeddings
        self.kto = self.loss.kind == "kto"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = self.launch(cfg)
        if self.device.type == "cpu":
            keep_large_blocks_in_heap()
        else:
            without_cudnn_attention()
        self.compute_dtype = self.compute_precision()
        self.packed = self.packing(policy)
        self.position_cost = position_cost(policy)  # how wide packed rows pay
        self.sampler = self.build_sampler()
        self.plan = self.configured_micro_batches()  # None: fitted to the memory budget when the stage starts
        self.total_examples = self.planned_examples()
        needs_reference = self.loss.needs_reference
        precompute = needs_reference and cfg.reference.precompute
        weights_key = on_main_process(lambda: state_fingerprint(policy)) if precompute else None
        # the frozen reference keeps model.dtype: it has no optimizer, and its weights are those of the policy
        frozen = copy.deepcopy(policy).eval().requires_grad_(False) if needs_reference and not precompute else None
        self.policy = self.wrap_model(policy)
        self.reference_model = self.wrap_model(frozen) if frozen is not None else None
        # KTO's mismatched responses continue their prompts from the forward's key/value cache, which
        # activation checkpointing turns off (its recomputation would write the cache twice)
        self.continues_prompts = self.packed and not any(getattr(m, "gradient_checkpointing", False) for m in self.policy.modules())
        self.reference_logps = self.precomputed_reference_logps(weights_key) if precompute else None
        self.optimizer = OPTIMIZERS[cfg.train.optimizer](self.policy.parameters(), lr=self.stage_cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.lr_factor(step))
        self.step = self.examples = self.checkpointed_at = self.skipped_nonfinite = 0
        self.contrast_path: str | None = None  # one_pass | gradient_caching, once the first step chose
        self.contrast_note = ""

    def planned_steps(self) -> int:
        """Optimizer steps of the stage (the last batch may be partial)."""
        return math.ceil(self.total_examples / self.cfg.train.batch_size)

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier of optimizer step `step` (from 0).

        `constant` (the DPO reference code's): linear warmup over `warmup_steps`, from 1/(warmup+1)
        of the rate, then constant. `cosine` (SimPO's recipe, Hugging Face's
        `get_cosine_schedule_with_warmup`): linear warmup from 0, then a half cosine to 0 at the
        stage's last step. `warmup_ratio`, when set, gives the warmup as a share of the stage's steps.
        """
        stage, total = self.stage_cfg, self.planned_steps()
        warmup = stage.warmup_steps if stage.get("warmup_ratio") is None else math.ceil(stage.warmup_ratio * total)
        if stage.get("lr_schedule", "constant") == "constant":
            return min(1.0, (step + 1) / (warmup + 1))
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def compute_precision(self) -> torch.dtype:
        """The dtype of the forward and backward passes: `model.dtype`. The trained parameters and
        the optimizer state are float32 whatever it is (master weights): at alignment learning rates
        (5e-7) most RMSprop updates of a bfloat16 weight would round away."""
        dtype = getattr(torch, self.cfg.model.dtype)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"model.dtype={self.cfg.model.dtype}: trainer={self.cfg.trainer} computes in bfloat16 or float32")
        return dtype

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this trainer runs it: moved to the device; a trained one in float32 (master
        weights, cast to `compute_dtype` by autocast in each forward), a frozen one as it is."""
        trained = any(parameter.requires_grad for parameter in model.parameters())
        if trained and self.cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model.to(self.device, dtype=torch.float32) if trained else model.to(self.device)

    def planned_examples(self) -> int:
        """How many training examples the stage runs: its epochs, capped by `max_examples`.

        Unpaired alignment needs both sides in every micro-batch of every process: a batch size
        that cannot give them is refused here, and a last partial batch that cannot is skipped.
        """
        budget = self.stage_cfg.epochs * (len(self.sampler.pool) if self.stage == "sft" or self.paired else len(self.train_set))
        planned = min(budget, self.stage_cfg.max_examples or budget)
        if self.paired or self.stage == "sft":
            return planned
        batch = self.cfg.train.batch_size
        first = min(batch, planned)
        steps = self.micro_batch_count(first) if self.plan else 1  # auto: checked again once fitted
        chosen, rejected = self.sampler.sides(first)
        if min(chosen, rejected) < steps * self.world_size:
            processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
            raise ConfigError(
                f"a batch of {first} unpaired responses ({self.batch_key}={batch}) holds {chosen} desirable and "
                f"{rejected} undesirable ones; each of its {steps} micro-batches{processes} needs both: use a larger batch, "
                "fewer train.gradient_accumulation_steps or a larger train.micro_batch_size (auto: a larger train.memory_budget)"
            )
        last = planned % batch if planned > batch else 0
        parts = (self.micro_batch_count(last) if self.plan else 1) * self.world_size
        if last and min(self.sampler.sides(last)) < parts:
            if is_main_process():
                print(f"{self.stage}: skipping the last {last} examples: too few to give each of {parts} micro-batches both sides")
            planned -= last
        return planned

    # ----------------------------------------------------------------------------- micro-batches

    def configured_micro_batches(self) -> MemoryPlan | None:
        """The micro-batches the config fixes: `train.gradient_accumulation_steps` parts per batch, or
        micro-batches of `train.micro_batch_size` examples per process. None under
        `micro_batch_size: auto` (with no accumulation steps given): fitted when the stage starts."""
        train = self.cfg.train
        batch = positive_int(train, "batch_size")
        positive_int(train, "eval_batch_size")
        micro = train.micro_batch_size
        if train.gradient_accumulation_steps is not None:
            steps = positive_int(train, "gradient_accumulation_steps")
            if micro != "auto":
                raise ConfigError(
                    f"train.micro_batch_size={micro} and train.gradient_accumulation_steps={steps} both size the micro-batches: set one"
                )
            return MemoryPlan(math.ceil(batch / (steps * self.world_size)), steps, fixed_steps=True)
        if micro == "auto":
            return None
        micro = positive_int(train, "micro_batch_size", "or auto")
        return MemoryPlan(micro, self.accumulation_for(micro))

    def micro_batches(self) -> MemoryPlan:
        """The stage's micro-batches: configured, saved in the checkpoint being resumed, or fitted now."""
        if self.plan is None:
            self.plan = self.fit_micro_batch()
            self.total_examples = self.planned_examples()  # unpaired: checks that each micro-batch has both sides
        return self.plan

    def micro_batch_count(self, examples: int) -> int:
        """How many micro-batches a batch of `examples` runs in: `gradient_accumulation_steps` when
        configured; otherwise as many as hold at most `micro_batch` examples (a last, partial batch
        needs fewer)."""
        plan = self.micro_batches()
        if plan.fixed_steps or examples == self.cfg.train.batch_size:
            return plan.accumulation_steps
        return math.ceil(examples / (plan.micro_batch * self.world_size))

    def accumulation_for(self, micro_batch: int) -> int:
        """Accumulation steps that keep every process's micro-batches at most `micro_batch` examples
        (and, over several processes, split the batch evenly: FSDP's processes run equal parts).
        A micro-batch that can hold a contrast group gets whole groups when more steps allow it, so
        that the one-pass path runs instead of gradient caching."""
        batch, processes = self.cfg.train.batch_size, self.world_size
        steps = math.ceil(batch / (micro_batch * processes))
        while processes > 1 and batch % (steps * processes) and steps * processes < batch:
            steps += 1
        group = self.loss.contrast_group if self.stage == "align" and self.loss.contrasts_across_examples else None
        if group and group <= micro_batch:
            groups = math.ceil(batch / group) if self.paired else batch // group
            for candidate in range(steps, groups // processes + 1):
                even = processes == 1 or batch % (candidate * processes) == 0
                if groups % (candidate * processes) == 0 and even and groups // (candidate * processes) * group <= micro_batch:
                    return candidate
        return steps

    def smallest_micro_batch(self) -> int:
        """1 example; 2 for unpaired alignment, whose micro-batches hold both sides."""
        return 1 if self.paired or self.stage == "sft" else 2

    def longest_examples(self, count: int) -> list[int]:
        """The `count` training examples of this stage with the longest sequences (the worst case a
        micro-batch must fit); unpaired ones alternately desirable and undesirable, so that every
        even-sized prefix holds both sides."""
        def length(i: int) -> int:
            example = self.train_set[i]
            if not self.paired:
                return len(example.prompt) + len(example.response)
            responses = (example.chosen,) if self.stage == "sft" else (example.chosen, example.rejected)
            return len(example.prompt) + max(map(len, responses))

        if isinstance(self.sampler, BalancedSampler):
            sides = [sorted(stream.pool, key=length, reverse=True)[:count] for stream in self.sampler.streams]
            return [i for pair in zip(*sides, strict=False) for i in pair][:count]
        return sorted(self.sampler.pool, key=length, reverse=True)[:count]

    def fit_micro_batch(self) -> MemoryPlan:
        """`train.micro_batch_size: auto`: the largest micro-batch whose estimated peak, with the
        optimizer state still to come, fits `train.memory_budget`. Two probe steps (forward and
        backward of this stage's loss on the longest examples, then discarded) give
        `peak = base + per_example * k`; they run under an allocation limit of the budget, so a
        configuration that cannot fit fails here with the estimate rather than being killed."""
        budget = memory_budget(self.cfg.train.memory_budget, self.device)
        largest = math.ceil(self.cfg.train.batch_size / self.world_size)
        unit = self.smallest_micro_batch()
        optimizer = optimizer_state_bytes(self.cfg.train.optimizer, self.policy.parameters())
        examples = self.longest_examples(PROBE_SPREAD * unit)
        rng = rng_state()  # the probes' dropout draws must not shift the training run's
        with allocation_limit(self.device, budget - optimizer):
            held = in_use(self.device)
            points = [(unit, self.probe_peak(examples[:unit]))]
            # what the first probe added is at most `unit` examples' share plus the step's fixed
            # costs (gradients): if `largest` examples fit even at that rate, no second probe is needed
            clearly_fits = points[0][1] is not None and held + (points[0][1] - held) * largest / unit + optimizer <= budget
            # the second point far from the first, for the slope; a smaller one if it does not fit
            for size in (s * unit for s in range(PROBE_SPREAD, 1, -1) if unit < s * unit <= largest and not clearly_fits):
                peak = self.probe_peak(examples[:size]) if points[0][1] is not None else None
                if peak is not None:
                    points.append((size, peak))
                    break
        set_rng_state(rng)
        if points[0][1] is None or points[0][1] + optimizer > budget:
            raise ConfigError(self.unfittable(examples[:unit], budget, points[0][1] and points[0][1] + optimizer))
        if clearly_fits:  # an upper bound: the one probe's fixed costs (gradients) are counted per example
            base, per_example, micro = held + optimizer, (points[0][1] - held) / unit, largest
        elif len(points) == 1:  # larger micro-batches ran out of memory
            base, per_example, micro = points[0][1] + optimizer, 0.0, min(unit, largest)
        else:
            base, per_example = fit_line(points)
            base += optimizer
            micro = fitted_micro_batch(base, per_example, budget, largest)
        micro = min(gather_objects(micro))  # every process runs the same micro-batches
        plan = MemoryPlan(micro, self.accumulation_for(micro), round(budget / GB, 2), round((base + per_example * micro) / GB, 2),
                          round(base / GB, 2), round(per_example / GB, 3), estimate_is_upper_bound=clearly_fits)
        if is_main_process():
            print(
                f"{self.stage}: micro-batch {plan.micro_batch} of {self.batch_key}={self.cfg.train.batch_size} "
                f"({plan.accumulation_steps} accumulation steps{' per process' if self.world_size > 1 else ''}): "
                f"estimated peak {'at most ' if plan.estimate_is_upper_bound else ''}{plan.estimate_gb} GB of a {plan.budget_gb} GB budget "
                f"({plan.base_gb} GB held + {plan.per_example_gb} GB per example; train.memory_budget={self.cfg.train.memory_budget})"
            )
        return plan

    def probe_peak(self, indices: Sequence[int]) -> int | None:
        """The peak memory of one micro-batch's forward and backward pass (gradients discarded, no
        optimizer step); None when it ran out of memory."""
        self.policy.train()
        batch = self.make_batch(self.train_set, indices, with_rejected=self.stage != "sft")
        try:
            with PeakMemory(self.device) as peak:
                self.batch_loss(batch, "train")[0].backward()
        except Exception as error:
            if not is_out_of_memory(error) or self.world_size > 1:  # the other processes wait in a collective
                raise
            return None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return peak.peak

    def unfittable(self, indices: Sequence[int], budget: int, estimate: int | None) -> str:
        """Why not even the smallest micro-batch fits, and what to change."""
        batch = self.make_batch(self.train_set, indices, with_rejected=self.stage != "sft")
        rows, width = batch["input_ids"].shape
        shape = f"{rows} row{'s' if rows > 1 else ''} of up to {width} tokens"
        needs = f"about {estimate / GB:.1f} GB" if estimate else "more than that (its probe ran out of memory)"
        return (
            f"{self.stage}: the smallest micro-batch ({len(indices)} of the longest examples: {shape}) does not fit in "
            f"train.memory_budget={self.cfg.train.memory_budget} ({budget / GB:.1f} GB on {self.device.type}): one step "
            f"needs {needs}, with the {self.cfg.train.optimizer} state. Lower max_length, use model.dtype=bfloat16, "
            "train.activation_checkpointing=true, trainer=fsdp (over more devices), or give a larger budget"
        )

    def shrink_after_out_of_memory(self, error: BaseException) -> bool:
        """Whether a step that ran out of memory is retried with half the micro-batch: a fitted one,
        within the stage's first steps, in one process (under FSDP the others wait in a collective)."""
        fitted = self.plan.budget_gb is not None
        if not (is_out_of_memory(error) and fitted and self.step < SHRINK_STEPS and self.world_size == 1):
            return False
        if self.plan.micro_batch // 2 < self.smallest_micro_batch():
            return False
        micro = self.plan.micro_batch // 2
        self.plan = MemoryPlan(micro, self.accumulation_for(micro), self.plan.budget_gb)
        if is_main_process():
            print(f"{self.stage}: out of memory at step {self.step + 1}; retrying it with micro-batches of {micro}")
        return True

    def checked_held_out(self, examples: Sequence) -> Sequence:
        """The held-out examples (`evaluation_slice` chose them), refused if this stage cannot evaluate
        them: unpaired alignment needs both sides, unpaired SFT desirable responses."""
        if not self.paired:
            desirable = sum(e.desirable for e in examples)
            one_sided = desirable == len(examples) and self.stage == "align"
            missing = "desirable" if not desirable else "undesirable" if one_sided else None
            if missing:
                raise ConfigError(f"the held-out split ({len(examples)} responses) has no {missing} response; {self.stage} needs one")
        return examples

    def build_sampler(self) -> EpochSampler | BalancedSampler:
        """Pairs: all of them. Unpaired SFT: the desirable responses. Unpaired alignment: both sides."""
        if self.paired:
            return EpochSampler(range(len(self.train_set)), self.cfg.seed)
        if self.stage == "sft":
            return EpochSampler([i for i, item in enumerate(self.train_set) if item.desirable], self.cfg.seed)
        return BalancedSampler([item.desirable for item in self.train_set], self.cfg.seed)

    # ----------------------------------------------------------------------------- batches

    def make_batch(self, examples: Sequence, indices: Sequence[int], with_rejected: bool = True) -> dict:
        """Pairs: [chosen; rejected] sequences. Unpaired items: their responses (desirable first in
        training batches) and, under `mismatched`, each prompt with another item's response."""
        chosen = [examples[i] for i in indices]
        if self.paired:
            return collate(chosen, indices, self.pad_id, with_rejected, packed=self.packed, position_cost=self.position_cost)
        return collate_items(chosen, indices, self.pad_id, self.packed, self.position_cost, continue_prompts=self.continues_prompts)

    def response_tokens(self, example) -> int:
        return len(example.chosen if self.paired else example.response)

    def example_weight(self, examples: Sequence) -> int:
        """How much of a batch's mean loss a micro-batch carries: tokens for SFT, examples otherwise."""
        return sum(map(self.response_tokens, examples)) if self.stage == "sft" else len(examples)

    @staticmethod
    def balanced_parts(examples: Sequence, indices: Sequence[int], parts: int) -> list[list[int]]:
        """Split unpaired `indices` into `parts` batches that each hold both sides, desirable first."""
        sides = [[i for i in indices if examples[i].desirable], [i for i in indices if not examples[i].desirable]]
        if parts > min(map(len, sides)):
            raise ValueError(
                f"{len(sides[0])} desirable and {len(sides[1])} undesirable responses cannot fill {parts} batches "
                "that each need both: use fewer train.gradient_accumulation_steps or larger batches"
            )
        halves = (torch.tensor_split(torch.tensor(side), parts) for side in sides)
        return [chosen.tolist() + rejected.tolist() for chosen, rejected in zip(*halves, strict=True)]

    def split_sides(self, indices: Sequence[int], parts: int) -> list[list[int]]:
        """`parts` micro-batches of a batch; unpaired ones keep both sides in every micro-batch."""
        if self.paired or self.stage == "sft":
            return [chunk.tolist() for chunk in torch.tensor_split(torch.tensor(indices), parts) if len(chunk)]
        return self.balanced_parts(self.train_set, indices, parts)

    def assigned(self, batches: Sequence) -> list[tuple[object, bool]]:
        """The batches this process runs, each with whether its results count: all of them here."""
        return [(batch, True) for batch in batches]

    def merge(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """The results of every process's `assigned` batches, in the order of the batches."""
        return rows

    def gather(self, values: torch.Tensor | None, split: str) -> torch.Tensor | None:
        """The values of the whole batch from this process's part of it: one process holds all."""
        return values

    def sum_over_processes(self, totals: dict[str, float]) -> dict[str, float]:
        return totals

    def eval_batches(self) -> list[list[int]]:
        """Held-out batches in a fixed order covering every example once (both sides in each)."""
        size, count = self.cfg.train.eval_batch_size, len(self.test_set)
        if self.paired or self.stage == "sft":
            kept = [i for i in range(count) if self.paired or self.test_set[i].desirable]
            return [kept[start : start + size] for start in range(0, len(kept), size)]
        desirable = sum(item.desirable for item in self.test_set)
        parts = max(1, min(math.ceil(count / size), desirable, count - desirable))
        return self.balanced_parts(self.test_set, range(count), parts)

    # ----------------------------------------------------------------------------- log-probs

    def logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and token counts of every sequence of the batch, one forward
        in `compute_dtype` (the log-softmax itself in float32)."""
        with self.autocast():
            if self.packed:
                return packed_response_logps(model, *self.packed_inputs(batch))
            return response_logps(model, *(batch[key].to(self.device) for key in ("input_ids", "attention_mask", "labels")))

    def item_logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpaired items: `logps` of the batch's responses, and the no-grad log-probs of its
        mismatched KL sequences (KTO). Packed (without activation checkpointing), these continue the
        batch's own forward from the keys and values of their prompts (`packed_logps_and_continuation`):
        no prompt is computed twice."""
        if self.continues_prompts:
            with self.autocast():
                return packed_logps_and_continuation(model, *self.packed_inputs(batch), self.continuation_inputs(batch["mismatched"]))
        logps, counts = self.logps(model, batch)
        with torch.no_grad():
            return logps, counts, self.logps(model, batch["mismatched"])[0]

    def policy_logps(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The policy's `logps` of the batch, with the log-probs of its mismatched KL sequences where
        KTO's alignment needs them (`item_logps`; None otherwise, and where the batch carries the KL
        pairs of its whole batch)."""
        if self.stage == "align" and self.kto and "batch_kl_pairs" not in batch:
            return self.item_logps(self.policy, batch)
        return (*self.logps(self.policy, batch), None)

    def autocast(self) -> torch.autocast:
        """Compute in `compute_dtype` (off in float32)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def packing(self, model: torch.nn.Module) -> bool:
        """`train.packing`, refused for attention that ignores a custom 4D mask (flash attention)."""
        implementation = model.config._attn_implementation
        if self.cfg.train.packing and implementation not in PACKABLE_ATTENTION:
            raise ConfigError(
                f"train.packing=true shares each prompt between its responses through a 4D attention mask, which "
                f"attn_implementation={implementation} ignores: use {' or '.join(PACKABLE_ATTENTION)}, or train.packing=false"
            )
        return self.cfg.train.packing

    def packed_inputs(self, batch: Mapping) -> list:
        """`packed_response_logps`'s arguments from a packed batch, on this device."""
        keys = ("input_ids", "position_ids", "segment", "part", "predict_at", "targets", "owners")
        return [*(batch[key].to(self.device) for key in keys), batch["sequences"]]

    def continuation_inputs(self, layout: Mapping) -> list:
        """`packed_logps_and_continuation`'s `continuation` from a `continuation_layout`, on this device."""
        keys = ("input_ids", "position_ids", "segment", "sequence", "predict_at", "targets", "owners")
        return [*(layout[key].to(self.device) for key in keys), layout["sequences"]]

    def pair_logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the batch's two sequence sets: (chosen, rejected) of pairs; for unpaired
        items (response, mismatched response) - the second only where KTO needs it."""
        if self.kto:
            logps, _, mismatched = self.item_logps(model, batch)
            return logps, mismatched
        logps, _ = self.logps(model, batch)
        if self.paired:
            return logps.view(2, -1)[0], logps.view(2, -1)[1]
        return logps, torch.zeros_like(logps)

    @torch.no_grad()
    def all_logps(self, model: torch.nn.Module, examples: Sequence, desc: str, stoppable: bool = False) -> torch.Tensor:
        """[len(examples), 2] summed log-probs of `pair_logps`'s two sets, in eval mode. `stoppable`:
        a stop signal ends the pass at once (`Stopped`): for a pass of which nothing is kept unless
        it ends, so that a scheduler's grace period is not spent on it."""
        was_training = model.training
        model.eval()
        size = self.cfg.train.eval_batch_size
        rows = []
        starts = range(0, len(examples), size)
        for start, counted in tqdm(self.assigned(starts), desc=desc, leave=False, disable=not is_main_process()):
            if stoppable and (name := StopSignals.requested()):
                raise Stopped(f"{name} received during the {desc} pass: {self.stage} stopped before its first step, nothing to save", name)
            batch = self.make_batch(examples, range(start, min(start + size, len(examples))))
            logps = torch.stack(self.pair_logps(model, batch), dim=1).float().cpu()
            if counted:
                rows.append(logps)
        model.train(was_training)
        return torch.cat(self.merge(rows))

    def precomputed_reference_logps(self, weights_key: str) -> dict[str, torch.Tensor]:
        """Reference log-probs of each table (`train`, `test`; Sr: `train/augmented`, `test/augmented`
        too), each cached on disk by (weights, its own tokens, how they are computed). A run stopped
        during a later pass keeps the tables already finished, and runs that share a table share its
        file (Sr-DPO's plain tables are DPO's on the same weights and data)."""
        settings = (weights_key, str(self.compute_dtype), self.packed, self.kto)
        tables = {}
        for name, examples in self.reference_table_examples().items():
            key = text_fingerprint(*settings, [astuple(replace(e, augmented=None) if self.paired else e) for e in examples])
            desc = f"reference log-probs ({name.replace('/augmented', ', p + x')})"
            compute = partial(self.all_logps, self.policy, examples, desc, stoppable=True)
            tables[name] = load_or_compute(Path(self.cfg.cache_dir) / "reference_logps" / f"{key}.pt", compute)
        return tables

    def reference_table_examples(self) -> dict[str, Sequence]:
        """The examples of each reference table, by its name (the `split` of `reference_batch_logps`)."""
        tables = {"train": self.train_set, "test": self.test_set}
        if self.loss.refines_on_augmented:
            tables |= {f"{split}/augmented": [e.augmented for e in examples] for split, examples in tables.items()}
        return tables

    def reference_batch_logps(self, batch: Mapping, split: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference's `pair_logps` of the batch (None, None when the loss is reference-free).

        `split` names the cached table (`train`, `test`, `train/augmented`, `test/augmented`).
        """
        if self.reference_logps is not None:
            rows = self.reference_logps[split][batch["index"]].to(self.device)
            return rows[:, 0], rows[:, 1]
        if self.reference_model is None:
            return None, None
        with torch.no_grad():
            return self.pair_logps(self.reference_model, batch)

    def batch_embeddings(self, batch: Mapping, split: str, desirable: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.embeddings is None:
            return {}
        chosen, rejected = self.embeddings[split]
        index = batch["index"]
        if desirable is not None:  # unpaired: the desirable items are the rows, the others the columns
            chosen, rejected = chosen[index[desirable.cpu()]], rejected[index[~desirable.cpu()]]
        else:
            chosen, rejected = chosen[index], rejected[index]
        return {"chosen_embeddings": chosen.to(self.device), "rejected_embeddings": rejected.to(self.device)}

    # ----------------------------------------------------------------------------- self-refinement

    def self_refinement_margin(
        self, logps: torch.Tensor, counts: torch.Tensor, reference: tuple, batch: Mapping, split: str
    ) -> torch.Tensor:
        """Delta per pair: the policy's own reward difference, detached, on the augmented query p + x
        (`sr_delta=refined`: one extra no-grad forward) or on x itself (`naive`: this batch's
        log-probs and `reference`, the reference log-probs of the batch)."""
        beta, kind = self.loss.beta, self.loss.reward
        if self.loss.refines_on_augmented:
            examples = self.train_set if split == "train" else self.test_set
            indices = batch["index"].tolist()
            pairs = [examples[i].augmented for i in indices]
            augmented = collate(pairs, indices, self.pad_id, packed=self.packed, position_cost=self.position_cost)
            with torch.no_grad():
                logps, counts = self.logps(self.policy, augmented)
            reference = self.reference_batch_logps(augmented, f"{split}/augmented")
        chosen, rejected = logps.detach().view(2, -1)
        chosen_lengths, rejected_lengths = counts.view(2, -1)
        chosen_reward = rewards(kind, beta, chosen, reference[0], chosen_lengths, "chosen")
        return chosen_reward - rewards(kind, beta, rejected, reference[1], rejected_lengths, "rejected")

    # ----------------------------------------------------------------------------- losses

    def batch_loss(self, batch: Mapping, split: str, groups: Sequence[int] | None = None) -> tuple[torch.Tensor, Stats]:
        """The batch's loss and its statistics: each a mean over the batch, with what it averages.
        `groups`: the contrast group of each example of the batch (None: one group)."""
        logps, counts, mismatched = self.policy_logps(batch)
        if self.stage == "sft":
            return sft_loss(logps, counts), {"logps/chosen": (logps.mean().item(), len(logps))}
        return self.objective(logps, counts, batch, split, groups, mismatched)

    def objective(
        self,
        logps: torch.Tensor,
        counts: torch.Tensor,
        batch: Mapping,
        split: str,
        groups: Sequence[int] | None = None,
        mismatched: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Stats]:
        """The configured loss from the policy log-probs of the batch's sequences (KTO: and of its
        mismatched KL sequences, `policy_logps`), and its statistics, each with its weight: how many
        pairs (or responses, or response pairs) it is a mean over."""
        if self.kto:
            return self.kto_objective(logps, mismatched, batch, split)
        inputs = self.contrast_inputs(logps, counts, batch, split, groups)
        pairs_of_one_prompt = None if self.paired else same_prompt(*(batch[key].to(self.device) for key in ("prompt_ids", "desirable")))
        return self.contrast_objective(inputs, pairs_of_one_prompt)

    def kto_objective(self, logps: torch.Tensor, mismatched: torch.Tensor | None, batch: Mapping, split: str) -> tuple[torch.Tensor, Stats]:
        """KTO over the batch; under FSDP its items and KL pairs are gathered over every process, so
        the reference point z0 and the mean are those of the whole batch. A micro-batch carries the
        KL pairs of its whole batch (`batch_kl_pairs`), so z0 does not depend on the split either."""
        reference_logps = self.reference_batch_logps(batch, split)[0]
        gathered = (logps, reference_logps, batch["desirable"].to(self.device), batch["prompt_ids"].to(self.device))
        *items, prompt_ids = [self.gather(values, split) for values in gathered]
        kl_pairs = batch.get("batch_kl_pairs") or self.kl_pairs(mismatched, batch, split)
        loss, item_rewards, kl = kto_loss(*items, *kl_pairs, self.loss)
        item_logps, desirable = items[0], items[2]
        stats = self.reward_stats(item_logps[desirable], item_logps[~desirable], item_rewards[desirable], item_rewards[~desirable],
                                  same_prompt(prompt_ids, desirable))
        return loss, {"kl": (kl.item(), len(kl_pairs[0])), **stats}

    def kl_pairs(self, policy_kl_logps: torch.Tensor, batch: Mapping, split: str) -> list[torch.Tensor]:
        """The policy's (no-grad) and the reference's log-probs of the batch's mismatched KL pairs,
        gathered over the processes."""
        return [self.gather(values, split) for values in (policy_kl_logps, self.reference_batch_logps(batch, split)[1])]

    def part_kl_pairs(self, batch: Mapping) -> list[torch.Tensor]:
        """`kl_pairs` of one micro-batch of a training batch, ahead of the gradient passes (so that
        every micro-batch's z0 is the whole batch's)."""
        with torch.no_grad():
            return self.kl_pairs(self.item_logps(self.policy, batch)[2], batch, "train")

    def contrast_inputs(self, logps: torch.Tensor, counts: torch.Tensor, batch: Mapping, split: str, groups: Sequence[int] | None) -> dict:
        """`preference_loss`'s per-response arguments for the batch: policy and reference log-probs,
        lengths, embeddings, the self-refinement margin and the contrast groups of each side."""
        reference = self.reference_batch_logps(batch, split)
        if self.paired:
            desirable = None
            policy, lengths = logps.view(2, -1), counts.view(2, -1)
            references = reference
        else:
            desirable = batch["desirable"].to(self.device)
            policy, lengths = (logps[desirable], logps[~desirable]), (counts[desirable], counts[~desirable])
            references = (None, None) if reference[0] is None else (reference[0][desirable], reference[0][~desirable])
        inputs = {
            "policy_chosen_logps": policy[0],
            "policy_rejected_logps": policy[1],
            "reference_chosen_logps": references[0],
            "reference_rejected_logps": references[1],
            "chosen_lengths": lengths[0],
            "rejected_lengths": lengths[1],
            **self.batch_embeddings(batch, split, desirable),
        }
        if self.loss.self_refined:
            inputs["margin"] = self.self_refinement_margin(logps, counts, reference, batch, split)
        if groups is not None and self.loss.contrasts_across_examples:
            ids = torch.tensor(list(groups), device=self.device)
            inputs["groups"] = (ids, ids) if desirable is None else (ids[desirable], ids[~desirable])
        return inputs

    def contrast_objective(self, inputs: Mapping, same_prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
        """`preference_loss` of `contrast_inputs` and its statistics (`same_prompt`: see `reward_stats`)."""
        loss, chosen_rewards, rejected_rewards = preference_loss(**inputs, cfg=self.loss)
        stats = self.reward_stats(inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], chosen_rewards, rejected_rewards,
                                  same_prompt)
        margin = inputs.get("margin")
        if margin is not None:
            stats["sr/delta_mean"] = (margin.mean().item(), len(margin))
            stats["sr/delta_squared"] = (margin.square().mean().item(), len(margin))  # becomes sr/delta_std
            if self.loss.refines_on_augmented:  # naive: the margin comes from x itself, as rewards/accuracy
                stats["sr/accuracy_augmented"] = ((margin > 0).float().mean().item(), len(margin))  # the policy's judgement on p + x
        return loss, stats

    def reward_stats(
        self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
        same_prompt: torch.Tensor | None = None,
    ) -> Stats:
        """Rewards, their accuracy and margin, and log-probs of the chosen and rejected responses.

        Paired, the accuracy is each pair's own comparison; unpaired, every chosen response against
        every rejected one, mostly answers to other prompts. `same_prompt` ([chosen, rejected], unpaired
        only) marks the comparisons of one prompt's responses: their accuracy is
        `rewards/accuracy_same_prompt`, on data made of pairs the paired runs' measure."""
        wins = chosen_rewards > rejected_rewards if self.paired else chosen_rewards.unsqueeze(1) > rejected_rewards.unsqueeze(0)
        responses = len(chosen) + len(rejected)
        same = {}
        if same_prompt is not None:  # weight 0 where there are none: every process reports the same keys
            compared = int(same_prompt.sum())
            same["rewards/accuracy_same_prompt"] = (wins[same_prompt].float().mean().item() if compared else 0.0, compared)
        return {**same,
            "rewards/chosen": (chosen_rewards.mean().item(), len(chosen)),
            "rewards/rejected": (rejected_rewards.mean().item(), len(rejected)),
            "rewards/accuracy": (wins.float().mean().item(), wins.numel()),
            "rewards/margin": ((chosen_rewards.mean() - rejected_rewards.mean()).item(), responses),
            "logps/chosen": (chosen.detach().mean().item(), len(chosen)),
            "logps/rejected": (rejected.detach().mean().item(), len(rejected)),
        }

    # ----------------------------------------------------------------------------- contrast groups

    def contrast_groups(self, examples: Sequence, indices: Sequence[int]) -> list[list[int]]:
        """A batch's contrast groups (RPO's matrices): `loss.contrast_group` consecutive pairs each,
        None one group; unpaired items are dealt into groups of at least that many, each with both
        sides (fewer, larger groups when one side is too rare)."""
        size = self.loss.contrast_group or len(indices)
        if self.paired:
            return [list(indices[start : start + size]) for start in range(0, len(indices), size)]
        desirable = sum(examples[i].desirable for i in indices)
        return self.balanced_parts(examples, indices, max(1, min(len(indices) // size, desirable, len(indices) - desirable)))

    def grouped_order(self, examples: Sequence, indices: Sequence[int]) -> tuple[list[int], list[int]]:
        """The batch's indices group after group (`contrast_groups`), and the group of each."""
        groups = self.contrast_groups(examples, indices)
        return [i for group in groups for i in group], [g for g, group in enumerate(groups) for _ in group]

    def grouped_micro_batches(self, indices: Sequence[int], count: int) -> tuple[list[tuple[list[int], list[int]]], int, bool]:
        """This process's `count` micro-batches of a batch, each (indices, contrast group of each), the
        number of groups in the whole batch, and whether a group spans micro-batches or processes
        (then `cached_gradients` computes the step). Micro-batches are dealt whole groups when the
        groups divide evenly among them; otherwise the batch is split as `split_sides` would."""
        order, groups = self.grouped_order(self.train_set, indices)
        total = groups[-1] + 1
        chunks = count * self.world_size  # micro-batch m of process r is chunk m * world_size + r
        spans = total % chunks != 0
        if not spans:
            per = total // chunks
            positions = [[p for p, group in enumerate(groups) if group // per == chunk] for chunk in range(chunks)]
        elif self.paired:
            positions = [chunk.tolist() for chunk in torch.tensor_split(torch.arange(len(order)), chunks)]
        else:
            positions = self.balanced_parts([self.train_set[i] for i in order], range(len(order)), chunks)
        mine = [positions[m * self.world_size + self.rank] for m in range(count)]
        return [([order[p] for p in part], [groups[p] for p in part]) for part in mine], total, spans

    def cached_gradients(self, parts: Sequence[tuple[list[int], list[int]]]) -> tuple[float, Stats, int]:
        """Gradient caching: the exact gradient of contrast groups that span micro-batches or
        processes, at the memory of one micro-batch.

        1. A no-grad forward of each micro-batch gives every sequence's log-prob (and the reference
           log-probs, embeddings and self-refinement margins); under FSDP every process's are gathered.
        2. The loss of the whole batch is computed from those scalars; autograd gives dL/dlogp per sequence.
        3. Each micro-batch is run again with gradients (the same dropout masks: its RNG state is
           restored) and `(dL/dlogp * logp).sum()` is backpropagated: the chain rule, one part at a time.

        Returns the batch's loss, its statistics and this process's token count.
        """
        batches, states, inputs = [], [], []
        with torch.no_grad():
            for part, groups in parts:
                batch = self.make_batch(self.train_set, part)
                states.append(rng_state())
                inputs.append(self.contrast_inputs(*self.logps(self.policy, batch), batch, "train", groups))
                batches.append(batch)
        local = {key: merge_values([values[key] for values in inputs]) for key in inputs[0]}
        every = gather_objects(to_device(local, torch.device("cpu")))
        merged = to_device({key: merge_values([values[key] for values in every]) for key in local}, self.device)
        policy = [merged[f"policy_{side}_logps"].requires_grad_() for side in ("chosen", "rejected")]
        loss, stats = self.contrast_objective(merged)
        gradients = torch.autograd.grad(loss, policy)
        # this process's slices of the gradients: after the earlier processes', micro-batch by micro-batch
        starts = [sum(len(values[f"policy_{side}_logps"]) for values in every[: self.rank]) for side in ("chosen", "rejected")]
        for number, (batch, state) in enumerate(zip(batches, states, strict=True), start=1):
            set_rng_state(state)
            logps, _ = self.logps(self.policy, batch)
            desirable = None if self.paired else batch["desirable"].to(self.device)
            sides = logps.view(2, -1) if desirable is None else (logps[desirable], logps[~desirable])
            surrogate = 0
            for side, (sequence_logps, start) in enumerate(zip(sides, starts, strict=True)):
                surrogate = surrogate + (gradients[side][start : start + len(sequence_logps)] * sequence_logps).sum()
                starts[side] += len(sequence_logps)
            self.set_gradient_sync(number == len(batches))
            (surrogate * self.world_size).backward()  # gradients are averaged over the processes
        return loss.item(), stats, sum(batch["tokens"] for batch in batches)

    # ----------------------------------------------------------------------------- training

    def train_step(self, indices: Sequence[int]) -> dict[str, float]:
        """One optimizer step on a batch: `accumulate_gradients`, clipping, the update."""
        record = self.accumulate_gradients(indices)
        grad_norm = self.clip_gradients()
        learning_rate = self.scheduler.get_last_lr()[0]
        if math.isfinite(record["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.skip_nonfinite(indices, record["loss"], grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**record, "lr": learning_rate, "grad_norm": grad_norm, "skipped_nonfinite": self.skipped_nonfinite}

    def accumulate_gradients(self, indices: Sequence[int]) -> dict[str, float]:
        """The gradient of a batch's loss, summed into the parameters' `.grad` micro-batch by
        micro-batch (`micro_batch_count`), and the batch's statistics.

        Each micro-batch loss is weighted by its share of the batch (of its examples or, for a
        contrast across examples, of its contrast groups), so the gradient equals that of the whole
        batch in one pass. When a contrast group spans micro-batches, `cached_gradients` runs.
        """
        self.policy.train()
        count = self.micro_batch_count(len(indices))
        means = WeightedMeans()
        if self.stage == "align" and self.loss.contrasts_across_examples:
            parts, total_weight, spans = self.grouped_micro_batches(indices, count)
            self.announce_contrast_path(parts, spans)
            if spans:
                loss, stats, tokens = self.cached_gradients(parts)
                means.add({"loss": (loss, 1), **stats})
                return means.result(self.sum_over_processes, tokens=tokens)
        else:
            parts = [(part, None) for part in self.split_sides(indices, count)]
            total_weight = self.example_weight([self.train_set[i] for i in indices])
        tokens, batch_kl_pairs = 0, None
        if self.stage == "align" and self.kto and len(parts) > 1:  # KTO's z0 from the whole batch's KL pairs
            every_part = [self.part_kl_pairs(self.make_batch(self.train_set, part)) for part, _ in parts]
            batch_kl_pairs = [torch.cat(values) for values in zip(*every_part, strict=True)]
        for number, (part, groups) in enumerate(parts, start=1):
            batch = self.make_batch(self.train_set, part, with_rejected=self.stage != "sft")
            if batch_kl_pairs is not None:
                batch["batch_kl_pairs"] = batch_kl_pairs
            tokens += batch["tokens"]
            self.set_gradient_sync(number == len(parts))
            loss, stats = self.batch_loss(batch, "train", groups)
            weight = len(set(groups)) if groups is not None else self.example_weight([self.train_set[i] for i in part])
            # gradients are averaged over the processes: each carries its share of the whole batch
            (loss * (weight / total_weight) * self.world_size).backward()
            means.add({"loss": (loss.item(), weight), **stats})
        return means.result(self.sum_over_processes, tokens=tokens)

    def announce_contrast_path(self, parts: Sequence[tuple[list[int], list[int]]], spans: bool) -> None:
        """Say how the contrast groups are computed and what it costs, once per stage and layout."""
        self.contrast_path = "gradient_caching" if spans else "one_pass"
        unit = "pairs" if self.paired else "responses"
        size = f"{self.loss.contrast_group} {unit}" if self.loss.contrast_group else "the whole batch"
        layout = f"micro-batches of {len(parts[0][0])} {unit}" + (f" on each of {self.world_size} processes" if self.world_size > 1 else "")
        if spans:
            note = (f"{self.stage}: contrast groups of {size} span {layout}: gradient caching "
                    "(a no-grad forward of every micro-batch first: about one more forward per step)")
        else:
            note = f"{self.stage}: contrast groups of {size}, whole in {layout}: one pass"
        if note != self.contrast_note and is_main_process():
            print(note)
        self.contrast_note = note

    def skip_nonfinite(self, indices: Sequence[int], loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient is not finite is never applied: it stops the run (the last
        checkpoint stays as it was) or, with `train.skip_nonfinite`, is skipped and counted."""
        where = f"{self.stage} step {self.step + 1} (examples {self.examples}-{self.examples + len(indices) - 1} of the stage)"
        if not self.cfg.train.skip_nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            saved = f"the last checkpoint (at {self.checkpointed_at} examples) is intact" if self.checkpointed_at else "no checkpoint yet"
            raise NonFiniteLoss(
                f"{where}: loss {loss}, gradient norm {grad_norm}; the step was not applied and {saved}. "
                f"Training examples {sorted(indices)[:16]}{' ...' if len(indices) > 16 else ''}; "
                "train.skip_nonfinite=true skips such batches"
            )
        self.skipped_nonfinite += 1
        if is_main_process():
            print(f"{where}: loss {loss}, gradient norm {grad_norm}: skipped ({self.skipped_nonfinite} so far)")

    def fitted_train_step(self, indices: Sequence[int]) -> dict[str, float]:
        """`train_step`, retried on the same batch with half the micro-batch when a fitted one runs
        out of memory early (`shrink_after_out_of_memory`); the retry draws the same dropout masks."""
        rng = rng_state()
        while True:
            try:
                return self.train_step(indices)
            except Exception as error:
                if not self.shrink_after_out_of_memory(error):
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            set_rng_state(rng)

    def set_gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward pass synchronises gradients across processes (one process: no-op)."""

    def clip_gradients(self) -> float:
        """Clip the gradient norm to `train.max_grad_norm`; return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm).item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, rewards and, on pairs, the policy's own preference:
        log pi(chosen) > log pi(rejected) (`logp_accuracy`)."""
        self.policy.eval()
        means = WeightedMeans()
        grouped = self.stage == "align" and self.loss.contrasts_across_examples
        batches = self.assigned(self.eval_batches())
        for indices, counted in tqdm(batches, desc=f"{self.stage}: held-out evaluation", leave=False, disable=not is_main_process()):
            groups = None
            if grouped:  # contrast groups within each held-out batch, as in training
                indices, groups = self.grouped_order(self.test_set, indices)
            batch = self.make_batch(self.test_set, indices)
            logps, counts, mismatched = self.policy_logps(batch)
            stats: Stats = {}
            if self.paired:
                chosen, rejected = logps.view(2, -1)
                stats["logp_accuracy"] = ((chosen > rejected).float().mean().item(), len(chosen))
            if self.stage == "sft":
                chosen_counts = counts.view(2, -1)[0] if self.paired else counts
                chosen_logps = chosen if self.paired else logps
                stats["loss"] = (sft_loss(chosen_logps, chosen_counts).item(), chosen_counts.sum().item())  # a mean over tokens
                stats["logps/chosen"] = (chosen_logps.mean().item(), len(chosen_logps))
            else:
                loss, objective_stats = self.objective(logps, counts, batch, "test", groups, mismatched)
                stats.update({"loss": (loss.item(), len(indices)), **objective_stats})
            means.add(stats, counted)  # a repeated batch (under FSDP) runs but does not count
        self.policy.train()
        return means.result(self.sum_over_processes)

    def log(self, kind: str, values: Mapping) -> None:
        prefix = "eval/" if kind == "eval" else ""
        record = {"stage": self.stage, "step": self.step, "examples": self.examples}
        record.update({(k if k in TIMING_KEYS else prefix + k): v for k, v in values.items()})
        self.metrics.log(record)

    def crossed(self, every: int | None, before: int) -> bool:
        return bool(every) and self.examples // every > before // every

    def train(self, start_offset: int) -> dict:
        """Run the stage to its budget (resuming from `checkpoint/` if there is one).

        `start_offset` is where this stage's lines begin in metrics.jsonl: a stage that starts
        over drops whatever an interrupted attempt logged after it.
        """
        initial_eval = self.load_checkpoint() if on_main_process(self.usable_checkpoint) else None
        if initial_eval is None:  # every stage starts from its own seed: a run resumed between stages draws as one that was not
            seed_everything(self.cfg.seed + STAGE_SEEDS[self.stage])
        self.micro_batches()
        if initial_eval is None:
            self.metrics.truncate(start_offset)
            initial_eval = self.evaluate()
            self.log("eval", initial_eval)
        quiet = not is_main_process()
        # a context: an error closes the bar too, so the error's line starts on a line of its own
        with tqdm(total=self.total_examples, initial=self.examples, desc=self.stage, unit="ex", disable=quiet) as bar:
            while self.examples < self.total_examples:
                self.stop_if_signalled(initial_eval)
                started = time.perf_counter()
                indices = self.sampler.take(min(self.cfg.train.batch_size, self.total_examples - self.examples))
                before = self.examples
                record = self.fitted_train_step(indices)
                self.step += 1
                self.examples += len(indices)
                seconds = time.perf_counter() - started
                record.update(seconds=seconds, tokens_per_s=record.pop("tokens") / seconds)
                bar.update(len(indices))
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if self.step % self.cfg.train.log_every == 0:
                    self.log("train", record)
                if self.crossed(self.cfg.train.eval_every, before) and self.examples < self.total_examples:
                    self.log("eval", self.evaluate())
                if self.crossed(self.cfg.train.save_every, before) and self.examples < self.total_examples:
                    self.save_checkpoint(initial_eval)
        if self.checkpointed_at != self.examples:  # an error in the final evaluation or export loses no training
            self.save_checkpoint(initial_eval)
        final_eval = self.evaluate()
        self.log("eval", final_eval)
        return self.save_final(initial_eval, final_eval)

    def stop_if_signalled(self, initial_eval: Mapping) -> None:
        """After a stop signal (`StopSignals`; on any process): checkpoint the steps done, then stop."""
        name = StopSignals.requested()
        if name is None:
            return
        if self.checkpointed_at != self.examples:
            self.save_checkpoint(initial_eval)
        saved = f"checkpoint in {self.stage_dir / 'checkpoint'}" if self.examples else "nothing to save yet"
        raise Stopped(f"{name} received: {self.stage} stopped after step {self.step} ({self.examples} examples), {saved}", name)

    # ----------------------------------------------------------------------------- checkpoints

    def stage_model(self, folder: Path, final: bool) -> Path:
        """Write an HF-format folder (weights, config, tokenizer) beside `folder`, to be swapped in."""
        state = self.exported_state(final)
        staging = folder.with_name(folder.name + ".tmp")
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
            self.policy.save_pretrained(staging, state_dict=state)
            if state is not None:  # save_pretrained names the fp32 parameters' dtype, not the export's
                self.policy.config.dtype = self.cfg.model.dtype  # an exported state is in model.dtype
                self.policy.config.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
        barrier()
        return staging

    def exported_state(self, final: bool) -> dict[str, torch.Tensor] | None:
        """The weights `save_pretrained` writes (None: the model's own state dict): a final model in
        `model.dtype`, a checkpoint in float32, the master weights that resume continues from."""
        dtype = getattr(torch, self.cfg.model.dtype)
        return cast_state_dict(self.policy, self.policy.state_dict(), dtype) if final and dtype != torch.float32 else None

    def save_checkpoint(self, initial_eval: Mapping) -> None:
        """Weights + trainer state (optimizer, scheduler, position, RNG), swapped in atomically."""
        staging = self.stage_model(self.stage_dir / "checkpoint", final=False)
        state = {
            **self.save_training_state(staging),
            "scheduler": self.scheduler.state_dict(),
            "counters": [self.step, self.examples, self.skipped_nonfinite],
            "sampler": self.sampler.state(),
            "rng": gather_objects(rng_state()),  # every process's: each draws its own dropout masks
            "metrics_offset": self.metrics.offset(),
            "initial_eval": json.dumps(initial_eval),
            "micro_batches": json.dumps(self.plan.as_dict()),
        }
        if is_main_process():
            atomic_torch_save(state, staging / "trainer_state.pt")
            write_checksums(staging)
            record_progress(self.stage_dir.parent)  # the run folder's state.json: this launch ran until here (utils)
            self.swap_into_place(staging, self.stage_dir / "checkpoint", keep_previous=True)
        barrier()
        self.checkpointed_at = self.examples

    def save_training_state(self, staging: Path) -> dict:
        """What of the trained state the HF weights lack (here the optimizer, for trainer_state.pt)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_training_state(self, folder: Path, state: Mapping) -> None:
        """Restore the weights and the optimizer from a checkpoint folder."""
        load_weights(self.policy, folder)
        self.optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def swap_into_place(staging: Path, folder: Path, keep_previous: bool = False) -> None:
        """Replace `folder` by `staging`; at every instant one complete copy exists on disk. With
        `keep_previous` the replaced copy stays as `<folder>.previous` (a checkpoint's fallback)."""
        previous = folder.with_name(folder.name + (".previous" if keep_previous else ".old"))
        shutil.rmtree(previous, ignore_errors=True)
        if folder.exists():
            folder.rename(previous)
        staging.rename(folder)
        if not keep_previous:
            shutil.rmtree(previous, ignore_errors=True)

    @staticmethod
    def recover(folder: Path) -> None:
        """Undo a swap that a crash interrupted between its two renames."""
        for suffix in (".old", ".previous"):
            previous = folder.with_name(folder.name + suffix)
            if previous.exists() and not folder.exists():
                previous.rename(folder)

    def usable_checkpoint(self) -> bool:
        """Whether the stage has a checkpoint to resume that matches its checksums. A corrupt one is
        moved aside (kept, named in the message) and the previous checkpoint is used if it is sound."""
        checkpoint = self.stage_dir / "checkpoint"
        self.recover(checkpoint)
        if not checkpoint.exists():
            return False
        problem = checksum_problem(checkpoint)
        if problem is None:
            return True
        aside = checkpoint.with_name(f"checkpoint.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoint.rename(aside)
        previous = checkpoint.with_name("checkpoint.previous")
        if previous.exists() and checksum_problem(previous) is None:
            previous.rename(checkpoint)
            print(f"{self.stage}: checkpoint refused ({problem}); moved to {aside.name}; resuming from the previous checkpoint")
            return True
        raise CorruptCheckpoint(
            f"{self.stage}: checkpoint refused ({problem}) and there is no sound previous checkpoint; it is kept as {aside}. "
            f"Run again to start the stage over, or restore a checkpoint into {checkpoint}"
        )

    def load_checkpoint(self) -> dict:
        folder = self.stage_dir / "checkpoint"
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        self.load_training_state(folder, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples, self.skipped_nonfinite = [*state["counters"], 0][:3]  # older checkpoints lack the count
        self.checkpointed_at = self.examples
        self.sampler.load(state["sampler"])
        if self.plan is None and "micro_batches" in state:  # auto: the micro-batch the run fitted, not a new fit
            saved = MemoryPlan(**json.loads(state["micro_batches"]))
            self.plan = MemoryPlan(**{**saved.as_dict(), "accumulation_steps": self.accumulation_for(saved.micro_batch)})
            self.total_examples = self.planned_examples()
        rng = state["rng"]
        set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])  # resharded: rank 0's where a rank is new
        self.metrics.truncate(state["metrics_offset"])
        if is_main_process():
            print(f"Resuming {self.stage} from {folder} at step {self.step} ({self.examples} examples)")
        return json.loads(state["initial_eval"])

    def save_final(self, initial_eval: Mapping, final_eval: Mapping) -> dict:
        result = {
            "initial_eval": dict(initial_eval),
            "final_eval": dict(final_eval),
            "steps": self.step,
            "examples": self.examples,
            "skipped_nonfinite": self.skipped_nonfinite,
            "micro_batches": self.plan.as_dict(),
            "metrics_offset": self.metrics.offset(),
        }
        staging = self.stage_model(self.stage_dir / "final", final=True)
        if is_main_process():
            (staging / "result.json").write_text(json.dumps(result, indent=2))
            write_checksums(staging)
            record_progress(self.stage_dir.parent)
            self.swap_into_place(staging, self.stage_dir / "final")
            for checkpoint in ("checkpoint", "checkpoint.previous"):
                shutil.rmtree(self.stage_dir / checkpoint, ignore_errors=True)
        barrier()
        return result
