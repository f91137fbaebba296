"""Bad input and output: one-line errors (exit code 2 from the CLI), nothing left behind; and the
35B-A3B dry-run plan from its config alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_qwenmoe.cli import main
from mlx_qwenmoe.convert import convert, plan_conversion
from mlx_qwenmoe.convert import pipeline
from mlx_qwenmoe.convert.memory import GiB
from mlx_qwenmoe.errors import CheckpointError, ConfigError, OutputError
from tiny_models import make_checkpoint

A3B_CONFIG = Path(__file__).parent / "fixtures" / "qwen3_5_35b_a3b_config.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src, _ = make_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", shards=2, hidden_size=64, moe_intermediate_size=64)
    return src


@pytest.fixture
def src(checkpoint, tmp_path):
    """A private copy to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "src"))


def _only(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir())


def _cli(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def _shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[0]


@pytest.mark.parametrize("damage, error, message", [
    ("not_safetensors", CheckpointError, "not a safetensors file"),
    ("truncated", CheckpointError, "truncated"),
    ("missing_field", ConfigError, "missing required field"),
    ("missing_tensor", CheckpointError, "no tensor for"),
    ("expert_shape", CheckpointError, "layers.1.mlp.experts.3.up_proj.weight has shape"),
])
def test_bad_checkpoint_is_one_line_and_leaves_nothing(src, tmp_path, damage, error, message):
    if damage == "not_safetensors":
        _shard(src).write_bytes(b"\x00" * 4 + b"this is not a safetensors file")
    elif damage == "truncated":
        data = _shard(src).read_bytes()
        _shard(src).write_bytes(data[: len(data) - 1000])
    elif damage == "expert_shape":
        from safetensors.numpy import load_file, save_file

        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        for f in src.glob("model-*.safetensors"):
            tensors = load_file(f)
            if name in tensors:
                tensors[name] = tensors[name][:, :32].copy()
                save_file(tensors, str(f))
    elif damage == "missing_field":
        config = json.loads((src / "config.json").read_text())
        del config["num_experts"]
        (src / "config.json").write_text(json.dumps(config))
    else:  # the index lists a file that holds fewer tensors than the config's model needs
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "layers.2.mlp.shared_expert." not in k}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        from safetensors.numpy import load_file, save_file

        for f in src.glob("model-*.safetensors"):
            save_file({k: v for k, v in load_file(f).items() if "layers.2.mlp.shared_expert." not in k}, str(f))
    before = _only(tmp_path)
    with pytest.raises(error, match=message) as info:
        convert(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert _only(tmp_path) == before  # no DST, no hidden partial directory

    result = _cli(str(src), str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert _only(tmp_path) == before


def test_existing_dst_needs_force(checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"pass force=True"):  # the library names its own argument
        convert(checkpoint, dst)
    result = _cli(str(checkpoint), str(dst))
    assert result.exit_code == 2 and "pass --force to replace it" in result.output  # the CLI, its flag
    with pytest.raises(OutputError, match="not a model directory"):
        convert(checkpoint, dst, force=True)  # --force replaces only a model directory
    assert _only(dst) == ["keep.txt"]
    (dst / "config.json").write_text("{}")
    convert(checkpoint, dst, force=True)
    assert "keep.txt" not in _only(dst) and (dst / "model.safetensors").exists()
    assert _only(tmp_path) == ["out"]


def test_unwritable_dst(checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    result = _cli(str(checkpoint), str(tmp_path / "file" / "out"))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    with pytest.raises(OutputError):
        convert(checkpoint, tmp_path / "missing" / "out")


def test_interrupted_conversion_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    calls = []

    def interrupt(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt

    real = pipeline._Emitter.__call__
    monkeypatch.setattr(pipeline._Emitter, "__call__", lambda self, *a: (interrupt(*a), real(self, *a))[1])
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint, tmp_path / "out")
    assert _only(tmp_path) == []


def test_a3b_fit_24gb_dry_run_from_config_alone():
    """Qwen3.5-35B-A3B on a 24 GB Mac at 32K context: the plan fits, and says which layers got which bits."""
    result = _cli(str(A3B_CONFIG), "--dry-run", "--fit", "24GB", "--context", "32768")
    assert result.exit_code == 0, result.output
    print("\n" + result.output)
    assert "experts" in result.output and "headroom" in result.output

    plan = plan_conversion(json.loads(A3B_CONFIG.read_text()), fit="24GB", context=32768)
    assert plan.weight_bytes + plan.cache_bytes < 16 * GiB and plan.headroom_bytes >= 0
    assert plan.mtp_layers == 1 and any(t.name.startswith("mtp.") for t in plan.tensors)
    assert {t.bits for t in plan.tensors if t.kind == "experts"} <= {3, 4}
    assert all(t.bits == 8 for t in plan.tensors if t.kind == "gates")
    assert all(t.bits is None for t in plan.tensors if t.name.endswith(("A_log", "dt_bias", "conv1d.weight", "norm.weight")))
    default = plan_conversion(json.loads(A3B_CONFIG.read_text()))
    assert 19.5e9 < default.weight_bytes < 20.5e9  # 4.5 bits/weight, as the facts sheet's arithmetic says


def test_fit_that_cannot_fit_says_so():
    with pytest.raises(ConfigError, match="does not fit"):
        plan_conversion(json.loads(A3B_CONFIG.read_text()), fit="16GB")
    assert _cli(str(A3B_CONFIG), "--dry-run", "--fit", "24GB", "--bits", "4").exit_code == 2
