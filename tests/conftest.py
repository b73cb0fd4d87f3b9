"""Shared fixtures: the real SmolLM2 tokenizer (offline), a composed `tiny` config, small data files."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub
# pytest.ini runs the test files in parallel workers: each worker and the processes its tests start
# get an equal share of the cores (set before torch starts its thread pool), so they never oversubscribe
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import train  # noqa: E402
from preference_datasets import load_datasets  # noqa: E402
from trainers.basic import MetricsLog  # noqa: E402
from utils import main_process_first, resolve_model_path  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@functools.cache
def _composed_loss(name: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=[f"loss={name}"]).loss)


def loss_config(name: str, **overrides: object) -> dict:
    """`config/loss/<name>.yaml` as Hydra composes it (the one definition of each loss), with overrides."""
    return {**copy.deepcopy(_composed_loss(name)), **overrides}

# A fast schedule for `tiny`: a handful of steps per stage, checkpoints every other step.
TINY_OVERRIDES = [
    "model=tiny",
    "sft.max_examples=16",
    "align.max_examples=24",
    "train.batch_size=4",
    "train.eval_every=8",
    "train.save_every=8",
    "train.max_eval_examples=8",
    "sft.lr=1e-3",
    "align.lr=1e-3",
    "eval.after_training=none",  # tests/test_eval.py runs it
    "sft.reuse=false",  # each test trains its own SFT (tests/test_trainer.py tests the reuse)
]


def build(cfg, folder: Path, stage: str = "align"):
    """A trainer of `cfg.trainer` over the configured data with a freshly initialised policy."""
    with main_process_first():
        tokenizer = train.load_tokenizer(cfg)
    examples = train.prepare_examples(cfg, load_datasets(cfg.datasets))
    data = train.tokenize_examples(cfg, tokenizer, examples)
    policy = train.load_policy(cfg, tokenizer)
    metrics = MetricsLog(folder / "metrics.jsonl")
    trainer_class = train.trainer_class(cfg.trainer)
    return trainer_class(cfg, stage, policy, tokenizer, data, folder / stage, metrics, train.contrast_embeddings(cfg, examples))


SPREAD_OVER_WORKERS = {"test_readme.py"}  # independent CLI runs, the longest file of the suite


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` (pytest.ini) a file's tests run on one worker, so its module
    fixtures are built once; the README's commands are spread over the workers."""
    for item in items:
        if item.path.name not in SPREAD_OVER_WORKERS:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(scope="session")
def smollm2_tokenizer(shared_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2, shared_cache))


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory) -> Path:
    """The `models` folder of a cache holding SmolLM2 converted from its packaged GGUF, once for the
    whole session (about 30 s; `tiny` takes its tokenizer): the workers share it, the first to come
    converts while the others wait. tests/test_resolver.py tests the conversion itself."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's temporary folder is in
    with FileLock(root / "converted_models.lock"):
        resolve_model_path(SMOLLM2, root / "converted_models")
    return root / "converted_models" / "models"


def cache_with_models(folder: Path, models: Path) -> Path:
    """A new cache folder whose converted models are `models` (a link): what a test needs fresh is
    the rest (reference log-probs, embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to(models, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, converted_models) -> Path:
    """One cache per worker: SmolLM2 converted once per session, reference log-probs are keyed anyway."""
    return cache_with_models(tmp_path_factory.mktemp("cache"), converted_models)


@pytest.fixture
def fresh_cache(tmp_path, converted_models) -> Path:
    """A cache of the test's own (its reference log-probs computed anew) with the session's models."""
    return cache_with_models(tmp_path / "cache", converted_models)


@pytest.fixture
def make_cfg(tmp_path, shared_cache):
    """Compose the project config like `python train.py` would, with test-sized overrides."""

    def compose_cfg(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
            return compose(
                "config",
                overrides=[*TINY_OVERRIDES, f"runs_root={tmp_path / 'runs'}", f"cache_dir={shared_cache}", *overrides],
            )

    return compose_cfg


def hh_dialogue(turns: list[str], response: str) -> str:
    text = "".join(f"\n\nHuman: {t}" if i % 2 == 0 else f"\n\nAssistant: {t}" for i, t in enumerate(turns))
    return f"{text}\n\nAssistant: {response}"


@pytest.fixture
def hh_folder(tmp_path) -> Path:
    """A local HH folder in the original layout, with test files only (like ../shared/data)."""
    root = tmp_path / "hh"
    for subset in ("harmless-base", "helpful-base"):
        rows = []
        for i in range(12):
            turns = [f"{subset} question {i}?"] if i % 2 else [f"first {i}", f"reply {i}", f"follow-up {i}?"]
            rows.append({"chosen": hh_dialogue(turns, f"good answer {subset} {i}"), "rejected": hh_dialogue(turns, f"bad {subset} {i}")})
        (root / subset).mkdir(parents=True)
        with gzip.open(root / subset / "test.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return root
