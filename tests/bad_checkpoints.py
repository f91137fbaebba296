"""A corpus of damaged checkpoints, built on demand from the bundled demo model (no binaries in git).

``DAMAGE[name] = (damage, error line)``: ``damage(model_dir)`` breaks a private copy of the demo
checkpoint in one way; loading it must fail with exactly the error line, ``{d}`` standing for the
directory. Kinds of damage: files that are directories, unreadable or invalid config values,
broken safetensors headers, truncated, missing, misshapen, stray and duplicate tensors, and a
broken tokenizer or chat template.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import mlx.core as mx

from mlx_qwenmoe.api import default_model_dir

WEIGHTS = "model.safetensors"
EXPERT = "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"


def copy_demo(dst: Path) -> Path:
    return Path(shutil.copytree(default_model_dir(), dst, ignore=shutil.ignore_patterns("__init__.py", "*.md", "*.txt")))


def _config(**changes: Any) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        (d / "config.json").write_text(json.dumps(config))

    return damage


_DROP = object()


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return damage


def _header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header (same data bytes after it)."""
    def damage(d: Path) -> None:
        raw = (d / WEIGHTS).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        edit(header)
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        (d / WEIGHTS).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])

    return damage


def _tensors(edit: Callable[[Dict[str, mx.array]], None], name: str = WEIGHTS) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        weights = mx.load(str(d / WEIGHTS))
        edit(weights)
        mx.save_safetensors(str(d / name), weights)

    return damage


def _stray_copy(d: Path) -> None:
    weights = mx.load(str(d / WEIGHTS))
    mx.save_safetensors(str(d / "extra.safetensors"), {EXPERT: weights[EXPERT]})


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:-1000])


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _chat_template(template: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = json.loads((d / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config))

    return damage


def _smaller_vocab(d: Path) -> None:
    """Embedding and head cut to 4000 rows, config to match: the 4096-token tokenizer no longer fits."""
    _config(vocab_size=4000)(d)
    _tensors(lambda w: w.update({k: v[:4000] for k, v in w.items() if "embed_tokens" in k or "lm_head" in k}))(d)


C = "{d}/config.json"
W = "{d}/model.safetensors"
DAMAGE: Dict[str, Tuple[Callable[[Path], None], str]] = {
    "config_is_dir": (_replace_with_dir("config.json"), f"{C}: is a directory, expected a JSON file"),
    "config_not_json": (_write("config.json", b"{not json"), f"{C}: not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    "config_not_utf8": (_write("config.json", b'{"a": "\xff"}'), f"{C}: not valid JSON (not UTF-8 text)"),
    "config_array": (_write("config.json", b"[1, 2]"), f"{C}: expected a JSON object"),
    "experts_per_tok_0": (_config(num_experts_per_tok=0), f"{C}: num_experts_per_tok must be an integer from 1 to 2^31, not 0"),
    "experts_per_tok_too_many": (_config(num_experts_per_tok=17), f"{C}: num_experts_per_tok 17 exceeds num_experts 16"),
    "num_experts_0": (_config(num_experts=0), f"{C}: num_experts must be an integer from 1 to 2^31, not 0"),
    "attention_heads_0": (_config(num_attention_heads=0), f"{C}: num_attention_heads must be an integer from 1 to 2^31, not 0"),
    "attention_interval_0": (_config(layer_types=_DROP, full_attention_interval=0), f"{C}: full_attention_interval must be an integer from 1 to 2^31, not 0"),
    "hidden_size_string": (_config(hidden_size="64"), f"{C}: hidden_size must be an integer from 1 to 2^31, not '64'"),
    "vocab_size_negative": (_config(vocab_size=-5), f"{C}: vocab_size must be an integer from 1 to 2^31, not -5"),
    "rms_norm_eps_nan": (_config(rms_norm_eps=float("nan")), f"{C}: rms_norm_eps must be a number above 0 and at most 1, not nan"),
    "missing_field": (_config(num_experts=_DROP), f"{C}: missing required field(s) num_experts"),
    "weights_is_dir": (_replace_with_dir(WEIGHTS), f"{W}: not a safetensors file (not a regular file)"),
    "weights_truncated": (_truncate, f"{W}: truncated: tensor mtp.layers.0.mlp.shared_expert.down_proj.biases ends at byte 6364416 but the file holds 6364072 data bytes"),
    "header_not_json": (_write(WEIGHTS, struct.pack("<Q", 4) + b"{{{{"), f"{W}: not a safetensors file (header is not JSON)"),
    "header_too_long": (_write(WEIGHTS, struct.pack("<Q", 1 << 40) + b"{}"), f"{W}: not a safetensors file (header length 1099511627776 exceeds the file)"),
    "header_bad_dtype": (_header(lambda h: h[EXPERT].update(dtype="Q7")), f"{W}: tensor {EXPERT}: unsupported dtype 'Q7'"),
    "header_bad_shape": (_header(lambda h: h[EXPERT].update(shape=[16, -128, 16])), f"{W}: tensor {EXPERT}: malformed header entry"),
    "header_bad_offsets": (_header(lambda h: h[EXPERT].update(data_offsets=[0, 3])), f"{W}: tensor {EXPERT}: header size does not match shape [16, 128, 16] U32"),
    "missing_tensor": (_tensors(lambda w: w.pop(EXPERT)), f"{{d}}: missing tensor {EXPERT}"),
    "expert_wrong_shape": (_tensors(lambda w: w.update({EXPERT: w[EXPERT][:, :64]})), f"{{d}}: tensor {EXPERT} in model.safetensors has shape (16, 64, 16), expected (16, 128, 16)"),
    "stray_duplicate": (_stray_copy, f"{W}: tensor {EXPERT} is also in extra.safetensors"),
    "index_lists_missing_file": (_write("model.safetensors.index.json", b'{"weight_map": {"a": "gone.safetensors"}}'), "{d}/model.safetensors.index.json: lists gone.safetensors, which is not in {d}"),
    "tokenizer_invalid": (_write("tokenizer.json", b'{"model": 5}'), "{d}: the tokenizer cannot be loaded ('int' object has no attribute 'get')"),
    "tokenizer_larger_than_vocab": (_smaller_vocab, "{d}: the tokenizer has 4096 tokens but the model's vocab_size is 4000"),
}

# Damage found only when the chat template is rendered, not at load.
CHAT_TEMPLATE = (_chat_template("{% if messages %}{{ unclosed"), "the checkpoint's chat template fails (TemplateSyntaxError: unexpected end of template, expected 'end of print statement'.)")
