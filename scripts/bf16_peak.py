"""The machine's bf16 dot-product peak, and the exact kernel's share of it on a pass's shapes.

    .venv/bin/python scripts/bf16_peak.py [--rows 33] [--threads 2]

The peak: `vdpbf16ps` (the instruction the exact kernel's AVX512_BF16 path multiplies with;
64 flops on a 512-bit register) on 24 independent accumulators per thread, from registers
only, for about half a second on each thread at once. Then `exact_linear` on the 1.5B's
linear shapes at --rows rows (a verification pass's tree), with the flops it does, its time
and its share of that peak, the residual rebuild of each weight (bytes written per second),
and the fused kernel that rebuilds the weight block by block inside the matmul (its time
against rebuild + matmul). Needs a C compiler and an AVX512_BF16 CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PEAK_C = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define ACC 24  // independent accumulators: more than latency x throughput on any core here

// Runs `iters` rounds of ACC independent vdpbf16ps on each of `threads` threads; returns the
// flops done (2 per bf16 pair) and leaves the wall time to the caller.
__attribute__((target("avx512f,avx512bf16")))
double peak(int64_t iters, int threads) {
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m512 acc[ACC];
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();
        const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0
        const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3c00);  // 2^-7
        for (int64_t n = 0; n < iters; n++)
            for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        for (int i = 0; i < ACC; i++) sink += _mm512_reduce_add_ps(acc[i]);
    }
    return (double)iters * ACC * 64 * threads + 0.0 * sink;
}
"""

LINEARS = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536),
           "down": (1536, 8960)}  # fmt: skip  # the 1.5B's: [out, in]


def compile_peak() -> ctypes.CDLL:
    work = Path(tempfile.mkdtemp(prefix="bf16-peak-"))
    (work / "peak.c").write_text(PEAK_C)
    so = work / "peak.so"
    subprocess.run(["cc", "-O3", "-fopenmp", "-shared", "-fPIC", "-o", str(so),
                    str(work / "peak.c")], check=True)  # fmt: skip
    lib = ctypes.CDLL(str(so))
    lib.peak.restype = ctypes.c_double
    lib.peak.argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib


def peak_flops(lib, threads: int) -> float:
    iters = 1 << 20
    lib.peak(iters, threads)  # warm-up, and the clock up
    while True:
        t0 = time.perf_counter()
        flops = lib.peak(iters, threads)
        elapsed = time.perf_counter() - t0
        if elapsed > 0.5:
            return flops / elapsed
        iters *= 2


def median_s(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from subspec.kernels import residual
    from subspec.kernels.exact import exact_linear, exact_residual_linear, has_dpbf16
    from subspec.quant.hqq import quantize_linear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=33)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lib = compile_peak()
    one, both = peak_flops(lib, 1), peak_flops(lib, args.threads)
    print(f"vdpbf16ps peak: {one / 1e9:.1f} GFLOP/s on one core, {both / 1e9:.1f} on "
          f"{args.threads}; exact kernel's path is vdpbf16ps: {has_dpbf16()}")  # fmt: skip
    total_s = total_flops = decode_s = fused_s = 0.0
    print(f"{'linear':>8} {'[out, in]':>12} {'ms':>7} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'rebuild ms':>10} {'GB/s out':>8} {'fused ms':>8}")  # fmt: skip
    for name, (n, k) in LINEARS.items():
        w = (torch.randn(n, k) * 0.02).bfloat16()
        x = torch.randn(args.rows, k).bfloat16()
        s = median_s(lambda w=w, x=x: exact_linear(x, w, None))
        flops = 2.0 * args.rows * n * k
        sub = quantize_linear(w, None, bits=4, group_size=64, optimize=False)
        parts = residual.encode(w, sub)
        out = torch.empty(n * k, dtype=torch.bfloat16)
        d = median_s(lambda parts=parts, sub=sub, out=out: residual.decode(parts, sub, out))
        f = median_s(lambda x=x, parts=parts, sub=sub: exact_residual_linear(x, parts, sub))
        total_s, total_flops, decode_s = total_s + s, total_flops + flops, decode_s + d
        fused_s += f
        print(f"{name:>8} {str([n, k]):>12} {s * 1e3:>7.2f} {flops / s / 1e9:>8.1f} "
              f"{flops / s / both:>8.0%} {d * 1e3:>10.2f} {2 * n * k / d / 1e9:>8.1f} "
              f"{f * 1e3:>8.2f}")  # fmt: skip
    print(f"a layer at {args.rows} rows: matmuls {total_s * 1e3:.1f} ms "
          f"({total_flops / total_s / both:.0%} of peak), rebuild {decode_s * 1e3:.1f} ms; "
          f"at peak the matmuls would take {total_flops / both * 1e3:.1f} ms; fused "
          f"{fused_s * 1e3:.1f} ms against {(total_s + decode_s) * 1e3:.1f} for rebuild + "
          f"matmul ({total_flops / fused_s / both:.0%} of peak)")  # fmt: skip


if __name__ == "__main__":
    main()
