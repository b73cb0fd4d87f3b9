"""FSDPTrainer: the BasicTrainer loop, sharded over the processes of torchrun (GPUs or CPU/gloo).

Only how the model is wrapped, how batches are split, how metrics are reduced and how
checkpoints are written differ from `BasicTrainer`:

- every transformer block (`model.block_name`) and then the whole model go through
  `torch.distributed.fsdp.fully_shard`; on GPUs compute is bf16, gradients are reduced in fp32 and
  the parameters and optimizer state stay fp32;
- each micro-batch of the global batch is split evenly over the processes, so the loss and the
  update equal those of one process on the whole batch: an RPO contrast group that spans processes
  is computed by gradient caching over the all-gathered log-probs (`BasicTrainer.cached_gradients`),
  KTO's items and KL pairs are all-gathered with their gradient (`gather`);
- held-out batches and reference log-probs are dealt out round-robin and merged;
- checkpoints: the full Hugging Face model written by rank 0, plus the sharded model and
  optimizer state as a torch distributed checkpoint (`checkpoint/sharded/`).
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.nn.functional as distributed_autograd
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from trainers.basic import BasicTrainer, cast_state_dict
from trainers.memory import enable_activation_checkpointing
from utils import (
    ConfigError,
    gather_objects,
    is_main_process,
    packed_logps_and_continuation,
    packed_response_logps,
    rank,
    response_logps,
    world_size,
)

MIXED_PRECISION = ("auto", "bf16", "fp32")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FSDPTrainer(BasicTrainer):
    """`BasicTrainer` over W processes: same arguments, same results (to float rounding)."""

    @classmethod
    def launch(cls, cfg: DictConfig) -> torch.device:
        """Join torchrun's process group (NCCL for CUDA tensors, gloo for CPU ones); a plain
        `python train.py trainer=fsdp` runs as a group of one."""
        if not dist.is_initialized() and "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        device = torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)  # before the group starts, so NCCL binds this GPU
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        return device

    def __init__(self, cfg: DictConfig, stage: str, policy: torch.nn.Module, *args, **kwargs):
        self.rank, self.world_size = rank(), world_size()
        super().__init__(cfg, stage, policy, *args, **kwargs)

    # ----------------------------------------------------------------------------- wrapping

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard each transformer block, then the rest; parameters are kept in fp32."""
        bf16 = self.compute_dtype == torch.bfloat16
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        name = self.cfg.model.block_name
        blocks = [module for module in model.modules() if type(module).__name__ == name]
        if not blocks:
            present = sorted({type(module).__name__ for module in model.modules() if type(module).__name__.endswith("Layer")})
            raise ConfigError(f"model.block_name={name}: {type(model).__name__} has no such module (it has {', '.join(present)})")
        frozen = not any(parameter.requires_grad for parameter in model.parameters())
        if self.cfg.fsdp.activation_checkpointing and not frozen:
            enable_activation_checkpointing(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in blocks:  # cast block by block: the host never holds a second full copy
            fully_shard(block.float(), mesh=mesh, mp_policy=precision)
        for parameter in model.parameters():
            if not isinstance(parameter, DTensor):
                parameter.data = parameter.data.float()  # in place: tied embeddings stay tied
        # a frozen model has no backward to keep the root's gathered weights for
        fully_shard(model, mesh=mesh, mp_policy=precision, reshard_after_forward=True if frozen else None)
        # The loop scores sequences with `response_logps`, `packed_response_logps` and
        # `packed_logps_and_continuation` (backbone, then the LM head on response positions only),
        # not `forward`: FSDP must gather the root's weights around them too.
        for method in (response_logps, packed_response_logps, packed_logps_and_continuation):
            setattr(model, method.__name__, partial(method, model))
            register_fsdp_forward_method(model, method.__name__)
        return model

    def compute_precision(self) -> torch.dtype:
        """`fsdp.mixed_precision`: bf16 (auto on GPUs) casts the fp32 parameters for each forward."""
        setting = self.cfg.fsdp.mixed_precision
        if setting not in MIXED_PRECISION:
            raise ConfigError(f"fsdp.mixed_precision={setting!r}: choose one of {', '.join(MIXED_PRECISION)}")
        bf16 = setting == "bf16" or (setting == "auto" and self.device.type == "cuda")
        return torch.bfloat16 if bf16 else torch.float32

    def all_logps(self, model: torch.nn.Module, examples: Sequence, desc: str, stoppable: bool = False) -> torch.Tensor:
        try:
            return super().all_logps(model, examples, desc, stoppable)
        finally:
            model.reshard()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        try:
            return super().evaluate()
        finally:
            # the root module keeps its gathered weights after a forward (training needs them
            # again at once); the optimizer and checkpoints must see the sharded ones
            self.policy.reshard()

    def logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed:
            return model.packed_response_logps(*self.packed_inputs(batch))
        return model.response_logps(*(batch[key].to(self.device) for key in ("input_ids", "attention_mask", "labels")))

    def item_logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.continues_prompts:
            return model.packed_logps_and_continuation(*self.packed_inputs(batch), self.continuation_inputs(batch["mismatched"]))
        return super().item_logps(model, batch)

    # ----------------------------------------------------------------------------- batches

    def planned_examples(self) -> int:
        """Whole batches only (a last, partial one could not be split evenly), checked at start-up:
        a batch the processes cannot share evenly is refused before any work."""
        planned = super().planned_examples()
        batch, steps = self.cfg.train.batch_size, self.plan.accumulation_steps if self.plan else 1
        if batch % (self.world_size * steps):
            raise ConfigError(
                f"{self.batch_key}={batch} cannot be split evenly over {self.world_size} processes x {steps} "
                f"micro-batches: use a multiple of {self.world_size * steps}"
            )
        if planned < batch:
            raise ConfigError(f"{self.stage} has {planned} training examples, less than one batch ({self.batch_key}={batch})")
        whole_batches = planned - planned % batch
        if whole_batches < planned and is_main_process():
            print(f"FSDP: {self.stage} runs {whole_batches} examples; the last {planned - whole_batches} do not fill a batch of {batch}")
        return whole_batches

    def split_sides(self, indices: Sequence[int], parts: int) -> list[list[int]]:
        """This process's part of each micro-batch: the micro-batches are those of one process."""
        micro_batches = super().split_sides(indices, parts)
        if self.paired or self.stage == "sft":
            return [torch.tensor_split(torch.tensor(part), self.world_size)[self.rank].tolist() for part in micro_batches]
        return [self.balanced_parts(self.train_set, part, self.world_size)[self.rank] for part in micro_batches]

    def assigned(self, batches: Sequence) -> list[tuple[object, bool]]:
        """Batches dealt out round-robin; a process short of one repeats its last, uncounted, because
        every process must run the same forwards (each one all-gathers the sharded weights)."""
        batches = list(batches)
        mine = batches[self.rank :: self.world_size]
        rounds = math.ceil(len(batches) / self.world_size)
        return [(batch, True) for batch in mine] + [(batches[-1], False)] * (rounds - len(mine))

    def merge(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        every = gather_objects(rows)
        count = sum(map(len, every))
        return [every[i % self.world_size][i // self.world_size] for i in range(count)]

    def gather(self, values: torch.Tensor | None, split: str) -> torch.Tensor | None:
        """In training: every process's values in rank order, the gradient flowing back to the
        process that computed them. Parts may differ in length."""
        if values is None or split != "train":
            return values
        is_bool = values.dtype == torch.bool
        local = values.to(torch.uint8) if is_bool else values
        lengths = gather_objects(len(local))
        padded = torch.cat([local, local.new_zeros(max(lengths) - len(local), *local.shape[1:])])
        with warnings.catch_warnings():  # its suggested replacement lacks autograd on gloo
            warnings.simplefilter("ignore", FutureWarning)
            parts = distributed_autograd.all_gather(padded.contiguous())
        gathered = torch.cat([part[:length] for part, length in zip(parts, lengths, strict=True)])
        return gathered.bool() if is_bool else gathered

    # ----------------------------------------------------------------------------- reductions

    def sum_over_processes(self, totals: dict[str, float]) -> dict[str, float]:
        keys = sorted(totals)
        values = torch.tensor([float(totals[key]) for key in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return dict(zip(keys, values.tolist(), strict=True))

    def set_gradient_sync(self, enabled: bool) -> None:
        self.policy.set_requires_gradient_sync(enabled)

    def clip_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()

    # ----------------------------------------------------------------------------- checkpoints

    def exported_state(self, final: bool) -> dict[str, torch.Tensor]:
        """The full weights on rank 0 (an empty dict on the others) in `model.dtype`, gathered from
        every process; checkpoints keep the fp32 master weights in their sharded part."""
        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return cast_state_dict(self.policy, state, getattr(torch, self.cfg.model.dtype))

    def save_training_state(self, staging: Path) -> dict:
        """The sharded fp32 weights and optimizer state, each process writing its own shard."""
        model_state, optimizer_state = get_state_dict(self.policy, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / "sharded")
        return {"world_size": self.world_size}

    def load_training_state(self, folder: Path, state: Mapping) -> None:
        if state["world_size"] != self.world_size and is_main_process():
            print(f"{folder} was written by {state['world_size']} processes: resharding it over {self.world_size}")
        model_state, optimizer_state = get_state_dict(self.policy, self.optimizer)
        sharded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(sharded, checkpoint_id=folder / "sharded")
        set_state_dict(self.policy, self.optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"])
