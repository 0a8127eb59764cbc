"""The hand-written CPU kernel (csrc/int4_vnni.c), compiled with the system C compiler on
first use, cached under $SUBSPEC_HOME/kernels, and called through ctypes.

Without a C compiler, on a CPU without AVX512-VNNI, or with SUBSPEC_NATIVE=0, `int4_vnni()`
returns None and substitutes run torch's int4 kernel instead.
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int4_vnni.c"
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp",
         "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")  # fmt: skip


@functools.cache
def int4_vnni() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot run here (see the module docstring)."""
    if os.environ.get("SUBSPEC_NATIVE", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found: substitutes use torch's int4 kernel")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("could not build the int4 VNNI kernel (%s): using torch's int4 kernel", exc)
        return None
    if not lib.subspec_int4_vnni_supported():
        return None
    lib.subspec_int4_vnni_matmul.restype = ctypes.c_int
    lib.subspec_int4_vnni_matmul.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    )
    return lib


def _build(compiler: str) -> Path:
    """Compile SOURCE into a shared library named by a hash of the source, flags and compiler;
    written to a temporary name and renamed, so a half-built file is never loaded."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"int4_vnni-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, durable=False) as tmp:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    return target


def int4_vnni_matmul(
    x: torch.Tensor, qdata: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] float32 @ W.T -> [M, N] float32, W packed as csrc/int4_vnni.c describes:
    qdata [N, K / 2] uint8, scales_and_zeros [K / group_size, N, 2] bf16."""
    lib = int4_vnni()
    m, k = x.shape
    n = qdata.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)  # [M, N]
    rc = lib.subspec_int4_vnni_matmul(
        x.data_ptr(), qdata.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(),
        m, n, k, group_size, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"int4 VNNI kernel failed ({rc}) for x {tuple(x.shape)}, W [{n}, {k}]")
    return y
