"""Every kernel in ``metal/``, wrapped exactly as MLX wraps it, passes a Metal-rules syntax check.

The check (``tests/msl_check``) runs clang's C++-for-OpenCL front end over the source
MLX itself generates, at Qwen3.5-35B-A3B shapes in bfloat16, at the kernel tests'
shapes in float32, and with inputs small enough to land in the ``constant`` address
space. Known-bad snippets show that it rejects what Apple's compiler rejects.
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

import msl_check  # tests/msl_check
from msl_check import cases

if not msl_check.clang_available():
    if os.environ.get("CI"):
        pytest.fail("clang is required in CI for the Metal syntax check (.ci/run installs it)", pytrace=False)
    pytest.skip("clang not installed: the Metal syntax check needs it (apt-get install clang)", allow_module_level=True)

EXPECTED_KERNELS = {
    "moe_router", "moe_gate_up", "moe_down",
    "gated_delta_decode", "gated_delta_chunk_prep", "gated_delta_chunk_state",
}


@pytest.mark.parametrize("shapes", cases.SHAPES, ids=lambda s: s.name)
def test_every_kernel_passes(shapes: cases.Shapes) -> None:
    sources = []
    for fn, args in cases.calls(shapes).values():
        sources += msl_check.mlx_sources(fn, *args)
    assert {kernel for kernel, _ in sources} == EXPECTED_KERNELS
    failed = [f"{d.kernel} ({d.instance}):\n{d.errors}" for d in msl_check.check_sources(sources) if not d.ok]
    assert not failed, "\n\n".join(failed)


def test_tiny_inputs_are_constant() -> None:
    """The tiny shape set really exercises MLX's `constant` placement of inputs under 8 elements."""
    fn, args = cases.calls(cases.TINY)["gated_delta decode"]
    ((_, source),) = msl_check.mlx_sources(fn, *args)
    assert "const constant float* A_log" in source and "const device float* q" in source


GOOD = "out[thread_position_in_grid.x] = 2.0f * inp[thread_position_in_grid.x % 16];"
BAD = {
    "program-scope static without constant": (
        "struct Q { static constexpr int N = 4; };", "out[0] = float(Q::N);",
        "program scope variable must reside in constant address space"),
    "mutable program-scope variable": ("int counter = 0;", "out[0] = float(counter);",
                                       "program scope variable must reside in constant address space"),
    "variable-length array": ("", "int n = int(inp[0]); float a[n]; a[0] = 1.0f; out[0] = a[0];",
                              "array size is not a constant expression"),
    "double": ("", "double d = double(inp[0]); out[0] = float(d);", "requires cl_khr_fp64"),
    "function pointer": ("inline float twice(float x) { return 2.0f * x; }",
                         "float (*f)(float) = twice; out[0] = f(inp[0]);", "pointers to functions are not allowed"),
    "device pointer given a constant buffer": (
        "inline float first(const device float* p) { return p[0]; }", "out[0] = first(inp);",
        "no matching function for call to 'first'"),
}


def test_good_snippet_passes() -> None:
    d = msl_check.check_snippet(GOOD)
    assert d.ok, d.errors


@pytest.mark.parametrize("what", BAD)
def test_bad_snippet_is_rejected(what: str) -> None:
    header, body, message = BAD[what]
    # 4 elements: MLX passes `inp` in the constant address space
    d = msl_check.check_snippet(body, header, n_in=4 if "constant buffer" in what else 16)
    assert not d.ok and message in d.errors, d.errors


def test_implicit_float_to_bfloat_is_rejected() -> None:
    """MLX >= 0.30 uses Metal's native bfloat: a float does not convert to it implicitly."""
    assert not msl_check.check_snippet("out[0] = inp[0];", out_dtype=mx.bfloat16).ok
    d = msl_check.check_snippet("out[0] = bfloat16_t(inp[0]);", out_dtype=mx.bfloat16)
    assert d.ok, d.errors
