"""This project's training step against TRL's DPOTrainer on the same work, side by side in one invocation.

    python benchmarks/vs_trl.py [--pairs 4] [--steps 4] [--warmup 2] [--repeats 2] [--max-length 256]
    python benchmarks/vs_trl.py --setting "prefopt, reference precomputed" --setting "TRL, reference precomputed"  # some
    python benchmarks/vs_trl.py --override model.dtype=... ...  # any of this project's config keys, both sides

Both sides train SmolLM2-135M-Instruct in fp32 on 2 threads with RMSprop, beta 0.1 and a constant
learning rate, on the same HH pairs (helpful-base of ../shared/data/hh-rlhf) in the same order,
tokenized once by this project (prompts cut from the left to max_length / 2, responses to the rest)
and handed to TRL as token ids, so that both see exactly the same tokens. Each (side, reference)
setting runs in its own process (peak memory only grows), the settings alternate, `--repeats`
times; the first `--warmup` steps of each process are not timed: the first builds the optimizer
state, and the second still grows the heap (on a VM whose page faults cost ~4.5 ms/MB that is
seconds of system time), so the timed steps are the steady state (their page faults are reported).
Tokens/s counts the non-padding tokens of the chosen and rejected sequences (prompt + response
each) of the timed steps over their time, the same for both sides. TRL runs its `DPOConfig`
defaults, and those include gradient checkpointing: the like-for-like pairs are this project's
activation-checkpointing setting against "TRL", and its plain step against "TRL without gradient
checkpointing".
The first step's DPO loss must agree (same batch, same weights). It then times this project's
RPO, Sr-DPO and KTO steps against its DPO step (KTO per pair: each pair's two responses become two
items; `kto` holds both items of each of the DPO step's pairs, whose prompt it then computes once,
and `kto_apart` a pair's desirable item with the undesirable item of a pair of the next step, so
that no two items of a batch share a prompt, the usual case under the shuffling sampler), and shows
where the time of one DPO step goes (torch profiler, by operator).

On a machine with a GPU both sides train on it (TRL's `bf16=True` is its autocast over float32
weights, as this project's `model.dtype=bfloat16`), every step ends in a device synchronisation,
peak memory is the GPU's allocated peak, and the matmul peak is the GPU's. `--override` passes
config keys to both sides (both load the policy through `train.load_policy`), for instance a
random initialisation of the same architecture where the packaged weights are not at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory import PeakSampler  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf"
LR, BETA, MAX_GRAD_NORM = 1e-6, 0.1, 10.0
# TRL's settings run its DPOConfig defaults, gradient checkpointing (on by default there) included, except where
# the name says otherwise: "prefopt, activation checkpointing" against "TRL" is the like-for-like pair.
SETTINGS = {  # name: (side, setting: reference:heap[:dtype[:checkpointing]] for TRL, loss:reference:dtype:packing:heap[:checkpointing])
    "prefopt, reference precomputed": ("prefopt", "dpo:precomputed:float32:true:heap"),
    "TRL, reference precomputed": ("trl", "precomputed:default"),
    "TRL bf16 (bf16=True), reference precomputed": ("trl", "precomputed:default:bfloat16"),
    "TRL without gradient checkpointing, reference precomputed": ("trl", "precomputed:default:float32:false"),
    "prefopt, reference live": ("prefopt", "dpo:live:float32:true:heap"),
    "TRL, reference live": ("trl", "live:default"),
    "TRL, reference precomputed, large blocks in heap": ("trl", "precomputed:heap"),
    "prefopt padded (train.packing=false), precomputed": ("prefopt", "dpo:precomputed:float32:false:heap"),
    "prefopt, glibc's default malloc (mmap over 32 MB), precomputed": ("prefopt", "dpo:precomputed:float32:true:default"),
    "prefopt bf16 (model.dtype=bfloat16), precomputed": ("prefopt", "dpo:precomputed:bfloat16:true:heap"),
    "prefopt, activation checkpointing, precomputed": ("prefopt", "dpo:precomputed:float32:true:heap:true"),
}
RATIOS = [
    ("prefopt, reference precomputed", "TRL, reference precomputed"),
    ("prefopt, reference live", "TRL, reference live"),
    ("prefopt, reference precomputed", "TRL, reference precomputed, large blocks in heap"),
    ("prefopt, reference precomputed", "prefopt padded (train.packing=false), precomputed"),
    ("prefopt, reference precomputed", "prefopt, glibc's default malloc (mmap over 32 MB), precomputed"),
    ("prefopt bf16 (model.dtype=bfloat16), precomputed", "prefopt, reference precomputed"),
    ("prefopt bf16 (model.dtype=bfloat16), precomputed", "TRL bf16 (bf16=True), reference precomputed"),
    ("prefopt, activation checkpointing, precomputed", "TRL, reference precomputed"),
    ("prefopt, reference precomputed", "TRL without gradient checkpointing, reference precomputed"),
    ("prefopt, activation checkpointing, precomputed", "prefopt, reference precomputed"),
]
LOSSES = ["dpo", "rpo", "sr_dpo", "kto", "kto_apart"]
APART = "kto_apart"  # KTO on the same items, each pair's two in different steps
CACHE = "VS_TRL_CACHE"  # one cache_dir for the invocation: the packaged model is converted once, before any timing


def project_config(args: argparse.Namespace, loss: str, reference: str, dtype: str = "float32", packing: str = "true",
                   checkpointing: str = "false"):
    from hydra import compose, initialize_config_dir

    batch = args.pairs * (2 if loss == "kto" else 1)  # KTO: a pair's two responses are two items
    overrides = [
        f"loss={loss}", "model=smollm2_135m", "datasets=[hh]", f"datasets.hh.path={HH}", "datasets.hh.subsets=[helpful-base]",
        f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}", f"train.batch_size={batch}",
        f"train.micro_batch_size={batch}", "train.optimizer=rmsprop", f"train.max_grad_norm={MAX_GRAD_NORM}",
        f"align.lr={LR}", "align.warmup_steps=0", "sft.enabled=false", f"reference.precompute={reference == 'precomputed'}",
        f"datasets.hh.max_train_examples={args.pairs * (args.warmup + args.steps)}", "datasets.hh.max_test_examples=8",
        "train.max_eval_examples=8", f"loss.beta={BETA}", f"cache_dir={os.environ.get(CACHE) or tempfile.mkdtemp()}",
        f"model.dtype={dtype}",
        f"train.packing={packing}",
        f"train.activation_checkpointing={checkpointing}",
    ]
    overridden = {override.split("=")[0].lstrip("+") for override in args.override}
    overrides = [o for o in overrides if o.split("=")[0] not in overridden] + args.override
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("config", overrides=overrides)


def tokenized_pairs(args: argparse.Namespace) -> tuple:
    """The project's tokenizer, its tokenized HH pairs (train split) and the model it loads."""
    import train
    from preference_datasets import load_datasets

    cfg = project_config(args, "dpo", "live")
    tokenizer = train.load_tokenizer(cfg)
    examples = train.prepare_examples(cfg, load_datasets(cfg.datasets))
    return cfg, tokenizer, examples, train.tokenize_examples(cfg, tokenizer, examples)


def first_check(record: dict) -> list[float]:
    """What must agree on the first (same) batch: the loss and the policy's mean chosen and rejected
    log-probs (the loss alone is log 2 whenever the policy starts at the reference)."""
    return [record["loss"], record["logps/chosen"], record["logps/rejected"]]


def pair_tokens(pairs) -> int:
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a step's time is its own (nothing on the CPU)."""
    if on_cuda():
        import torch

        torch.cuda.synchronize()


class PeakMemory(PeakSampler):
    """The peak of the block: resident memory on the CPU, the GPU's allocated memory on CUDA."""

    def __enter__(self) -> PeakMemory:
        if on_cuda():
            import torch

            synchronize()
            torch.cuda.reset_peak_memory_stats()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if on_cuda():
            import torch

            self.peak = torch.cuda.max_memory_allocated() / 2**30


def timed_steps(args: argparse.Namespace, step, batches: list) -> dict:
    """Run `step(batch)` on every batch: the first `args.warmup` (at least 1) untimed, then timed
    with the peak RSS and the page faults of each step."""
    first = step(batches[0])  # untimed with the warm-up steps
    for batch in batches[1 : args.warmup]:
        step(batch)
    times, faults = [], []
    with PeakMemory() as sampler:
        for batch in batches[max(1, args.warmup) :]:
            synchronize()
            started, faulted = time.perf_counter(), minor_faults()
            step(batch)
            synchronize()
            times.append(time.perf_counter() - started)
            faults.append(minor_faults() - faulted)
    return {"times": times, "faults": faults, "peak_gb": round(sampler.peak, 2), "first": first}


def step_flops(model, pairs) -> float:
    """The model FLOPs of a training step on `pairs`, counting what has to be computed: every
    non-padding token once (each prompt once for its two responses, as packed), forward and backward
    (6 per parameter per token) through the blocks, the LM head on response positions only, and
    attention over each token's visible context (12 per context token per head dimension and layer)."""
    from preference_datasets import collate

    batch = collate(pairs, range(len(pairs)), pad_id=0, packed=True)
    real = batch["segment"] != -1
    tokens, contexts = int(real.sum()), int((batch["position_ids"][real] + 1).sum())
    config = model.config
    blocks = sum(parameter.numel() for name, parameter in model.named_parameters() if ".layers." in name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * contexts
    return 6 * blocks * tokens + 6 * config.hidden_size * config.vocab_size * len(batch["targets"]) + attention


def matmul_peak(dtype_name: str) -> dict:
    """The best matmul rate of these cores (2 threads), or of the GPU, in a dtype (GFLOP/s): the
    model's own shapes (tokens x hidden x intermediate, both ways) and a large square one."""
    import torch

    torch.set_num_threads(2)
    device = "cuda" if on_cuda() else "cpu"
    shapes = [(1152, 576, 1536), (1152, 1536, 576), (2048, 2048, 2048)] + [(8192, 8192, 8192)] * (device == "cuda")
    dtype, rates = getattr(torch, dtype_name), []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        synchronize()
        started, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            a @ b
        synchronize()
        rates.append(2 * m * k * n * repeats / (time.perf_counter() - started) / 1e9)
    return {"gflops": round(max(rates), 1), "rates": [round(rate, 1) for rate in rates]}


def allocator(setting: str) -> None:
    """`heap`: glibc keeps large blocks in its heap, as this project's trainer sets on the CPU;
    `default`: glibc's own setting (mmap for blocks over 32 MB), kept so in this project's trainer too."""
    from trainers import basic
    from trainers.memory import keep_large_blocks_in_heap

    if setting == "heap":
        keep_large_blocks_in_heap()
    else:
        basic.keep_large_blocks_in_heap = lambda: None


def project_trainer(args: argparse.Namespace, loss: str, reference: str, dtype: str = "float32", packing: str = "true",
                    checkpointing: str = "false"):
    """This project's BasicTrainer on the benchmark's pairs, built by train.py's own functions."""
    import torch

    import train
    from preference_datasets import load_datasets
    from trainers.basic import BasicTrainer, MetricsLog

    torch.set_num_threads(2)
    cfg = project_config(args, loss, reference, dtype, packing, checkpointing)
    tokenizer = train.load_tokenizer(cfg)
    examples = train.prepare_examples(cfg, load_datasets(cfg.datasets))
    data = train.tokenize_examples(cfg, tokenizer, examples)
    folder = Path(tempfile.mkdtemp())
    return BasicTrainer(cfg, "align", train.load_policy(cfg, tokenizer), tokenizer, data, folder, MetricsLog(folder / "m.jsonl"),
                        train.contrast_embeddings(cfg, examples))


def run_prefopt(args: argparse.Namespace, loss: str, reference: str, dtype: str, packing: str, heap: str = "heap",
                checkpointing: str = "false") -> dict:
    allocator(heap)
    kto = loss in ("kto", APART)
    trainer = project_trainer(args, "kto" if kto else loss, reference, dtype, packing, checkpointing)
    per_step = args.pairs * (2 if kto else 1)  # KTO: a pair's two responses are two items (2p and 2p + 1)
    batches = [list(range(k * per_step, (k + 1) * per_step)) for k in range(args.warmup + args.steps)]
    if loss == APART:  # step k: the desirable items of its pairs, the undesirable ones of step k + 1's
        batches = [[i for i in batch if i % 2 == 0] + [i for i in batches[(k + 1) % len(batches)] if i % 2 == 1]
                   for k, batch in enumerate(batches)]
    records = []
    result = timed_steps(args, lambda batch: records.append(trainer.train_step(batch)) or first_check(records[0]), batches)
    timed = [trainer.train_set[i] for batch in batches[max(1, args.warmup) :] for i in batch]
    if kto:
        return {**result, "tokens": sum(len(item.prompt) + len(item.response) for item in timed), "flops": None}
    flops = sum(step_flops(trainer.policy, timed[k : k + args.pairs]) for k in range(0, len(timed), args.pairs))
    return {**result, "tokens": pair_tokens(timed), "flops": flops}


def run_trl(args: argparse.Namespace, reference: str, heap: str = "default", dtype: str = "float32", checkpointing: str = "true") -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import train

    torch.set_num_threads(2)
    allocator(heap)
    cfg, tokenizer, _, data = tokenized_pairs(args)
    count = args.pairs * (args.warmup + args.steps)
    pairs = data["train"][:count]
    rows = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]

    class SameTokensDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on this project's token ids, in order: no re-tokenization, no shuffling."""

        def _prepare_dataset(self, dataset, *unused, **unused_too):
            return dataset

        def _get_train_sampler(self, *unused):
            return SequentialSampler(self.train_dataset)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.faults, self.started, self.faulted = [], [], 0.0, 0

        def on_step_begin(self, *unused, **unused_too):
            synchronize()
            self.started, self.faulted = time.perf_counter(), minor_faults()

        def on_step_end(self, *unused, **unused_too):
            synchronize()
            self.times.append(time.perf_counter() - self.started)
            self.faults.append(minor_faults() - self.faulted)

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="rmsprop", max_grad_norm=MAX_GRAD_NORM,
        beta=BETA, max_length=None, precompute_ref_log_probs=reference == "precomputed", use_cpu=not on_cuda(), bf16=dtype == "bfloat16",
        gradient_checkpointing=checkpointing == "true",
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    policy = train.load_policy(cfg, tokenizer)
    reference_model = train.load_policy(cfg, tokenizer).eval() if reference == "live" else None
    times = StepTimes()
    trainer = SameTokensDPOTrainer(model=policy, ref_model=reference_model, args=config, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, callbacks=[times])
    with PeakMemory() as sampler:
        trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {"times": times.times[max(1, args.warmup) :], "faults": times.faults[max(1, args.warmup) :], "peak_gb": round(sampler.peak, 2),
            "first": first_check(first), "tokens": pair_tokens(pairs[max(1, args.warmup) * args.pairs :])}


def profile_step(args: argparse.Namespace, dtype: str) -> dict:
    """Where one steady-state DPO step's time goes in a dtype: self CPU time by operator (torch
    profiler), top entries, and the step's page faults; on CUDA also the GPU's time by operator and
    its total against the step's wall time (a GPU busy for a small part of the step waits on Python).

    The profiler's own records would otherwise move the step's tensors onto fresh pages, and page
    faults would show as the time of whichever operator first touches them (`fill_`, `copy_`,
    `sqrt` of [vocab, hidden] tensors): 2 GiB of heap are touched and kept before it starts."""
    import torch

    from trainers.memory import LIBC, M_TRIM_THRESHOLD

    trainer = project_trainer(args, "dpo", "precomputed", dtype)
    batches = [list(range(k * args.pairs, (k + 1) * args.pairs)) for k in range(args.warmup + 1)]
    for batch in batches[:-1]:
        trainer.train_step(batch)
    LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    torch.ones(2**29)  # 2 GiB, freed at once and kept by the heap
    faulted = minor_faults()
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * on_cuda()
    synchronize()
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        trainer.train_step(batches[-1])
        synchronize()
    wall = time.perf_counter() - started
    events = profiler.key_averages()
    result = {"faults": minor_faults() - faulted}
    for clock in ["cpu", "device"][: 1 + on_cuda()]:  # on CUDA also the GPU's own time by operator, and how busy it was
        total = sum(getattr(event, f"self_{clock}_time_total") for event in events)
        top = sorted(events, key=lambda event: -getattr(event, f"self_{clock}_time_total"))[:12]
        result[f"top_{clock}"] = [(event.key, round(100 * getattr(event, f"self_{clock}_time_total") / total, 1)) for event in top]
        result[f"{clock}_seconds"] = round(total / 1e6, 3)
    return {**result, "wall_seconds": round(wall, 3)}


def child(*arguments: str) -> dict | str:
    """One setting in its own process: its JSON result, or its last error line."""
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        print(f"{' '.join(arguments[-2:])} failed; the end of its output:\n{result.stderr[-2000:]}", file=sys.stderr)
        errors = [line for line in result.stderr.splitlines() if "Error" in line.split(":")[0]]
        return (errors or ["killed (out of memory?)"])[-1]
    return json.loads(result.stdout.strip().splitlines()[-1])


def torch_device_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"


def markdown_row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def compare_with_trl(args: argparse.Namespace, common: list[str]) -> list[str]:
    """The settings (`--setting`, or all), alternated `args.repeats` times, and the matmul peaks
    between them; the table and the ratios, as markdown lines."""
    settings = {name: SETTINGS[name] for name in args.setting or SETTINGS}
    runs: dict[str, list[dict]] = {}
    peaks: dict[str, float] = {}
    dtypes = sorted({"bfloat16" if "bfloat16" in what else "float32" for _, what in settings.values()}, reverse=True)
    for repeat in range(args.repeats):
        for dtype in dtypes:  # only those the settings compute in (bf16 matmuls without bf16 instructions take minutes)
            peak = child("--one", "peak", dtype)
            if isinstance(peak, dict):
                peaks[dtype] = max(peaks.get(dtype, 0.0), peak["gflops"])
        for name, (side, what) in settings.items():
            result = child(*common, "--one", side, what)
            if isinstance(result, str):
                print(f"{name}: failed: {result}", flush=True)
                continue
            runs.setdefault(name, []).append(result)
            print(f"repeat {repeat + 1}: {name}: {statistics.median(result['times']):.2f} s/step", flush=True)
    # every setting times the same batches: their model FLOPs over each process's time
    flops = next((result["flops"] for results in runs.values() for result in results if result.get("flops")), None)
    memory = "peak GPU memory" if on_cuda() else "peak RSS"
    header = ["setting", "s/step (median)", "spread", "tokens/s", "model FLOPs / matmul peak", memory, "page faults / step",
              "first batch: loss / logps chosen / rejected"]
    lines = [markdown_row(header), "|---|" + "---:|" * (len(header) - 1)]
    rows = {}
    for name, results in runs.items():
        times = [t for result in results for t in result["times"]]
        seconds = statistics.median(sum(result["times"]) for result in results)  # of the timed steps, per process
        dtype = "bfloat16" if "bfloat16" in SETTINGS[name][1] else "float32"
        utilisation = f"{100 * flops / seconds / 1e9 / peaks[dtype]:.0f} %" if flops and dtype in peaks else "n/a"
        rows[name] = row = {"tokens_per_s": results[0]["tokens"] / seconds, "peak_gb": max(result["peak_gb"] for result in results),
                            "first": results[0]["first"]}
        faults = statistics.median(fault for result in results for fault in result["faults"])
        first = " / ".join(f"{value:.4f}" for value in row["first"])
        lines.append(markdown_row([name, f"{statistics.median(times):.2f}", f"{max(times) - min(times):.2f}", f"{row['tokens_per_s']:.1f}",
                                   utilisation, f"{row['peak_gb']:.2f} GB", f"{faults:.0f}", first]))
    lines.append("")
    if flops:
        where = "the GPU" if on_cuda() else "these cores"
        lines.append(f"- Model FLOPs of the timed steps: {flops / 1e9:.0f} GFLOP (`step_flops`); matmul peaks of {where} measured in "
                     f"this run: " + ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in peaks.items()))
    for ours, theirs in RATIOS:
        if ours in rows and theirs in rows:
            ratio = rows[ours]["tokens_per_s"] / rows[theirs]["tokens_per_s"]
            difference = max(abs(a - b) for a, b in zip(rows[ours]["first"], rows[theirs]["first"], strict=True))
            peak = rows[ours]["peak_gb"] / rows[theirs]["peak_gb"]
            lines.append(f"- {ours} / {theirs}: tokens/s **x{ratio:.2f}**, {header[5]} x{peak:.2f}; "
                         f"first batch's values differ by {difference:.1e}")
    return lines


def losses_against_dpo(args: argparse.Namespace, common: list[str]) -> list[str]:
    """Each loss's step time over the DPO step's: every loss's steps cover the same pairs (KTO: as
    2 items each); the losses alternate, `args.repeats` processes each, and each process's mean
    step time is divided by the DPO process's of the same round (the machine drifts between rounds)."""
    rounds: list[dict[str, dict | str]] = []
    for repeat in range(args.repeats):
        rounds.append({loss: child(*common, "--one", "prefopt", f"{loss}:precomputed:float32:true") for loss in LOSSES})
        print(f"repeat {repeat + 1}: losses " + ", ".join(f"{loss} {statistics.mean(r['times']):.2f} s/step"
                                                          for loss, r in rounds[-1].items() if isinstance(r, dict)), flush=True)
    lines = [markdown_row(["loss", "s/step (mean of each process)", "x DPO step (per round)", "tokens"]), "|---|---|---|---:|"]
    for loss in LOSSES:
        failed = [r[loss] for r in rounds if isinstance(r[loss], str)]
        if failed or any(isinstance(r["dpo"], str) for r in rounds):
            lines.append(markdown_row([loss, "failed", (failed or ["dpo failed"])[0], ""]))
            continue
        seconds = [statistics.mean(r[loss]["times"]) for r in rounds]
        ratios = [statistics.mean(r[loss]["times"]) / statistics.mean(r["dpo"]["times"]) for r in rounds]
        lines.append(markdown_row([loss, " / ".join(f"{t:.2f}" for t in seconds),
                                   f"**x{statistics.median(ratios):.2f}** (" + " / ".join(f"x{x:.2f}" for x in ratios) + ")",
                                   rounds[0][loss]["tokens"]]))
    return lines


def write_section(lines: list[str], name: str) -> None:
    """Replace a generated part of docs/BENCHMARKS.md (between the markers `name`) with `lines`."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="put the tables into docs/BENCHMARKS.md")
    parser.add_argument("--losses-only", action="store_true", help="only this project's losses against its DPO step")
    parser.add_argument("--setting", action="append", choices=list(SETTINGS),
                        help="only these settings against each other (repeatable), written to their own section")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key of this project for both sides (repeatable), e.g. +model.random_init={...}")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # side, its setting: one setting in this process
    args = parser.parse_args()
    if args.one:
        side, what = args.one
        if side == "trl":
            result = run_trl(args, *what.split(":"))
        elif side == "profile":
            result = profile_step(args, what)
        elif side == "prepare":  # convert the packaged model into the shared cache
            tokenized_pairs(args)
            result = {}
        elif side == "peak":
            result = matmul_peak(what)
        else:
            result = run_prefopt(args, *what.split(":"))
        print(json.dumps(result))
        return
    os.environ.setdefault(CACHE, tempfile.mkdtemp())
    common = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup), "--max-length", str(args.max_length)]
    common += [f"--override={override}" for override in args.override]
    lines = [f"{args.pairs} pairs per step, max_length {args.max_length}, {args.steps} timed steps after {args.warmup} "
             f"untimed per process, {args.repeats} processes per setting, alternating"
             + (f", on {torch_device_name()}" if on_cuda() else "") + "".join(f"; `{o}`" for o in args.override) + ".", ""]
    child(*common, "--one", "prepare", "-")
    if args.setting:
        lines += compare_with_trl(args, common)
        print("\n".join(lines))
        if args.write:
            write_section(lines, "vs_trl.py selected settings")
        return
    losses = [lines[0], "", "This project's losses on the same pairs (reference precomputed, fp32):", ""]
    losses += losses_against_dpo(args, common)
    if args.losses_only:
        print("\n".join(losses))
        if args.write:
            write_section(losses, "vs_trl.py losses")
        return
    lines += compare_with_trl(args, common)
    for dtype in ("float32", "bfloat16"):
        profile = child(*common, "--one", "profile", dtype)
        if isinstance(profile, dict):
            lines += ["", f"Where one steady-state DPO step's time goes in {dtype} (self CPU time by operator, torch profiler; "
                      f"{profile['faults']} page faults in the step):", ""]
            lines += [markdown_row(["operator", "share"]), "|---|---:|"]
            lines += [markdown_row([f"`{key}`", f"{share} %"]) for key, share in profile["top_cpu"]]
    print("\n".join(lines + losses))
    if args.write:
        write_section(lines, "vs_trl.py")
        write_section(losses, "vs_trl.py losses")


if __name__ == "__main__":
    main()
