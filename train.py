"""Train a policy: SFT, then alignment with the configured loss.

    python train.py                                     # the default job (SmolLM2-135M, demo data)
    python train.py loss=ipo model=mistral7b datasets=[hh]
    python train.py -m loss.beta=0.1,0.5                # a Hydra sweep
    torchrun --nproc_per_node 8 train.py trainer=fsdp   # sharded over 8 GPUs (README: many GPUs and nodes)

The run directory (Hydra's output directory) gets the resolved `config.yaml`, `metrics.jsonl`,
one folder per stage (`sft/`, `align/`) with its `final/` model, and `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from checks import check_config, check_unpaired_batches
from eval.table import BOOKKEEPING_KEYS, run_metrics
from preference_datasets import (
    DataError,
    Example,
    LabelledResponse,
    PairTokenizer,
    PreferencePair,
    TokenizedPair,
    TokenizedResponse,
    as_items,
    evaluation_slice,
    fingerprint,
    load_datasets,
    require_pairs,
)
from trainers import trainer_class
from trainers.basic import BasicTrainer, MetricsLog, NonFiniteLoss, Stopped
from trainers.losses import LossSpec
from utils import (
    EXIT_BAD_INPUT,
    ConfigError,
    ModelResolutionError,
    StopSignals,
    atomic_write_text,
    checksum_problem,
    distributed,
    encode_texts,
    is_main_process,
    join_submitit_tasks,
    main_process_first,
    on_main_process,
    print_errors,
    rank,
    resolve_model_path,
    saved_state,
    seed_everything,
    text_fingerprint,
    timestamp,
    world_size,
)

EXIT_STOPPED = 75  # a stop signal was honoured after a checkpoint: resume later (EX_TEMPFAIL, "try again")
EXIT_FAILED = 1  # a training failure (a non-finite loss): the last checkpoint is intact


def comparable(cfg: DictConfig) -> dict:
    """The resolved config without `BOOKKEEPING_KEYS`: what a run and its resumption must share."""
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in BOOKKEEPING_KEYS:
        *sections, leaf = key.split(".")
        section = values
        for name in sections:
            section = section.get(name) or {}
        section.pop(leaf, None)
    return values


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of the comparable config: the same for a run and its resumption."""
    return text_fingerprint(json.dumps(comparable(cfg), sort_keys=True))


def flatten(values: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(values, dict):
        return {prefix: values}
    return {key: value for name, child in values.items() for key, value in flatten(child, f"{prefix}{name}.").items()} or {prefix: {}}


def config_differences(saved: Path, cfg: DictConfig) -> list[str]:
    """`key: saved value -> this launch's value` for each leaf that differs."""
    before, now = flatten(comparable(OmegaConf.load(saved))), flatten(comparable(cfg))
    missing = "(absent)"
    return [f"{key.rstrip('.')}: {before.get(key, missing)!r} -> {now.get(key, missing)!r}"
            for key in sorted(before.keys() | now.keys()) if before.get(key, missing) != now.get(key, missing)]


def run_state(run_dir: Path) -> str | None:
    """What `state.json` says of a run: running (or killed while running), stopped, failed, finished."""
    return saved_state(run_dir).get("state") or ("finished" if (run_dir / "summary.json").exists() else None)


def write_state(run_dir: Path, state: str, cfg: DictConfig, message: str = "", launch: bool = False) -> None:
    """Record the run's state beside its config (rank 0; atomically, so a kill leaves the old one).
    `started` is the first launch's time, kept through resumes; `launches` holds each launch's start
    and end (its last state record or checkpoint: `record_progress`). Their sum is the time the run
    ran (eval.table's wall time): neither the wait between a stop and its resume, nor file times,
    which copying a run folder (rsync, git) does not keep. A run begun before `launches` existed
    counts its earlier launches as one, from `started` to its last record."""
    now, saved = timestamp(), saved_state(run_dir)
    launches = saved.get("launches") or ([[saved["started"], saved["updated"]]] if "started" in saved else [])
    launches = [*launches, [now, now]] if launch or not launches else [*launches[:-1], [launches[-1][0], now]]
    record = {"state": state, "config_fingerprint": config_fingerprint(cfg), "started": launches[0][0], "updated": now,
              "launches": launches}
    atomic_write_text(run_dir / "state.json", json.dumps({**record, **({"message": message} if message else {})}, indent=2))


def saved_progress(run_dir: Path) -> list[Path]:
    """What a run folder has to continue from: stage checkpoints and finished stages."""
    return [*run_dir.glob("*/checkpoint/trainer_state.pt"), *run_dir.glob("*/final/result.json")]


def find_resumable(cfg: DictConfig) -> Path:
    """The unfinished run under `runs_root` with this config whose saved progress is the most
    recent. Hydra's own `.hydra/config.yaml` copies are not runs (one is the launch that is
    searching), and a run that saved nothing has nothing to continue."""
    wanted = comparable(cfg)
    candidates = {}
    for path in Path(cfg.runs_root).glob("**/config.yaml"):
        run_dir = path.parent
        if ".hydra" in path.parts or run_state(run_dir) == "finished" or not saved_progress(run_dir):
            continue
        if comparable(OmegaConf.load(path)) == wanted:
            candidates[run_dir] = max(file.stat().st_mtime for file in saved_progress(run_dir))
    if not candidates:
        raise ConfigError(f"resume=true: no unfinished run with this config and a checkpoint under {cfg.runs_root}/; pass resume=RUN_DIR")
    return max(candidates, key=candidates.get)


def resolve_run_dir(cfg: DictConfig, output_dir: Path) -> Path:
    """`output_dir`, or the run `resume` names; either is checked to hold no run of another config
    (a reused `hydra.run.dir` continues its run only if the config is the same)."""
    if cfg.resume in (None, False):
        run_dir, refused = output_dir, f"{output_dir} holds a run of another config (saved -> this launch): "
        if not (run_dir / "config.yaml").exists():
            return run_dir
    else:
        run_dir = find_resumable(cfg) if cfg.resume is True else Path(str(cfg.resume))
        refused = f"resume={run_dir}: resume needs the saved config, this one differs in "
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"resume={cfg.resume}: {run_dir / 'config.yaml'} does not exist, so this is not a run directory")
    differences = config_differences(run_dir / "config.yaml", cfg)
    if differences:
        raise ConfigError(refused + "; ".join(differences) + (". Choose another hydra.run.dir" if run_dir == output_dir else ""))
    if run_dir != output_dir:
        print(f"Resuming the run in {run_dir}")
    return run_dir


def prepare_run_dir(cfg: DictConfig, output_dir: Path) -> Path:
    """The run folder (`resolve_run_dir`), with the config saved and the state `running`."""
    run_dir = resolve_run_dir(cfg, output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    write_state(run_dir, "running", cfg, launch=True)
    return run_dir


def discard_stray_output(output_dir: Path, run_dir: Path | None) -> None:
    """A launch whose Hydra output directory is not the run's (a resumed run; under torchrun, a
    process whose clock named another directory than rank 0's; a start that failed: None) removes
    it if it holds only Hydra's files."""
    if output_dir != run_dir and holds_only_hydra_files(output_dir):
        shutil.rmtree(output_dir, ignore_errors=True)
        for parent in list(output_dir.parents)[:2]:  # <runs_root>/<run_name>, then <runs_root>, if left empty
            try:
                parent.rmdir()
            except OSError:
                break


def holds_only_hydra_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", "train.log"}
    except FileNotFoundError:  # under torchrun, another process with the same folder removed it first
        return False


def archive(cfg: DictConfig) -> Path | None:
    """`model.archive`: a Hugging Face model folder to start from (checked by `check_config`)."""
    return Path(cfg.model.archive) if cfg.model.archive else None


def load_tokenizer(cfg: DictConfig):
    """The tokenizer of `model.archive`, else of `model.tokenizer_name_or_path` or `model.name_or_path`;
    one that is found but does not load (a damaged file) is a ConfigError naming the key and folder."""
    model = cfg.model
    from transformers import AutoTokenizer  # imported when needed: a refused config never pays for it

    key = "model.archive" if archive(cfg) else "model.tokenizer_name_or_path" if model.tokenizer_name_or_path else "model.name_or_path"
    source = archive(cfg) or resolve_model_path(model.tokenizer_name_or_path or model.name_or_path, cfg.cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{key}: the tokenizer in {source} does not load ({type(error).__name__}: {reason})") from error


def load_policy(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """The starting weights: `model.archive`, a random init (`model.random_init`) or the hub name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = cfg.model
    dtype = getattr(torch, model.dtype)
    if archive(cfg):
        return AutoModelForCausalLM.from_pretrained(archive(cfg), dtype=dtype)
    if model.get("random_init"):
        config = AutoConfig.for_model(
            **model.random_init,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model.name_or_path, cfg.cache_dir), dtype=dtype)


def stage_finished(final_model: Path) -> bool:
    """Whether a stage saved its final model (after undoing a swap that a crash interrupted); one
    whose files do not match their checksums is refused."""
    BasicTrainer.recover(final_model)
    if not (final_model / "result.json").exists():
        return False
    problem = checksum_problem(final_model)
    if problem:
        raise DataError(f"the finished stage's model is corrupt: {problem}. Delete {final_model} to train the stage again")
    return True


# keys an SFT stage never reads: later stages, evaluation, bookkeeping (the loss matters only through
# the examples it prepares, which the key holds)
NOT_READ_BY_SFT = ("loss", "align", "eval", "run_name", "runs_root", "resume", "debug", "paper", "wandb", "reference", "cache_dir",
                   "heldout")


def sft_key(cfg: DictConfig, data: dict[str, list]) -> str:
    """What an SFT stage's result depends on: the `comparable` config less `NOT_READ_BY_SFT` (and
    `sft.reuse`), and the token ids it trains on and evaluates, in order (`sft_view`)."""
    settings = {key: value for key, value in comparable(cfg).items() if key not in NOT_READ_BY_SFT}
    settings["sft"] = {key: value for key, value in settings["sft"].items() if key != "reuse"}
    return text_fingerprint(settings, sft_view(data))


def sft_view(data: dict[str, list]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Per split, the prompt and response token ids an SFT stage draws from, in order: each pair's
    chosen response, or each desirable response of unpaired data (what its SFT samples). Pairs and
    their unpaired view (a table's paired and unpaired rows) give the same view, each response being
    cut on its own, so they share one SFT model."""
    def chosen(example: TokenizedPair | TokenizedResponse) -> tuple[list[int], list[int]] | None:
        if isinstance(example, TokenizedPair):
            return example.prompt, example.chosen
        return (example.prompt, example.response) if example.desirable else None

    return {split: [view for view in map(chosen, rows) if view is not None] for split, rows in data.items()}


def sft_record(cfg: DictConfig, key: str) -> Path:
    return Path(cfg.cache_dir) / "sft_runs" / f"{key}.json"


def link_or_copy(source: str, target: str) -> None:
    """A hard link (no copy of the weights, and it outlives the source); a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def reuse_sft(cfg: DictConfig, run_dir: Path, key: str) -> bool:
    """Take the SFT stage of an earlier run with the same `sft_key` (`sft.reuse`): its final model
    (hard-linked, checksums verified) and its metrics lines. Not when this run has SFT progress of
    its own (resume continues that), nor when the earlier model is gone or does not verify."""
    record_path = sft_record(cfg, key)
    own_metrics = run_dir / "metrics.jsonl"
    if not record_path.exists() or (run_dir / "sft").exists() or (own_metrics.exists() and own_metrics.stat().st_size):
        return False
    record = json.loads(record_path.read_text())
    source, metrics = Path(record["final"]), Path(record["metrics"])
    if not (source / "result.json").exists() or checksum_problem(source) or not metrics.exists():
        print(f"sft.reuse: the SFT model recorded for this config ({source}) is gone or changed; training SFT")
        return False
    offset = json.loads((source / "result.json").read_text())["metrics_offset"]
    staging = run_dir / "sft" / "final.reused"
    shutil.copytree(source, staging, copy_function=link_or_copy)
    own_metrics.write_bytes(metrics.read_bytes()[:offset])  # the SFT stage's lines: it ran first there too
    staging.rename(run_dir / "sft" / "final")
    print(f"Stage sft: the same SFT (model, data, SFT settings, seed) finished in {record['run']}: reused, not trained again "
          "(sft.reuse=false trains it)")
    return True


def record_sft(cfg: DictConfig, key: str, run_dir: Path) -> None:
    """Note where this config's SFT model is, for the next run with the same `sft_key`."""
    record = {"final": str((run_dir / "sft" / "final").resolve()), "metrics": str((run_dir / "metrics.jsonl").resolve()),
              "run": str(run_dir.resolve())}
    sft_record(cfg, key).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sft_record(cfg, key), json.dumps(record, indent=2))


def load_stage_model(cfg: DictConfig, folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, cfg.model.dtype))


def prompt_text(example: Example) -> str:
    return "\n".join(message["content"] for message in example.prompt)


def contrast_embeddings(cfg: DictConfig, examples: dict[str, list]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Per split, embeddings of the chosen and of the rejected side of each example, for RPO's weights.

    `loss.embedding.input=prompt` embeds the prompt (both sides of a pair share it);
    `prompt_response` embeds each response with its prompt (the RPO paper's ablation). Unpaired
    items have one side: the same table serves both.
    """
    spec = LossSpec.of(cfg.loss)
    if not spec.needs_embeddings:
        return None
    model, kind = spec.embedding_model, spec.embedding_input

    def encode(texts: list[str]) -> torch.Tensor:
        return encode_texts(texts, model, cfg.cache_dir)

    embeddings = {}
    for split, rows in examples.items():
        if kind == "prompt":
            shared = encode([prompt_text(e) for e in rows])
            embeddings[split] = (shared, shared)
        elif isinstance(rows[0], PreferencePair):
            chosen = encode([f"{prompt_text(p)}\n{p.chosen}" for p in rows])
            embeddings[split] = (chosen, encode([f"{prompt_text(p)}\n{p.rejected}" for p in rows]))
        else:
            shared = encode([f"{prompt_text(item)}\n{item.response}" for item in rows])
            embeddings[split] = (shared, shared)
    return embeddings


def prepare_examples(cfg: DictConfig, examples: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """Pairs for the paired losses; single labelled responses for unpaired ones (`loss.paired=false`);
    of the held-out ones, those every evaluation scores (`train.max_eval_examples`, counted before
    pairs become responses: an unpaired run on pairs scores both answers of the same held-out
    pairs as a paired run). Unpaired data is checked here to have both sides and batches that can
    hold them, before the SFT stage."""
    spec = LossSpec.of(cfg.loss)
    examples = {**examples, "test": evaluation_slice(examples["test"], cfg.train.max_eval_examples)}
    has_unpaired = any(isinstance(e, LabelledResponse) for rows in examples.values() for e in rows)
    paired = spec.paired and not (spec.kind == "sft" and has_unpaired)
    prepared = {split: require_pairs(rows, spec.name) if paired else as_items(rows) for split, rows in examples.items()}
    if not paired:
        for split, items in prepared.items():
            desirable = sum(item.desirable for item in items)
            if not desirable or desirable == len(items):
                sources = sorted({item.source for item in items})
                raise DataError(f"datasets {sources}, {split} split: {desirable} desirable and {len(items) - desirable} "
                                "undesirable responses; unpaired training needs both")
        if spec.kind != "sft":
            check_unpaired_batches(cfg, prepared["train"])
    return prepared


def load_examples(cfg: DictConfig) -> dict[str, list[Example]]:
    """The configured datasets, prepared for the loss; records the held-out set in `cfg.heldout`
    (saved in config.yaml, so a resumed run is checked to hold out the same examples)."""
    loaded = load_datasets(cfg.datasets)
    examples = prepare_examples(cfg, loaded)
    cfg.heldout = held_out_record(loaded["test"], examples["test"])
    return examples


def held_out_record(split: list[Example], evaluated: list[Example]) -> dict:
    """Size and content hash of the held-out split and of what evaluations score: two runs with
    the same ones were judged on the same examples."""
    return {
        "examples": len(split),
        "fingerprint": fingerprint(split),
        "evaluated": len(evaluated),
        "evaluated_fingerprint": fingerprint(evaluated),
    }


def tokenize_examples(cfg: DictConfig, tokenizer, examples: dict[str, list[Example]]) -> dict[str, list]:
    """Token ids of every example, once per run (with the augmented twins self-refinement needs)."""
    spec = LossSpec.of(cfg.loss)
    sr_prompt = spec.sr_prompt if spec.refines_on_augmented else None
    encode = PairTokenizer(tokenizer, cfg.max_length, cfg.max_prompt_length, sr_prompt)
    if isinstance(examples["train"][0], PreferencePair):
        quiet = not is_main_process()
        return {split: [encode(pair) for pair in tqdm(rows, desc=f"tokenizing {split}", disable=quiet)] for split, rows in examples.items()}
    return {split: encode.items(rows, cfg.seed) for split, rows in examples.items()}


def stages(cfg: DictConfig) -> list[str]:
    if LossSpec.of(cfg.loss).kind == "sft":
        return ["sft"]
    return ["sft", "align"] if cfg.sft.enabled else ["align"]


def start_wandb(cfg: DictConfig, run_dir: Path):
    if not cfg.wandb.enabled:
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        name=run_dir.name,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def report(results: dict, run_dir: Path, final_model: Path, cfg: DictConfig) -> dict:
    """Write summary.json and print where the model is and its held-out accuracy over the stages."""
    from eval.after_training import evaluate_run
    from eval.plots import plot_metrics

    judged = evaluate_run(cfg, run_dir, list(results))  # before summary.json, which marks the run finished
    first = next(iter(results.values()))["initial_eval"]
    accuracy = [("start", first.get("logp_accuracy"))]
    accuracy += [(f"after {stage}", result["final_eval"].get("logp_accuracy")) for stage, result in results.items()]
    summary = {
        "final_model": str(final_model),
        "logp_accuracy": dict(accuracy),
        "heldout": OmegaConf.to_container(cfg.heldout),
        "stages": results,
        **({"judged": judged} if judged else {}),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nFinal model: {final_model}")
    measured = [(name, value) for name, value in accuracy if value is not None]  # pairs only (an SFT stage reused from
    if measured:  # a paired run by an unpaired one has it): unpaired data has no same-prompt comparison
        steps = " -> ".join(f"{name} {value:.3f}" for name, value in measured)
        print(f"Held-out preference accuracy (log pi(chosen) > log pi(rejected)): {steps}")
    if "align" in results:
        final = results["align"]["final_eval"]
        print(f"Held-out {cfg.loss.name} reward accuracy {final['rewards/accuracy']:.3f}, margin {final['rewards/margin']:.4f}")
    print(f"Metrics: {run_dir / 'metrics.jsonl'}, plotted in {plot_metrics(run_dir / 'metrics.jsonl')}")
    return summary


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Run every stage of the config in `output_dir` (or in the run being resumed); return the summary."""
    check_config(cfg)  # every config problem, before anything loads
    StopSignals.install()  # SIGTERM / SIGUSR1 (and submitit's warning): checkpoint after the current step, then exit
    join_submitit_tasks()  # a submitit job of several tasks is one process group, as under torchrun
    trainer_type = trainer_class(cfg.trainer)
    trainer_type.launch(cfg)
    seed_everything(cfg.seed)
    examples = load_examples(cfg)  # data problems, still before any model loads
    run_dir = on_main_process(lambda: prepare_run_dir(cfg, output_dir))  # every process writes into rank 0's
    discard_stray_output(output_dir, run_dir)  # a resumed run's launch folder, another rank's clock
    try:  # from here on the run folder says `running`: whatever ends the run must say how
        with main_process_first():  # rank 0 fills the cache (converted models) before the others read it
            tokenizer = load_tokenizer(cfg)
        data = tokenize_examples(cfg, tokenizer, examples)
        embeddings = contrast_embeddings(cfg, examples)
        reuse_key = sft_key(cfg, data) if cfg.sft.get("reuse") and "sft" in stages(cfg) else None
        return train_stages(cfg, trainer_type, run_dir, data, tokenizer, embeddings, reuse_key)
    except BaseException as error:
        if is_main_process():
            write_state(run_dir, "stopped" if isinstance(error, Stopped) else "failed", cfg, f"{type(error).__name__}: {error}")
        raise


def train_stages(
    cfg: DictConfig, trainer_type: type, run_dir: Path, data: dict[str, list], tokenizer, embeddings, reuse_key: str | None = None
) -> dict:
    """Every stage in turn, skipping the finished ones (and an SFT stage another run finished with
    the same `reuse_key`); the summary."""
    metrics = MetricsLog(run_dir / "metrics.jsonl", start_wandb(cfg, run_dir) if is_main_process() else None)
    results, offset, final_model = {}, 0, None
    for stage in stages(cfg):
        previous, final_model = final_model, run_dir / stage / "final"
        finished = on_main_process(partial(stage_finished, final_model))
        if not finished and stage == "sft" and reuse_key:
            finished = on_main_process(partial(reuse_sft, cfg, run_dir, reuse_key))
        elif finished and is_main_process():
            print(f"Stage {stage} already finished: {final_model}")
        if finished:
            results[stage] = json.loads((final_model / "result.json").read_text())
        else:
            with main_process_first():  # the next stage starts from the previous one's saved model
                policy = load_policy(cfg, tokenizer) if previous is None else load_stage_model(cfg, previous)
            trainer = trainer_type(cfg, stage, policy, tokenizer, data, run_dir / stage, metrics, embeddings)
            results[stage] = trainer.train(offset)
            del policy, trainer
            if stage == "sft" and reuse_key and is_main_process():
                record_sft(cfg, reuse_key, run_dir)
        offset = results[stage]["metrics_offset"]
    if metrics.wandb_run is not None:
        metrics.wandb_run.finish()
    summary = on_main_process(lambda: report(results, run_dir, final_model, cfg))
    if is_main_process():
        write_state(run_dir, "finished", cfg)
    return summary


@record  # under torchrun: the failing process's traceback goes into the launcher's error summary
def run_process(cfg: DictConfig, output_dir: Path) -> dict:
    try:
        return run(cfg, output_dir)
    except Exception as error:
        if distributed():  # name the process: the launcher interleaves every process's output
            print(f"[rank {rank()} of {world_size()}] {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            error.add_note(f"raised on rank {rank()} of {world_size()}")
        raise  # no barrier: the others may be waiting in another collective; the launcher stops them
    else:
        if distributed():
            sys.stdout.flush()
            sys.stderr.flush()
            torch.distributed.barrier()  # no process tears the group down while another still uses it
    finally:
        if distributed():
            torch.distributed.destroy_process_group()


def show_traceback(cfg: DictConfig) -> bool:
    return cfg.get("debug") is True or os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """Train; return the run's `objective` (what a sweeper such as Optuna optimises). A problem of
    the config, the data or the model name ends the run with one line per problem and exit code 2
    (a traceback with `debug=true` or HYDRA_FULL_ERROR=1)."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_process(cfg, output_dir)
    except Stopped as stop:
        print(f"{stop}; continue with resume=true", file=sys.stderr)
        StopSignals.requeue_with_submitit(stop.signal_name)  # under submitit, its warning requeues the job into this run folder
        sys.exit(EXIT_STOPPED)
    except (ConfigError, DataError, ModelResolutionError, NonFiniteLoss) as error:
        if show_traceback(cfg):
            raise
        discard_stray_output(output_dir, None)  # a start that failed leaves no empty run folder
        print_errors(error)
        sys.exit(EXIT_FAILED if isinstance(error, NonFiniteLoss) else EXIT_BAD_INPUT)
    metrics = run_metrics(summary)
    if cfg.objective not in metrics and HydraConfig.get().mode == RunMode.MULTIRUN:  # e.g. an SFT-only run's reward accuracy
        print(f"objective={cfg.objective!r}: this run has no such result (it has {', '.join(metrics)}); the sweeper gets None",
              file=sys.stderr)
    return metrics.get(cfg.objective)


if __name__ == "__main__":
    main()
