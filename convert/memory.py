"""Memory arithmetic for planning: size strings, the macOS GPU working-set limit, cache bytes."""

from __future__ import annotations

import re

from mlx_qwenmoe.config import ModelArgs
from mlx_qwenmoe.errors import ConfigError

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}


MAX_SIZE = 1 << 50  # 1 PiB: past any machine, so a larger size is a typo


def parse_size(text: str, option: str = "size", *, unit_required: bool = False) -> int:
    """Bytes in '24GB', '24G', '24GiB', '512MB', '0': units are binary, as Apple's RAM sizes are
    (a "24 GB" Mac has 24 GiB). ``unit_required``: a bare number ('24') is refused, not bytes."""
    m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([kmgt]?)((?:i?b)?)\s*", str(text), re.IGNORECASE)
    if not m or (unit_required and not (m.group(2) or m.group(3))):
        raise ConfigError(f"{option} {text!r}: expected a size with a unit, such as 24GB, 512MB or 64GiB")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size > MAX_SIZE:
        raise ConfigError(f"{option} {text!r}: more than 1 PiB; expected a size such as 24GB")
    return int(size)


def working_set_limit(ram_bytes: int) -> int:
    """The GPU working-set limit macOS grants by default (``recommendedMaxWorkingSetSize``).

    Observed values follow a simple rule: two thirds of RAM up to 36 GiB (10.67 GiB on a
    16 GiB Mac, 16 GiB on a 24 GiB one), three quarters above (48 GiB on a 64 GiB Mac).
    Raising ``iogpu.wired_limit_mb`` lifts it; plan with ``ram_bytes`` scaled accordingly.
    """
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GiB else ram_bytes * 3 // 4


def layer_cache_bytes(args: ModelArgs, attention: bool, context: int, dtype_bytes: int) -> int:
    """Cache bytes of one layer: K and V for ``context`` tokens in the activation dtype for
    full attention; the float32 recurrent state and the conv tail for DeltaNet, whatever the context."""
    if attention:
        return 2 * args.num_key_value_heads * args.head_dim * context * dtype_bytes
    conv_dim = 2 * args.linear_num_key_heads * args.linear_key_head_dim + args.linear_num_value_heads * args.linear_value_head_dim
    state = args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim * 4
    return state + (args.linear_conv_kernel_dim - 1) * conv_dim * dtype_bytes


def cache_bytes(args: ModelArgs, context: int, dtype_bytes: int, mtp_layers: int = 0) -> int:
    """Bytes of the generation cache for ``context`` tokens: every decoder layer's, and the MTP
    layers' (full attention over the same context)."""
    layers = sum(layer_cache_bytes(args, not args.is_linear(i), context, dtype_bytes) for i in range(args.num_hidden_layers))
    return layers + mtp_layers * layer_cache_bytes(args, True, context, dtype_bytes)
