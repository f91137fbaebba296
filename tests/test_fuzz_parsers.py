"""Property-based tests of every parser of outside data: the safetensors header reader, config.json,
the checkpoint key mapping and the converter's size and option parsing.

The property is always: a valid result, or our own exception (``QwenMoeError``) with a one-line
message. Never another exception, a hang or a file left behind. The budget and seed come from the
hypothesis profile in conftest.py (``MLX_QWENMOE_FUZZ=long`` for long runs).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mlx_qwenmoe.checkpoint import hf_to_mlx
from mlx_qwenmoe.config import ModelArgs, read_config
from mlx_qwenmoe.convert.memory import MAX_SIZE, parse_size
from mlx_qwenmoe.convert.plan import plan_conversion
from mlx_qwenmoe.errors import CheckpointError, QwenMoeError
from mlx_qwenmoe.loading import check_safetensors

CONFIG = json.loads((Path(__file__).parent / "fixtures" / "qwen3_5_35b_a3b_config.json").read_text())
TEXT = CONFIG["text_config"]
ARGS = ModelArgs.from_config(CONFIG)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def _one_line(error: BaseException) -> None:
    assert isinstance(error, QwenMoeError), f"{type(error).__name__}: {error}"
    assert "\n" not in str(error) and str(error)


# --- safetensors headers ---------------------------------------------------------------------------

dtypes = st.sampled_from(["F32", "BF16", "U32", "I64", "BOOL", "F8_E4M3", "Q4", "", "f32"]) | json_values
shapes = st.lists(st.integers(-2, 6), max_size=4) | json_values
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3) | json_values})
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5)


def _check_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(data)
        try:
            header = check_safetensors(path)
        except Exception as e:  # noqa: BLE001  the property under test
            _one_line(e)
            return
    size = len(data) - 8 - struct.unpack("<Q", data[:8])[0]
    for info in header.values():
        start, end = info["data_offsets"]
        assert 0 <= start <= end <= size and end - start == math.prod(info["shape"]) * {"F32": 4, "BF16": 2, "U32": 4, "I64": 8, "BOOL": 1, "F8_E4M3": 1}[info["dtype"]]


@given(headers, st.binary(max_size=300))
def test_random_safetensors_headers(header, data):
    raw = json.dumps(header).encode()
    _check_file(struct.pack("<Q", len(raw)) + raw + data)


@given(st.binary(max_size=64))
@example(b"")
@example(struct.pack("<Q", 2**64 - 1))
def test_random_bytes_as_safetensors(data):
    _check_file(data)


@given(st.data())
def test_mutated_valid_safetensors(data):
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}, "__metadata__": {"format": "pt"}}
    raw = bytearray(struct.pack("<Q", len(json.dumps(header))) + json.dumps(header).encode() + bytes(32))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _check_file(bytes(raw[:cut]))


# --- config.json -----------------------------------------------------------------------------------

fields = st.sampled_from(sorted(TEXT))


@given(st.dictionaries(fields, json_values, max_size=4), st.lists(fields, max_size=3))
def test_config_with_wrong_or_missing_fields(changes, dropped):
    text = {k: v for k, v in TEXT.items() if k not in dropped}
    text.update(changes)
    try:
        args = ModelArgs.from_config({**CONFIG, "text_config": text})
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        return
    assert 1 <= args.num_experts_per_tok <= args.num_experts and args.vocab_size >= 1 and args.head_dim >= 1
    assert len(args.layer_types) == args.num_hidden_layers


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_file_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_bytes(data)
        try:
            config = read_config(Path(d))
        except Exception as e:  # noqa: BLE001
            _one_line(e)
            return
    assert isinstance(config, dict)
    try:
        ModelArgs.from_config(config)
    except Exception as e:  # noqa: BLE001
        _one_line(e)


# --- checkpoint key mapping ------------------------------------------------------------------------

def _real_keys(experts: int = 4) -> dict:
    """The names of layer 0 of a Hugging Face checkpoint (per-expert layout) with small arrays."""
    p = "model.language_model.layers.0"
    keys = {f"{p}.mlp.experts.{e}.{proj}.weight": (3, 2) for e in range(experts) for proj in ("gate_proj", "up_proj", "down_proj")}
    keys.update({f"{p}.mlp.gate.weight": (experts, 2), f"{p}.input_layernorm.weight": (2,),
                 f"{p}.linear_attn.conv1d.weight": (4, 1, 4), f"{p}.linear_attn.A_log": (2,),
                 "model.language_model.embed_tokens.weight": (5, 2), "lm_head.weight": (5, 2),
                 f"{p}.mlp.experts.gate_up_proj": (experts, 6, 2), f"{p}.mlp.experts.down_proj": (experts, 2, 3)})
    return keys


KEYS = _real_keys()
ALIASES = {"model.language_model.": "model.", "lm_head.": "language_model.lm_head."}


@given(st.lists(st.sampled_from(sorted(KEYS)), max_size=20), st.lists(st.sampled_from(sorted(KEYS)), max_size=3))
def test_key_mapping_of_subsets_and_duplicates(subset, aliased):
    from dataclasses import replace

    weights = {k: np.zeros(KEYS[k], np.float32) for k in subset}
    # The same tensor under a second spelling that maps to the same name.
    aliases = {next(k.replace(a, b, 1) for a, b in ALIASES.items() if k.startswith(a)): k for k in aliased}
    for alias, k in aliases.items():
        weights[alias] = np.ones(KEYS[k], np.float32)
    try:
        out = hf_to_mlx(weights, replace(ARGS, num_experts=4), from_hf=True)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        assert isinstance(e, CheckpointError)
        return
    assert not set(aliases.values()) & set(subset), "a duplicate went unnoticed"
    assert all(isinstance(v, np.ndarray) for v in out.values())


# --- converter sizes and options -------------------------------------------------------------------

@given(st.text(max_size=30) | st.from_regex(r"\s*\d{1,25}(\.\d{0,5})?\s*[kKmMgGtTpP]?[iI]?[bB]?\s*", fullmatch=True))
@example("24")
@example("99999999999999999999TB")
def test_size_strings(text):
    for unit_required in (False, True):
        try:
            n = parse_size(text, "--fit", unit_required=unit_required)
        except Exception as e:  # noqa: BLE001
            _one_line(e)
            continue
        assert isinstance(n, int) and 0 <= n <= MAX_SIZE


@given(bits=st.integers(-2, 10), group_size=st.sampled_from([0, 16, 32, 64, 128, 100]), context=st.integers(-5, 2**40),
       fit=st.none() | st.text(max_size=10) | st.sampled_from(["24GB", "1TB", "512MB", "24"]),
       reserve=st.text(max_size=8) | st.sampled_from(["0", "512MB"]), dtype=st.none() | st.sampled_from(["bfloat16", "float16", "float32", "int8", ""]))
def test_plan_options(bits, group_size, context, fit, reserve, dtype):
    try:
        plan = plan_conversion(CONFIG, bits=bits, group_size=group_size, fit=fit, context=context, reserve=reserve, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        _one_line(e)
        return
    assert plan.weight_bytes > 0 and plan.context == context


# --- failures the fuzzing found, kept as regular tests ---------------------------------------------

def test_tensor_name_with_a_newline_stays_one_line(tmp_path):
    raw = json.dumps({"a\nb": None}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError) as info:
        check_safetensors(tmp_path / "model.safetensors")
    assert str(info.value) == f"{tmp_path}/model.safetensors: tensor 'a\\nb': malformed header entry"


def test_one_tensor_under_two_spellings_is_refused():
    weights = {"model.language_model.norm.weight": np.zeros(2), "model.norm.weight": np.zeros(2)}
    with pytest.raises(CheckpointError) as info:
        hf_to_mlx(weights, ARGS, from_hf=True)
    assert str(info.value) == "tensors model.language_model.norm.weight and model.norm.weight are the same parameter"
