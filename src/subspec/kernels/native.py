"""The hand-written CPU kernels (csrc/*.c), compiled with the system C compiler on first use,
cached under $SUBSPEC_HOME/kernels, and called through ctypes.

- csrc/int4_vnni.c: the substitutes' int4 matmul, and a whole substitute layer in one call
  (draft_layer.py), built for AVX512-VNNI where the CPU has it, else for AVX2 + FMA (the same
  source through csrc/simd16.h). Without a C compiler, on a CPU with neither, or with
  SUBSPEC_NATIVE=0, `int4_vnni()` returns None and substitutes run torch's int4 kernel instead.
- csrc/bf16_exact.c, exact_attention.c: the row-invariant linear and attention of exact.py
  (`bf16_exact()`), with residual_linear.c: the linear over a weight in residual form,
  rebuilt block by block inside the call (residual.py).
- csrc/residual.c: a streamed bf16 weight as the difference from its resident 4-bit substitute
  (kernels/residual.py, `residual()`).
- csrc/hqq.c: data-free HQQ quantization of a weight into the substitutes' values, scales and
  zero points (kernels/hqq.py, `hqq()`); portable C with an AVX-512 path, so it builds on any
  machine with a C compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from subspec.files import atomic_output, cache_root
from subspec.progress import StepLog

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
COMMON_FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp")
# the int4 kernel's builds, best first: each runs where its subspec_int4_vnni_supported() says
INT4_BUILDS = (
    ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    ("-mavx2", "-mfma"),
)
# Baseline x86-64 code: the AVX512_BF16 functions opt in with target attributes, so the portable
# path runs anywhere. No FMA contraction: each product and sum is rounded as the C source says.
EXACT_FLAGS = ("-ffp-contract=off",)
# a library built from more than csrc/<name>.c
SOURCES = {
    "bf16_exact": ("bf16_exact.c", "exact_attention.c", "residual_linear.c", "residual.c"),
    "int4_vnni": ("int4_vnni.c", "draft_attention.c"),
}


_BUILD_ERRORS: dict[str, str] = {}  # kernel -> why its build failed (the compiler's stderr)


def cannot_build(x86_only: bool = True) -> str | None:
    """Why kernels cannot be built on this machine at all (SUBSPEC_NATIVE=0, no C compiler,
    an x86-64 kernel on another CPU), or None: then a kernel that does not load failed to
    build, and build_error says why."""
    if os.environ.get("SUBSPEC_NATIVE", "1") == "0":
        return "SUBSPEC_NATIVE=0"
    if x86_only and platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')})"
    return None


def build_error(name: str) -> str | None:
    """The compiler's message for the kernel `name` when its build failed in this process."""
    return _BUILD_ERRORS.get(name)


def _load(name: str, flags: tuple[str, ...], x86_only: bool = True) -> ctypes.CDLL | None:
    """csrc/<name>.c (or SOURCES[name]) built with `flags` and loaded, or None when it cannot
    be (see cannot_build; a failed build is logged with the compiler's message and kept for
    build_error)."""
    if (reason := cannot_build(x86_only)) is not None:
        if reason.startswith("no C compiler"):
            log.warning("%s: the %s kernel falls back to torch", reason, name)
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    try:
        return ctypes.CDLL(str(_build(compiler, name, (*COMMON_FLAGS, *flags))))
    except subprocess.CalledProcessError as exc:
        message = (exc.stderr or "").strip() or f"{compiler} exited with {exc.returncode}"
    except OSError as exc:
        message = str(exc)
    _BUILD_ERRORS[name] = message
    log.warning("could not build the %s kernel, falling back to torch: %s", name, message)
    return None


@functools.cache
def int4_vnni() -> ctypes.CDLL | None:
    """The loaded int4 kernel library, or None when it cannot run here (see the docstring)."""
    lib = next(
        (lib for flags in INT4_BUILDS
         if (lib := _load("int4_vnni", flags)) is not None and lib.subspec_int4_vnni_supported()),
        None,
    )  # fmt: skip
    if lib is None:
        return None
    _BUILD_ERRORS.pop("int4_vnni", None)  # a narrower build that failed first no longer counts
    lib.subspec_scaled_logsumexp.restype = ctypes.c_int
    lib.subspec_scaled_logsumexp.argtypes = (
        [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 2
        + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    )  # fmt: skip
    lib.subspec_int4_vnni_matmul.restype = ctypes.c_int
    lib.subspec_int4_vnni_matmul.argtypes = (
        [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        + [ctypes.c_int64] * 4 + [ctypes.c_int]
    )  # fmt: skip
    return lib


@functools.cache
def bf16_exact() -> ctypes.CDLL | None:
    """The loaded row-invariant kernel library (csrc/bf16_exact.c and exact_attention.c), or
    None; exact.py declares its functions' signatures."""
    return _load("bf16_exact", EXACT_FLAGS)


@functools.cache
def residual() -> ctypes.CDLL | None:
    """The loaded residual codec library (csrc/residual.c), or None; residual.py declares its
    functions' signatures. Baseline x86-64 code, AVX-512 by target attributes; no FMA
    contraction, so that every machine computes the same substitute values."""
    return _load("residual", EXACT_FLAGS)


@functools.cache
def hqq() -> ctypes.CDLL | None:
    """The loaded HQQ quantizer (csrc/hqq.c), or None; kernels/hqq.py declares its signature.
    No FMA contraction: products and sums round as torch's elementwise ops round them."""
    return _load("hqq", EXACT_FLAGS, x86_only=False)


def _build(compiler: str, name: str, flags: tuple[str, ...]) -> Path:
    """Compile csrc/<name>.c (or SOURCES[name]) into a shared library named by a hash of the
    sources (headers included), flags and compiler; written to a temporary name and renamed,
    so a half-built file is never loaded."""
    paths = [CSRC / f for f in SOURCES.get(name, (f"{name}.c",))]
    headers = sorted(CSRC.glob("*.h"))
    source = b"".join(p.read_bytes() for p in [*paths, *headers])
    key = hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    StepLog()(f"compiling kernels/csrc/{', '.join(p.name for p in paths)}")
    with atomic_output(target, durable=False) as tmp:
        subprocess.run(
            [compiler, *flags, *map(str, paths), "-o", str(tmp), "-lm"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    return target


_FLOATS = (torch.float32, torch.bfloat16)


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes, None for None."""
    return None if t is None else t.data_ptr()


def int4_vnni_matmul(
    x: torch.Tensor, qdata: torch.Tensor, out_features: int, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [M, K] (float32 or bf16, contiguous) @ W.T + bias -> [M, N] in x's dtype, W packed as
    csrc/int4_vnni.c describes (values and bf16 scales in qdata, tile by tile), bias [N] bf16
    or None."""
    lib = int4_vnni()
    m, k = x.shape
    if x.dtype not in _FLOATS or not x.is_contiguous():
        raise ValueError(f"int4 VNNI kernel takes contiguous float32/bf16 x, got {x.dtype}")
    y = torch.empty(m, out_features, dtype=x.dtype)  # [M, N]
    bf16 = int(x.dtype == torch.bfloat16)
    rc = lib.subspec_int4_vnni_matmul(
        x.data_ptr(), bf16, qdata.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), bf16, m, out_features, k, group_size, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(
            f"int4 VNNI kernel failed ({rc}) for x {tuple(x.shape)}, W [{out_features}, {k}]"
        )
    return y


def scaled_logsumexp(x: torch.Tensor, scale: float) -> torch.Tensor:
    """log(sum(exp(scale * x), -1)) -> [rows] fp32, for x [rows, n] fp32 or bf16 on CPU and
    scale > 0: the native kernel where int4_vnni() loads, else torch."""
    lib = int4_vnni()
    if lib is None or x.device.type != "cpu" or x.dtype not in _FLOATS or scale <= 0:
        return torch.logsumexp(x.float() * scale, -1)
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.float32)
    rc = lib.subspec_scaled_logsumexp(x.data_ptr(), int(x.dtype == torch.bfloat16), rows, n,
                                      scale, out.data_ptr(), torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"logsumexp kernel failed ({rc}) for x {tuple(x.shape)}")
    return out
