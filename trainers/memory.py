"""Fitting a training step in memory: the budget, peak measurement, and the micro-batch choice.

`train.micro_batch_size: auto` runs two probe steps (forward and backward of the real loss, no
optimizer step) on the longest training examples, fits `peak = base + per_example * k`, and picks
the largest micro-batch k whose estimate, with the optimizer state still to come, stays within
`train.memory_budget`. The probes run under an allocation limit of the budget, so a step that
would not fit fails with an error here instead of being killed by the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
import resource
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils import ConfigError

GB = 1e9
# of the memory free when a stage starts, the share a step may use: the rest absorbs the allocator's
# fragmentation, evaluation batches and other programs
SAFE_SHARE = {"cpu": 0.8, "cuda": 0.9}
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
HEADROOM = 256 * 2**20  # allowed beyond the budget under the probes' limit: thread stacks, allocator arenas
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
PROC_CGROUP, CGROUP_ROOT = Path("/proc/self/cgroup"), Path("/sys/fs/cgroup")
V1_NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as the largest page count in bytes (about 2**63)
OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2, "sgd": 0}  # fp32 tensors per parameter (square_avg; exp_avg, exp_avg_sq)


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)) * 1024


def in_use(device: torch.device) -> int:
    """Bytes this process holds now: resident memory on the CPU, tensors allocated on a GPU."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_kb("VmRSS")


def release_cached(device: torch.device) -> None:
    """Hand freed memory back to the system, so that resident memory (and a probe's peak over it)
    counts what is in use: glibc keeps freed heap blocks, CUDA's allocator its cached blocks."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def keep_large_blocks_in_heap() -> None:
    """Make glibc serve allocations over 32 MB from its heap, and keep freed heap for reuse.

    By default each of them is a fresh mmap, unmapped at free, so every step pays anew the page
    faults of its LM-head chunks, weight casts and gradients: x1.20 a fp32 DPO step of SmolLM2 on
    2 cores (docs/BENCHMARKS.md; the cost for which CPU tuning guides for PyTorch recommend jemalloc
    or tcmalloc). Resident memory then stays near the step's peak between steps; `release_cached`
    still hands freed heap back where a measurement needs it."""
    if LIBC is not None and hasattr(LIBC, "mallopt"):
        LIBC.mallopt(M_MMAP_MAX, 0)
        LIBC.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: free GPU memory; on the CPU the kernel's MemAvailable, or
    less where this process's memory cgroup has a limit (`cgroup_room`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available, room = _meminfo_kb("MemAvailable"), cgroup_room()
    return available if room is None else min(available, room)


def cgroup_room() -> int | None:
    """Bytes this process's memory cgroup can still take where it or a parent has a limit: a SLURM
    job's or a container's share of the host, which MemAvailable does not know (a budget from it
    alone gets the job killed). The tightest limit less what is charged to it, reclaimable page
    cache counted as room; None where there is no limit or the files cannot be read."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
        rooms = []
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2: every level below the mount may set memory.max
                mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
                folder = _cgroup_folder(mount, path)
                rooms += [room for level in (folder, *folder.parents) if level.is_relative_to(mount)
                          and (room := _v2_room(level)) is not None]
            elif "memory" in controllers.split(","):  # cgroup v1: the stat file gives the limit with the parents'
                room = _v1_room(_cgroup_folder(CGROUP_ROOT / "memory", path))
                rooms += [room] if room is not None else []
        return min(rooms) if rooms else None
    except (OSError, ValueError):
        return None


def _cgroup_folder(mount: Path, path: str) -> Path:
    """The cgroup's folder; the mount itself inside a cgroup namespace (a container), where the
    path names a folder of the host's tree."""
    folder = mount / path.lstrip("/")
    return folder if folder.is_dir() else mount


def _memory_stat(folder: Path) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split() for line in (folder / "memory.stat").read_text().splitlines())}


def _v2_room(folder: Path) -> int | None:
    limit_file = folder / "memory.max"
    limit = limit_file.read_text().strip() if limit_file.exists() else "max"
    if limit == "max":
        return None
    charged = int((folder / "memory.current").read_text())
    return int(limit) - charged + _memory_stat(folder).get("inactive_file", 0)


def _v1_room(folder: Path) -> int | None:
    if not (folder / "memory.stat").exists():
        return None
    stat = _memory_stat(folder)
    limit = stat.get("hierarchical_memory_limit", V1_NO_LIMIT)
    if limit >= V1_NO_LIMIT:
        return None
    return limit - int((folder / "memory.usage_in_bytes").read_text()) + stat.get("total_inactive_file", 0)


def _meminfo_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1)) * 1024


def memory_budget(setting: float | str, device: torch.device) -> int:
    """`train.memory_budget` in bytes: all this process may hold during a step. `auto`: what it
    holds now plus a safe share of the free memory (on the CPU, shared with the other processes
    of this host)."""
    release_cached(device)
    if setting == "auto":
        sharing = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return int(in_use(device) + SAFE_SHARE[device.type] * free_memory(device) / sharing)
    if isinstance(setting, bool) or not isinstance(setting, int | float) or setting <= 0:
        raise ConfigError(f"train.memory_budget={setting!r}: give gigabytes (a positive number) or auto")
    return int(setting * GB)


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's out-of-memory error, or the CPU allocator refusing (under the
    probe's allocation limit)."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class PeakMemory:
    """The most memory held while the block runs. On the CPU the kernel's high-water mark of
    resident memory (reset on entry); where it cannot be reset, a thread samples every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.sampler = device, 0, None

    def __enter__(self) -> PeakMemory:
        release_cached(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        except OSError:
            self.running = True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, in_use(self.device))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.sampler is not None:
            self.running = False
            self.sampler.join()
            self.peak = max(self.peak, in_use(self.device))
        else:
            self.peak = _status_kb("VmHWM")


@contextmanager
def allocation_limit(device: torch.device, limit: int) -> Iterator[None]:
    """Allocations beyond `limit` bytes held in all fail (catchably) inside the block instead of
    calling the kernel's out-of-memory killer: on the CPU through RLIMIT_DATA (the data segment may
    grow by what resident memory may still grow), on a GPU through the caching allocator's fraction."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    torch.ones(1 << 20).mul_(2)  # starts the OpenMP threads now: libgomp aborts if it cannot create them later
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    allowed = _status_kb("VmData") + max(0, limit - in_use(device)) + HEADROOM
    resource.setrlimit(resource.RLIMIT_DATA, (allowed if hard == resource.RLIM_INFINITY else min(allowed, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each transformer block's input in the forward pass and recompute the block in the
    backward (`train.activation_checkpointing`): the activations of a step shrink to one hidden
    state per block and position, for about one more forward pass of compute. The recomputation
    replays the forward's random state, so dropout draws and results are those without it."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def optimizer_state_bytes(optimizer: str, parameters: Iterable[torch.nn.Parameter]) -> int:
    """What the optimizer allocates at its first step for this process's (fp32) parameters."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in parameters if p.requires_grad)
    return OPTIMIZER_STATES[optimizer] * 4 * sum(p.numel() for p in local)


@dataclass
class MemoryPlan:
    """The micro-batch a stage runs and why (logged, and saved in the stage's result.json)."""

    micro_batch: int  # examples per forward and backward pass of one process
    accumulation_steps: int
    budget_gb: float | None = None  # None: the micro-batch was configured, not fitted
    estimate_gb: float | None = None  # the estimated peak of a step at `micro_batch`
    base_gb: float | None = None  # held before the step (model, data, caches), optimizer state included
    per_example_gb: float | None = None
    fixed_steps: bool = False  # train.gradient_accumulation_steps: every batch, a last partial one too, in that many
    estimate_is_upper_bound: bool = False  # one probe showed the whole batch fits: its fixed costs counted per example

    def as_dict(self) -> dict:
        return asdict(self)


def fitted_micro_batch(base: int, per_example: float, budget: int, largest: int) -> int:
    """The largest k <= `largest` with base + k * per_example <= budget (at least 1)."""
    if per_example <= 0:
        return largest
    return max(1, min(largest, math.floor((budget - base) / per_example)))


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(intercept, slope) through two (examples, bytes) probe points; memory never shrinks with k."""
    (k1, m1), (k2, m2) = points
    slope = max(0.0, (m2 - m1) / (k2 - k1))
    return m1 - slope * k1, slope
