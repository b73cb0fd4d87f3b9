"""The papers' presets (config/experiment/): every job of every sweep composes and passes the
start-up checks, and runs the papers' settings, checked here against the tables of
../shared/EVAL_PROTOCOLS.md (section 4 for the settings, section 5 for the published numbers).
The `small` variants run the same comparisons at CPU scale; one runs through the real CLI."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import train
from checks import check_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(path.stem for path in (ROOT / "config" / "experiment").glob("*.yaml") if not path.stem.endswith("_small"))

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MISTRAL, LLAMA2_7B, LLAMA2_13B = "mistralai/Mistral-7B-v0.1", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"
LLAMA3, GEMMA2, PYTHIA, ZEPHYR = (
    "meta-llama/Meta-Llama-3-8B-Instruct",
    "google/gemma-2-9b-it",
    "EleutherAI/pythia-2.8b",
    "alignment-handbook/zephyr-7b-sft-full",
)
# Section 4: batch 64 on 8 GPUs, RMSprop, lr 5e-7, warmup 150, 1 epoch, 256 / 512 tokens, grad norm 10
PAPERS_SCHEDULE = {
    "train.batch_size": 64,
    "train.optimizer": "rmsprop",
    "align.lr": 5e-7,
    "align.warmup_steps": 150,
    "align.lr_schedule": "constant",
    "align.epochs": 1,
    "max_length": 512,
    "max_prompt_length": 256,
    "train.max_grad_norm": 10.0,
    "trainer": "fsdp",
}
RPO_V1 = {
    **PAPERS_SCHEDULE,
    "sft.enabled": True,
    "sft.lr": 5e-7,
    "loss.beta": 0.1,
    "eval.max_prompts": 256,
    "eval.generation.temperature": 0.0,
}
RPO_MATRIX = {"loss.contrast_group": 8, "loss.embedding.model": MINILM, "loss.embedding.input": "prompt"}
PAIRED_RPO = {"loss.name": "rpo", "loss.tau": 0.5, "loss.paired": True, **RPO_MATRIX}
UNPAIRED_RPO = {"loss.name": "rpo_unpaired", "loss.tau": 0.75, "loss.paired": False, **RPO_MATRIX}
SR = {**PAPERS_SCHEDULE, "model.name_or_path": PYTHIA, "datasets": ["hh"], "sft.enabled": True, "loss.beta": 0.1}
SR_ROWS = {
    "dpo": {"loss.name": "dpo", "loss.sr_lambda": 0.0},
    "ipo": {"loss.name": "ipo_sum", "loss.link": "ipo", "loss.reward": "log_ratio", "loss.sr_lambda": 0.0},
    "sr_dpo": {"loss.name": "sr_dpo", "loss.sr_lambda": 0.5, "loss.sr_delta": "refined"},
    "sr_ipo": {
        "loss.name": "sr_ipo_sum",
        "loss.link": "ipo",
        "loss.reward": "log_ratio",
        "loss.sr_lambda": 0.5,
        "loss.sr_delta": "refined",
    },
    "sr_dpo_naive": {"loss.name": "sr_dpo", "loss.sr_lambda": 0.5, "loss.sr_delta": "naive"},
    "sr_dpo_rating10": {"loss.name": "sr_dpo", "loss.sr_lambda": 0.5, "loss.sr_delta": "refined"},
}
ARMORM_ROWS = {  # App. B: learning rate, beta
    "dpo": ("dpo", 3e-7, 0.01),
    "kto": ("kto", 5e-7, 0.01),
    "ipo": ("ipo_sum", 7e-7, 0.5),
    "simpo": ("simpo", 1e-6, 10.0),
    "rpo": ("rpo", 7e-7, 0.01),
}
SIMPO_ROWS = {"llama": (LLAMA3, "llama3_armorm", 1e-6, 0.3), "gemma": (GEMMA2, "gemma2_armorm", 8e-7, 0.5)}  # App. C
EMBEDDINGS = {
    "minilm": MINILM,
    "t5_large": "sentence-transformers/sentence-t5-large",
    "distilroberta": "sentence-transformers/all-distilroberta-v1",
}
SETTINGS = {
    "hh_llama2_7b": (LLAMA2_7B, "hh"),
    "hh_llama2_13b": (LLAMA2_13B, "hh"),
    "hh_mistral7b": (MISTRAL, "hh"),
    "tldr_mistral7b": (MISTRAL, "tldr"),
}
LOSSES = {
    "sft": {"loss.kind": "sft", "loss.beta": None},
    "ipo_sum": SR_ROWS["ipo"],
    "dpo": {"loss.name": "dpo"},
    "kto": {"loss.name": "kto"},
    "rpo_unpaired": UNPAIRED_RPO,
    "rpo": PAIRED_RPO,
}
MISTRAL_HH = {**RPO_V1, "model.name_or_path": MISTRAL, "datasets": ["hh"]}
LLAMA3_DIRECT = {**PAPERS_SCHEDULE, "model.name_or_path": LLAMA3, "sft.enabled": False}

# preset -> (what every job runs, {the job's overrides (sorted, without +experiment): what it runs besides})
EXPECTED: dict[str, tuple[dict, dict[str, dict]]] = {
    "rpo_weighting": (
        MISTRAL_HH,
        {
            "row/rpo_weighting=dpo": {"loss.name": "dpo", "loss.weighting": "diagonal"},
            "row/rpo_weighting=uniform": {
                "loss.name": "rpo_uniform",
                "loss.weighting": "uniform",
                "loss.compat": "official",
                "loss.contrast_group": 8,
            },
            "row/rpo_weighting=diagonal": {
                "loss.name": "rpo_diagonal",
                "loss.weighting": "diagonal_emphasis",
                "loss.compat": "official",
                "loss.alpha": 0.8,
                "loss.contrast_group": 8,
            },
            "row/rpo_weighting=unpaired": UNPAIRED_RPO,
            "row/rpo_weighting=paired": PAIRED_RPO,
        },
    ),
    "rpo_tau": (
        {**RPO_V1, "model.name_or_path": LLAMA2_7B, "datasets": ["hh"], "loss.name": "rpo", "loss.contrast_group": 8},
        {
            f"loss.tau={tau} row/rpo_tau={name}": {"loss.tau": tau, "loss.embedding.model": model}
            for tau in (0.25, 0.5, 0.75)
            for name, model in EMBEDDINGS.items()
        },
    ),
    "rpo_group": (
        MISTRAL_HH,
        {f"row/rpo_group=g{g}": {**PAIRED_RPO, "loss.contrast_group": g, "align.batch_size": 8 * g} for g in (2, 4, 6, 8)},
    ),
    "rpo_methods": (
        RPO_V1,
        {
            f"loss={loss} row/rpo_methods_setting={setting}": {**values, "model.name_or_path": model, "datasets": [data]}
            for loss, values in LOSSES.items()
            for setting, (model, data) in SETTINGS.items()
        },
    ),
    "rpo_embedding_input": (
        MISTRAL_HH,
        {f"loss.embedding.input={kind}": {**PAIRED_RPO, "loss.embedding.input": kind} for kind in ("prompt", "prompt_response")},
    ),
    "rpo_beta": (
        MISTRAL_HH,
        {
            f"loss.beta={beta} loss={loss}": {"loss.name": loss, "loss.beta": beta}
            for loss in ("dpo", "kto", "rpo")
            for beta in (0.1, 0.5, 0.8)
        },
    ),
    "rpo_temperature": (MISTRAL_HH, {f"loss={loss}": {"loss.name": loss} for loss in ("dpo", "kto", "rpo")}),
    "rpo_unpaired_llama3": (
        LLAMA3_DIRECT,
        {
            f"loss={loss} row/rpo_unpaired_llama3={data}": {
                "loss.name": loss,
                "datasets": [f"{data}_unpaired"],
                "loss.beta": 0.1,
                **(UNPAIRED_RPO if loss == "rpo_unpaired" else {}),
            }
            for loss in ("kto", "rpo_unpaired")
            for data in ("capybara", "ultrafeedback")
        },
    ),
    "rpo_armorm": (
        {**LLAMA3_DIRECT, "datasets": ["llama3_armorm"]},
        {f"row/rpo_armorm={row}": {"loss.name": loss, "align.lr": lr, "loss.beta": beta} for row, (loss, lr, beta) in ARMORM_ROWS.items()},
    ),
    "rpo_simpo": (
        {
            **PAPERS_SCHEDULE,
            "sft.enabled": False,
            "train.optimizer": "adamw",
            "train.batch_size": 128,
            "align.lr_schedule": "cosine",
            "align.warmup_ratio": 0.1,
            "max_length": 2048,
            "max_prompt_length": 1800,
            "loss.beta": 10.0,
            "loss.reward": "length_normalized",
        },
        {
            f"loss={loss} row/rpo_simpo={row}": {
                "loss.name": loss,
                "model.name_or_path": model,
                "datasets": [data],
                "align.lr": lr,
                "loss.gamma_beta_ratio": ratio,
                **({"loss.tau": 0.5, **RPO_MATRIX} if loss == "rpo_simpo" else {}),
            }
            for loss in ("simpo", "rpo_simpo")
            for row, (model, data, lr, ratio) in SIMPO_ROWS.items()
        },
    ),
    "sr": (SR, {f"row/sr={row}": values for row, values in SR_ROWS.items()}),
    "sr_lambda": (
        {**SR, "train.max_eval_examples": 50},
        {
            f"loss.sr_lambda={lam} row/sr={row}": {**SR_ROWS[row], "loss.sr_lambda": lam}
            for row in ("sr_dpo", "sr_ipo")
            for lam in (0.1, 0.3, 0.5, 1.0)
        },
    ),
    "sr_zephyr": (
        {**PAPERS_SCHEDULE, "model.name_or_path": ZEPHYR, "datasets": ["ultrafeedback"], "sft.enabled": False, "loss.beta": 0.1},
        {f"row/sr={row} seed={seed}": {**SR_ROWS[row], "seed": seed} for row in ("dpo", "ipo", "sr_dpo", "sr_ipo") for seed in (0, 1)},
    ),
}

# Section 5, copied here by hand: each preset's `paper.published` must say the same
PUBLISHED = {
    "rpo_weighting": {"dpo": 72.26, "uniform": 68.36, "diagonal": 69.92, "unpaired": 75.00, "paired": 78.52},
    "rpo_tau": {
        "minilm": {"0.25": 66.80, "0.5": 68.75, "0.75": 67.97},
        "t5_large": {"0.25": 67.38, "0.5": 65.23, "0.75": 65.43},
        "distilroberta": {"0.25": 67.58, "0.5": 67.78, "0.75": 65.43},
    },
    "rpo_group": {"g2": 71.48, "g4": 74.60, "g6": 74.61, "g8": 78.52},
    "rpo_methods": {
        method: dict(zip(["hh_llama2_7b", "hh_llama2_13b", "hh_mistral7b", "tldr_mistral7b", "alpaca_eval_mistral7b"], values, strict=True))
        for method, values in {
            "sft": (45.90, 48.05, 48.24, 28.52, 13.68),
            "ppo": (50.39, 51.95, 58.98, 39.84, 15.00),
            "ipo_sum": (53.91, 46.48, 63.48, 33.98, 21.62),
            "dpo": (63.67, 63.28, 72.26, 48.83, 30.84),
            "kto": (67.78, 71.48, 61.13, 39.45, 15.06),
            "rpo_unpaired": (61.33, 70.31, 75.00, 50.39, 31.24),
            "rpo": (68.75, 72.66, 78.52, 50.00, 38.88),
        }.items()
    },
    "rpo_embedding_input": {"prompt": {"hh": 78.52, "alpaca_eval": 38.88}, "prompt_response": {"hh": 80.86, "alpaca_eval": 35.47}},
    "rpo_beta": {
        "dpo": {"0.1": 72.26, "0.5": 64.85, "0.8": 58.59},
        "kto": {"0.1": 61.13, "0.5": 65.23, "0.8": 63.28},
        "rpo": {"0.1": 78.52, "0.5": 68.36, "0.8": 63.67},
    },
    "rpo_temperature": {
        "dpo": {"0": 72.26, "0.3": 70.70, "0.7": 72.65},
        "kto": {"0": 61.13, "0.3": 57.81, "0.7": 60.94},
        "rpo": {"0": 78.52, "0.3": 72.48, "0.7": 75.39},
    },
    "rpo_unpaired_llama3": {
        data: {
            loss: dict(zip(["open_llm", "alpaca_eval2_lc", "mt_bench", "arena_hard"], values, strict=True)) for loss, values in rows.items()
        }
        for data, rows in {
            "capybara": {"kto": (66.13, 23.60, 7.13, 21.0), "rpo_unpaired": (68.68, 23.91, 7.23, 23.4)},
            "ultrafeedback": {"kto": (70.11, 23.10, 7.02, 14.3), "rpo_unpaired": (70.53, 28.92, 7.11, 18.4)},
        }.items()
    },
    "rpo_armorm": {
        loss: dict(zip(["open_llm", "alpaca_eval2_lc", "mt_bench", "arena_hard"], values, strict=True))
        for loss, values in {
            "rpo": (70.70, 44.20, 7.45, 45.60),
            "dpo": (69.91, 41.59, 7.49, 44.20),
            "simpo": (70.07, 42.19, 7.21, 37.20),
        }.items()
    },
    "rpo_simpo": {
        "llama": {"simpo": {"alpaca_eval2_lc": 42.19, "arena_hard": 37.20}, "rpo_simpo": {"alpaca_eval2_lc": 44.72, "arena_hard": 38.80}},
        "gemma": {"simpo": {"alpaca_eval2_lc": 50.05, "arena_hard": 62.90}, "rpo_simpo": {"alpaca_eval2_lc": 52.09, "arena_hard": 63.50}},
    },
    "sr": {
        "mt_bench": {
            "sr_dpo vs dpo": [45.62, 33.76, 20.62],
            "sr_ipo vs ipo": [38.75, 25.00, 26.25],
            "sr_dpo vs ipo": [42.50, 21.25, 36.25],
            "sr_ipo vs dpo": [38.61, 28.89, 32.50],
            "sr_dpo_rating10 vs dpo": [44.38, 33.75, 21.87],
            "sr_dpo_naive vs dpo": [38.75, 41.88, 19.37],
        },
        "vicuna_bench": {
            "sr_dpo vs dpo": [63.75, 13.75, 22.50],
            "sr_ipo vs ipo": [60.00, 8.75, 31.25],
            "sr_dpo vs ipo": [66.25, 11.50, 26.25],
            "sr_ipo vs dpo": [61.25, 5.00, 33.75],
        },
    },
    "sr_lambda": {"chosen_lambda": 0.5},
    "sr_zephyr": {"base": 58.14, "dpo": 63.19, "ipo": 61.35, "sr_dpo": 64.40, "sr_ipo": 62.51},
}


# what each table's rows are read against (`paper.table_baselines`: eval.table's default comparisons,
# seed by seed); Table 2 (tau x embedding model) and the choice of lambda have no baseline row
TABLE_BASELINES = {
    "rpo_weighting": ["row/rpo_weighting=dpo"],
    "rpo_group": ["row/rpo_group=g2"],
    "rpo_methods": ["loss=dpo"],
    "rpo_embedding_input": ["loss.embedding.input=prompt"],
    "rpo_beta": ["loss=dpo"],
    "rpo_temperature": ["loss=dpo"],
    "rpo_unpaired_llama3": ["loss=kto"],
    "rpo_armorm": ["row/rpo_armorm=dpo"],
    "rpo_simpo": ["loss=simpo"],
    "sr": ["row/sr=dpo", "row/sr=ipo"],
    "sr_zephyr": ["row/sr=dpo", "row/sr=ipo"],
}


def composed(overrides: tuple[str, ...], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@functools.cache
def sweep_jobs(experiment: str) -> dict[str, object]:
    """Each job of `python train.py -m +experiment=<experiment>` (its swept overrides, sorted and joined,
    as the label) and its composed config, expanded as Hydra's basic sweeper expands them."""
    params = composed((f"+experiment={experiment}",), hydra_config=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return {" ".join(sorted(job)): composed((f"+experiment={experiment}", *job)) for job in jobs}


def value(cfg, key: str) -> object:
    if key == "datasets":
        return list(cfg.datasets)
    found = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(found) if OmegaConf.is_config(found) else found


def test_every_paper_preset_is_checked_here():
    assert PRESETS == sorted(EXPECTED) == sorted(PUBLISHED)
    assert sorted(path.stem for path in (ROOT / "config" / "experiment").glob("*_small.yaml")) == sorted(
        f"{name}_small" for name in PRESETS
    )


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_each_job_of_a_preset_runs_the_papers_settings(preset):
    common, rows = EXPECTED[preset]
    jobs = sweep_jobs(preset)
    assert sorted(jobs) == sorted(rows)  # the sweep runs the table's rows, no more, no fewer
    for label, cfg in jobs.items():
        for key, expected in {**common, **rows[label]}.items():
            assert value(cfg, key) == expected, f"{preset} {label}: {key}"
        check_config(cfg)  # what train.py checks at start-up, before any data or model loads
        assert cfg.paper.preset == preset and cfg.run_name == f"{cfg.loss.name}_{cfg.model.name}"


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_each_preset_states_the_published_numbers(preset):
    paper = next(iter(sweep_jobs(preset).values())).paper
    assert OmegaConf.to_container(paper.published) == PUBLISHED[preset]
    for row, reason in paper.get("not_run", {}).items():  # a row of the paper the project cannot run is named, with why
        assert "not implemented" in reason and not any(row in label for label in sweep_jobs(preset))


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_each_preset_names_the_rows_its_table_is_read_against(preset):
    """Each baseline is a job of the preset's sweep (and of its small variant's), not every job."""
    for variant in (preset, f"{preset}_small"):
        jobs = sweep_jobs(variant)
        named = [str(b) for b in next(iter(jobs.values())).paper.get("table_baselines", [])]
        assert named == TABLE_BASELINES.get(preset, []), variant
        for baseline in named:
            having = [label for label in jobs if baseline in label.split()]
            assert 0 < len(having) < len(jobs), f"{variant}: {baseline}"

def test_the_rows_set_what_only_they_change():
    """Rows that look alike differ where the paper says: the [1, 10] rating prompt, the official weights."""
    sr = sweep_jobs("sr")
    assert "rating of 10 out of 10" in sr["row/sr=sr_dpo_rating10"].loss.sr_prompt
    assert "rating of 100 out of 100" in sr["row/sr=sr_dpo"].loss.sr_prompt
    weighting = sweep_jobs("rpo_weighting")
    assert weighting["row/rpo_weighting=paired"].loss.compat == "paper"  # only Table 1's uniform and diagonal rows are the official code's
    for preset in ("rpo_group", "rpo_group_small"):  # the group-size rows change the alignment batch; every row starts from one SFT
        sft_settings = {json.dumps(sft_settings_of(cfg), sort_keys=True) for cfg in sweep_jobs(preset).values()}
        assert len(sft_settings) == 1, preset


def sft_settings_of(cfg) -> dict:
    """What `sft.reuse` compares between runs (besides the examples)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in settings.items() if key not in train.NOT_READ_BY_SFT}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_each_small_variant_is_the_same_comparison_at_cpu_scale(preset):
    full, small = sweep_jobs(preset), sweep_jobs(f"{preset}_small")
    assert len(small) >= 2
    for label, cfg in small.items():
        check_config(cfg)
        assert (cfg.model.name, cfg.trainer, cfg.paper.preset) == ("smollm2_135m", "basic", preset), label
        for name, options in cfg.datasets.items():
            path = options.get("path")
            assert path is not None and (ROOT / path).is_dir(), f"{label}: datasets.{name}.path={path} (local data only)"
        if label in full:  # the same row: the same loss, whatever the scale
            assert cfg.loss == full[label].loss, label
    assert set(small) & set(full) or preset in ("rpo_methods", "rpo_simpo", "rpo_tau", "rpo_unpaired_llama3"), (
        "the small sweep shares no row with the paper's"
    )


def test_a_small_preset_sweeps_through_the_cli_and_ends_in_its_table(tmp_path, fresh_cache):
    """`python train.py -m +experiment=rpo_group_small` on `tiny` and the demo data: one job per row,
    each with its contrast group and alignment batch, and the sweep's table has the four rows."""
    command = [
        sys.executable,
        "train.py",
        "-m",
        "+experiment=rpo_group_small",
        "small=demo",
        "model=tiny",
        "sft.enabled=false",
        "align.max_examples=64",
        "train.max_eval_examples=16",
        "eval.after_training=none",
        f"runs_root={tmp_path}",
        f"cache_dir={fresh_cache}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "rpo_group_small").iterdir())
    configs = {OmegaConf.load(path).loss.contrast_group: OmegaConf.load(path) for path in sweep.glob("*/config.yaml")}
    assert sorted(configs) == [2, 4, 6, 8]
    assert all(cfg.align.batch_size == 8 * group and cfg.model.name == "tiny" for group, cfg in configs.items())
    for summary in sweep.glob("*/summary.json"):  # the alignment stage ran at its row's batch
        group = OmegaConf.load(summary.with_name("config.yaml")).loss.contrast_group
        assert json.loads(summary.read_text())["stages"]["align"]["steps"] == math.ceil(64 / (8 * group)), group
    table = (sweep / "table.md").read_text()
    assert f"Sweep table: {sweep / 'table.md'}" in result.stdout
    for group in (2, 4, 6, 8):
        assert f"| row/rpo_group=g{group} | 1 / 1 |" in table
    published = {line.split(" | ")[0]: line.rsplit(" | ", 1)[1] for line in table.splitlines()
                 if line.startswith("| row/rpo_group=") and " | 1 / 1 | " in line}  # the settings' rows
    assert published == {"| row/rpo_group=g2": "71.48 |", "| row/rpo_group=g4": "74.60 |", "| row/rpo_group=g6": "74.61 |",
                         "| row/rpo_group=g8": "78.52 |"}  # Table 3's numbers beside each row (paper.published)
    assert "Against row/rpo_group=g2, seed by seed" in table  # the preset's comparison (paper.table_baselines)
    with (sweep / "versus_baseline.csv").open() as handle:
        versus = {next(o for o in row["setting"].split() if o.startswith("row/")): row for row in csv.DictReader(handle)}
    assert sorted(versus) == [f"row/rpo_group=g{group}" for group in (4, 6, 8)], versus
    assert all(row["baseline"] == "row/rpo_group=g2" and row["margin n"] == "1" for row in versus.values())
    states = [json.loads(path.read_text())["state"] for path in sweep.glob("*/state.json")]
    assert states == ["finished"] * 4


def test_grids_cross_every_value():
    """A two-key preset sweeps the full product (Hydra's basic sweeper), e.g. Table 2's 3 x 3."""
    labels = set(sweep_jobs("rpo_tau"))
    assert labels == {f"loss.tau={tau} row/rpo_tau={name}" for tau, name in itertools.product((0.25, 0.5, 0.75), EMBEDDINGS)}
