"""Malformed checkpoints fail with one line naming the file and tensor, never a deep MLX traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import make_checkpoint

from mlx_qwenmoe.errors import CheckpointError, ConfigError
from mlx_qwenmoe.loading import load_model

QKV = "model.layers.0.linear_attn.in_proj_qkv.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path, _ = make_checkpoint(tmp_path_factory.mktemp("pristine"))
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(pristine, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, str(f))


def _error(exc_type, path: Path) -> str:
    with pytest.raises(exc_type) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop(QKV))
    msg = _error(CheckpointError, ckpt)
    assert "missing tensor language_model.model.layers.0.linear_attn.in_proj_qkv.weight" in msg


def test_missing_expert_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    assert "experts.5.up_proj.weight is missing" in _error(CheckpointError, ckpt)


def test_wrong_shape_names_tensor_and_file(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({QKV: np.zeros((3, 64), np.float32)}))
    msg = _error(CheckpointError, ckpt)
    assert "in_proj_qkv.weight in model.safetensors has shape (3, 64), expected (128, 64)" in msg


def test_unexpected_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.bogus.weight": np.zeros(3, np.float32)}))
    assert "unexpected tensor language_model.model.layers.0.bogus.weight" in _error(CheckpointError, ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = _error(CheckpointError, ckpt)
    assert "model.safetensors: truncated" in msg


def test_not_a_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not a checkpoint" * 10)
    assert "not a safetensors file" in _error(CheckpointError, ckpt)


def test_header_lies_about_size(ckpt):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[QKV]["shape"] = [256, 64]
    new = json.dumps(header).encode()
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    assert f"tensor {QKV}: header size does not match" in _error(CheckpointError, ckpt)


def test_index_naming_absent_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {QKV: "model-00002-of-00002.safetensors"}})
    )
    assert "lists model-00002-of-00002.safetensors, which is not in" in _error(CheckpointError, ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "model_type 'llama' is not supported" in _error(ConfigError, ckpt)


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_experts"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "config.json: missing required field(s) num_experts" in _error(ConfigError, ckpt)


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json: not found" in _error(ConfigError, ckpt)


def test_full_attention_interval_without_layer_types(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["layer_types"]
    cfg["full_attention_interval"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    # layers 1 and 3 become attention layers, whose tensors the checkpoint lacks
    assert "missing tensor language_model.model.layers.1.self_attn" in _error(CheckpointError, ckpt)
