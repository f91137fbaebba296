"""A Metal-rules syntax check for the kernels in ``metal/``, without a Mac.

The kernel source is the one MLX itself generates: every wrapper in
``mlx_qwenmoe.ops`` is called inside ``mx.export_function`` tracing (where
``mx.fast.metal_kernel`` builds its source without a Metal device) with
``verbose=True``, so signatures, ``constant``/``device`` placement (inputs of
fewer than 8 elements go in ``constant``), shape buffers, template arguments and
thread attributes are exactly MLX's. That source is then checked by clang's
C++-for-OpenCL front end over ``metal_decls.h``, which maps Metal's address
spaces onto OpenCL's; two MSL-only spellings are rewritten first because OpenCL
has no templated kernels:

* ``template <...> [[kernel]] void f(...)`` becomes ``__kernel void f(...)`` with
  the template arguments of MLX's explicit instantiation bound at the top of the
  body (``typedef bfloat16_t T; constexpr int E = 256;``);
* the explicit instantiation line (``template [[host_name(...)]] ...``) is dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import mlx.core as mx

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metal_decls.h")
CLANG = os.environ.get("MSL_CHECK_CLANG", "clang")
CLANG_FLAGS = [
    "-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only",
    # no program-scope globals and no fp64, as in Metal; the generic address space stays on
    # only because clang's C++ for OpenCL needs it to copy class objects (return by value)
    "-Xclang", "-cl-ext=-all,+cl_khr_fp16,+__opencl_c_generic_address_space,+__cl_clang_non_portable_kernel_param_types",
    "-cl-no-stdinc",  # OpenCL's builtins would shadow Metal's (exp, max, ...) ambiguously
    "-include", HEADER,
    "-Wno-unknown-attributes",  # [[buffer(n)]], [[thread_position_in_grid]], ...
    "-ferror-limit=20",
]


class MslCheckError(RuntimeError):
    """clang is missing, or MLX produced no kernel source."""


def clang_available() -> bool:
    return shutil.which(CLANG) is not None


@dataclass
class Diagnosis:
    kernel: str  # the name given to mx.fast.metal_kernel (the file in metal/)
    instance: str  # MLX's name for this instantiation (template and dtype suffixes)
    source: str  # what clang was given
    errors: str  # clang's errors, "" when it accepted the source

    @property
    def ok(self) -> bool:
        return not self.errors


@contextlib.contextmanager
def _stdout_to(path: str) -> Iterator[None]:
    """Redirect file descriptor 1 (MLX prints generated sources from C++) to ``path``."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _verbose_kernels() -> Iterator[None]:
    """Make every kernel built meanwhile print its generated source when called."""
    from mlx_qwenmoe import kernels

    original = mx.fast.metal_kernel

    def factory(*args, **kwargs):
        kern = original(*args, **kwargs)
        return lambda **call: kern(**{**call, "verbose": True})

    kernels.build.cache_clear()
    mx.fast.metal_kernel = factory
    try:
        yield
    finally:
        mx.fast.metal_kernel = original
        kernels.build.cache_clear()


_FENCE = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```\n", re.S)


def mlx_sources(fn: Callable[..., Sequence[mx.array]], *args: mx.array) -> List[Tuple[str, str]]:
    """(kernel name, source) as MLX generates them for each kernel ``fn(*args)`` calls (nothing is run)."""
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "generated.txt")
        with _verbose_kernels(), _stdout_to(log):
            mx.export_function(os.path.join(d, "traced.mlxfn"), lambda *a: list(fn(*a)), *args)
        with open(log) as f:
            sources = _FENCE.findall(f.read())
    if not sources:
        raise MslCheckError(f"{getattr(fn, '__name__', fn)} built no Metal kernel")
    return sources


_INSTANTIATION = re.compile(
    r'^template \[\[host_name\("(\w+)"\)\]\] \[\[kernel\]\] decltype\(\w+<(.*)>\) \w+<.*>;$', re.M
)


def _bindings(params: str, args: str) -> str:
    out = []
    for param, arg in zip(params.split(", "), args.split(", ")):
        kind, name = param.split()
        out.append(f"typedef {arg} {name};" if kind == "typename" else f"constexpr {kind} {name} = {arg};")
    return " ".join(out)


def to_opencl(source: str) -> tuple:
    """(kernel name, the MLX source with its two MSL-only spellings rewritten for clang)."""
    m = re.search(r"(?:template <(.*)>\n)?\[\[kernel\]\] void (\w+)\(", source)
    if m is None:
        raise MslCheckError("no [[kernel]] function in the generated source")
    params, name = m.group(1), m.group(2)
    body = source.index(") {\n", m.end()) + len(") {\n")
    inst = _INSTANTIATION.search(source)
    bind = _bindings(params, inst.group(2)) + "\n" if params else ""
    text = source[: m.start()] + f"__kernel void {name}(" + source[m.end(): body] + bind + source[body:]
    return name, _INSTANTIATION.sub("", text)


def check_source(kernel: str, source: str) -> Diagnosis:
    """Run clang over one MLX-generated kernel source."""
    if not clang_available():
        raise MslCheckError(f"'{CLANG}' not found (Debian: apt-get install clang)")
    name, text = to_opencl(source)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{kernel}.clcpp")
        with open(path, "w") as f:
            f.write(text)
        r = subprocess.run([CLANG, *CLANG_FLAGS, path], capture_output=True, text=True)
    errors = "\n".join(line for line in r.stderr.splitlines() if "error" in line) if r.returncode else ""
    if r.returncode and not errors:
        errors = r.stderr.strip() or f"clang exited with {r.returncode}"
    return Diagnosis(kernel, name, text, errors)


def check_sources(sources: Sequence[Tuple[str, str]], workers: int = 2) -> List[Diagnosis]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda ks: check_source(*ks), sources))


def check_snippet(body: str, header: str = "", n_in: int = 16,
                  in_dtype: mx.Dtype = mx.float32, out_dtype: mx.Dtype = mx.float32) -> Diagnosis:
    """Wrap a kernel body (input ``inp`` of ``n_in`` elements, output ``out``) as MLX does and check it."""

    def call(x: mx.array) -> List[mx.array]:
        kern = mx.fast.metal_kernel(name="snippet", input_names=["inp"], output_names=["out"],
                                    source=body, header=header)
        return kern(inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                    output_shapes=[(32,)], output_dtypes=[out_dtype])

    ((kernel, source),) = mlx_sources(call, mx.zeros((n_in,), in_dtype))
    return check_source(kernel, source)
