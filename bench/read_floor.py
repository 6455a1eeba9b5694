"""How fast can a kernel only *read* the bytes of a decode GEMM's weight? The floor under
llmesh/kernels/w4a16_mma.py (docs/quantization.md).

The fragment-order INT4 kernel's time is set by its loads (bench/w4a16_mma_ablation.py), so
what a kernel doing nothing but reading the same bytes takes, in the same harness, bounds what
any restructuring of its loads can buy. Three read-only kernels (CUDA C++ through NVRTC, the
PTX helpers of llmesh/kernels/cuda/w4a16_mma.cu), each XOR-folding what it reads so nothing is
optimised away:

  grid<U>      grid-stride: every thread U 16-byte ld.global.nc vectors an iteration
  blocked<U>   each block one contiguous range, its threads U coalesced vectors an iteration
  ring<U>      each block one contiguous range, each thread U vectors always in flight (one used,
               the next issued: the INT4 kernel's registers-ahead loads); also launched in the
               INT4 kernel's own grid shapes at M = 1 (a block a strip pair of 512 threads, a
               strip of 256) and one block or two an SM, which says whether its grid or its
               arithmetic keeps it off the floor
  bulk<C,S,W>  each of W warps a contiguous range, lane 0 copying C-byte chunks into a ring of
               S slots with cp.async.bulk on an mbarrier (the INT4 kernel's Hopper path)

over a sweep of grid sizes, at the INT4 kernel's bytes for 4096 x 14336 (codes + scales,
31.2 MB) and at bf16's (117 MB); beside, in the same run: the INT4 kernel at M = 1 (its
table config, plainly launched and with programmatic dependent launch), bf16 F.linear and a
device-to-device copy. Timing: quant_common.graph_ms, one CUDA graph over a ring of 8 buffers
(> 3x L2), as bench/quant_gemm.py times the GEMMs.

Output: bench/results/read_floor_<dev>.json: ``read_<variant>_<bytes>_us`` per variant,
``read_best_<bytes>_us`` / ``_tb_s``, ``mma_m1_us``, ``mma_m1_pdl_us``, ``bf16_m1_us``,
``copy_<bytes>_us``, and ``mma_m1_vs_read_floor`` (the kernel's time over the best read).
Usage (GPU, about a minute): python bench/read_floor.py [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_common import graph_ms, seeded_weight  # noqa: E402

from llmesh.bench_results import device_tag, write_result  # noqa: E402
from llmesh.kernels import cuda_rtc  # noqa: E402
from llmesh.kernels.common import pdl_off  # noqa: E402

KERNELS = r'''
__device__ __forceinline__ u32 fold(u32x4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

template <int U>
__global__ void read_grid(const u32x4* __restrict__ src, long long n16, u32* out) {
  u32 acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x * U;
  for (long long i = (long long)blockIdx.x * blockDim.x * U + threadIdx.x; i < n16; i += stride) {
    u32x4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long j = i + (long long)u * blockDim.x;
      v[u] = j < n16 ? ldg_stream(src + j) : u32x4{0u, 0u, 0u, 0u};
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= fold(v[u]);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // never in practice: keeps the loads
}

template <int U>
__global__ void read_blocked(const u32x4* __restrict__ src, long long n16, u32* out) {
  const long long tile = (long long)blockDim.x * U;
  const long long per = (n16 + gridDim.x - 1) / gridDim.x;
  const long long lo = (long long)blockIdx.x * per, hi = min(n16, lo + per);
  u32 acc = 0;
  for (long long i = lo + threadIdx.x; i < hi; i += tile) {
    u32x4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long j = i + (long long)u * blockDim.x;
      v[u] = j < hi ? ldg_stream(src + j) : u32x4{0u, 0u, 0u, 0u};
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= fold(v[u]);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

template <int U>
__global__ void read_ring(const u32x4* __restrict__ src, long long n16, u32* out) {
  const long long per = (n16 + gridDim.x - 1) / gridDim.x;
  const long long lo = (long long)blockIdx.x * per, hi = min(n16, lo + per);
  const long long steps = (hi - lo + blockDim.x - 1) / blockDim.x;
  u32x4 v[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long j = lo + threadIdx.x + (long long)u * blockDim.x;
    v[u] = j < hi ? ldg_stream(src + j) : u32x4{0u, 0u, 0u, 0u};
  }
  u32 acc = 0;
  for (long long s = 0; s < steps; s += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc ^= fold(v[u]);
      const long long j = lo + threadIdx.x + (s + u + U) * blockDim.x;
      v[u] = j < hi ? ldg_stream(src + j) : u32x4{0u, 0u, 0u, 0u};
    }
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

template <int CHUNK, int STAGES, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) read_bulk(const unsigned char* __restrict__ src, long long bytes,
                                                        u32* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(8) unsigned long long bars[WARPS * STAGES];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long chunks = bytes / CHUNK, warps = (long long)gridDim.x * WARPS;
  const long long gw = (long long)blockIdx.x * WARPS + warp;
  const long long c0 = chunks * gw / warps, c1 = chunks * (gw + 1) / warps;
  const int count = (int)(c1 - c0);
  const u32 bar0 = smem_addr(bars) + warp * STAGES * 8;
  const u32 ring0 = smem_addr(smem) + warp * STAGES * CHUNK;
  if (lane == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(bar0 + s * 8);
    fence_mbar_init();
  }
  __syncwarp();
  if (lane == 0)
    for (int c = 0; c < STAGES - 1 && c < count; ++c)
      bulk_copy(ring0 + c * CHUNK, src + (c0 + c) * CHUNK, CHUNK, bar0 + c * 8);
  u32 acc = 0;
  for (int c = 0; c < count; ++c) {
    const int slot = c % STAGES;
    mbar_wait(bar0 + slot * 8, (c / STAGES) & 1);
    __syncwarp();  // every lane is done with the slot chunk c - 1 used: refill it
    const int nc = c + STAGES - 1;
    if (lane == 0 && nc < count)
      bulk_copy(ring0 + (nc % STAGES) * CHUNK, src + (c0 + nc) * CHUNK, CHUNK, bar0 + (nc % STAGES) * 8);
#pragma unroll
    for (int i = 0; i < CHUNK / 512; ++i) acc ^= fold(lds128(ring0 + slot * CHUNK + i * 512 + lane * 16));
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
'''


def source() -> str:
    """The PTX helpers of the INT4 kernel's source (everything before its kernel), then ours."""
    text = cuda_rtc.source("w4a16_mma.cu")
    head = text.split("\n// codes:", 1)[0]
    for helper in ("smem_addr", "bulk_copy", "mbar_wait", "lds128", "ldg_stream", "struct alignas(16) u32x4"):
        if helper not in head:
            raise SystemExit(f"llmesh/kernels/cuda/w4a16_mma.cu changed: {helper} is no longer before its kernel")
    return head + KERNELS


def variants(sms: int, strips: int = 14336 // 64) -> list[tuple[str, str, int, int, int]]:
    """(tag, template instance, blocks, threads, dynamic shared memory); ``strips``: the INT4
    kernel's 64-column strips at this shape, for the ring variants in its grid shapes."""
    out = []
    shapes = ((strips // 2, 512), (strips, 256), (sms, 512), (2 * sms, 256))  # its grids, then one / two an SM
    for u in (4, 8):
        for blocks, threads in shapes:
            out.append((f"ring{u}_t{threads}_n{blocks}", f"read_ring<{u}>", blocks, threads, 0))
    for u in (4, 8):
        for threads in (256, 512):
            for per_sm in (1, 2, 4, 8):
                out.append((f"grid{u}_t{threads}_b{per_sm}x", f"read_grid<{u}>", per_sm * sms, threads, 0))
    for u in (4, 8):
        for per_sm in (2, 4, 8):
            out.append((f"blocked{u}_t256_b{per_sm}x", f"read_blocked<{u}>", per_sm * sms, 256, 0))
    for chunk, stages, warps in ((4096, 2, 8), (4096, 4, 8), (8192, 2, 8), (8192, 3, 8), (4096, 4, 4), (16384, 3, 4)):
        smem = chunk * stages * warps
        for per_sm in (1, 2):
            if smem * per_sm <= 200 * 1024:
                out.append((f"bulk{chunk}_s{stages}_w{warps}_b{per_sm}x", f"read_bulk<{chunk}, {stages}, {warps}>",
                            per_sm * sms, warps * 32, smem))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("read floor: needs a GPU")
    from llmesh.engine.quant import mma_weights
    from llmesh.engine.quant.linear import linear
    from llmesh.engine.quant.quantize import quantize_int4

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    k, n = 4096, 14336
    w = seeded_weight(n, k, dev)
    q = quantize_int4(w)
    mma_weights.layout(q)
    int4_bytes = mma_weights.copy_bytes(q)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    metrics: dict[str, float] = {}
    qs = [q.map_tensors(torch.clone) for _ in range(8)]
    for qc in qs:
        mma_weights.layout(qc)
    metrics["mma_m1_pdl_us"] = graph_ms([lambda qc=qc: linear(x, qc) for qc in qs]) * 1e3
    with pdl_off():
        metrics["mma_m1_us"] = graph_ms([lambda qc=qc: linear(x, qc) for qc in qs]) * 1e3
    metrics["bf16_m1_us"] = graph_ms([lambda wc=wc: torch.nn.functional.linear(x, wc)
                                      for wc in [w.clone() for _ in range(3)]]) * 1e3
    del qs
    print(f"INT4 kernel at M = 1: {metrics['mma_m1_us']:.2f} us plain, {metrics['mma_m1_pdl_us']:.2f} us with PDL "
          f"({int4_bytes / 1e6:.1f} MB); bf16 F.linear {metrics['bf16_m1_us']:.2f} us", flush=True)

    text = source()
    sink = torch.zeros(1, dtype=torch.int32, device=dev)
    for label, nbytes in (("int4", int4_bytes), ("bf16", n * k * 2)):
        nbytes -= nbytes % 16384
        bufs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev) for _ in range(8 if label == "int4" else 3)]
        dst = torch.empty_like(bufs[0])
        metrics[f"copy_{label}_us"] = graph_ms([lambda b=b: dst.copy_(b) for b in bufs]) * 1e3
        best = None
        for tag, name, blocks, threads, smem in variants(sms, n // 64):
            kern = cuda_rtc.load_source(text, name, dev)
            size = nbytes if name.startswith("read_bulk") else nbytes // 16
            us = graph_ms([lambda b=b: kern.launch((blocks, 1, 1), threads, smem, [b, ctypes.c_longlong(size), sink])
                           for b in bufs]) * 1e3
            metrics[f"read_{tag}_{label}_us"] = us
            if best is None or us < best[0]:
                best = (us, tag)
            print(f"  {label} {nbytes / 1e6:6.1f} MB  {tag:<26} {us:7.2f} us  {nbytes / us / 1e6:.2f} TB/s", flush=True)
        metrics[f"read_best_{label}_us"], metrics[f"read_best_{label}_tb_s"] = best[0], nbytes / best[0] / 1e6
        print(f"{label}: best read {best[0]:.2f} us ({best[1]}), {nbytes / best[0] / 1e6:.2f} TB/s; copy "
              f"{metrics[f'copy_{label}_us']:.2f} us", flush=True)
        del bufs, dst
    metrics["mma_m1_vs_read_floor"] = metrics["mma_m1_us"] / metrics["read_best_int4_us"]
    metrics["mma_m1_pdl_vs_read_floor"] = metrics["mma_m1_pdl_us"] / metrics["read_best_int4_us"]
    metrics["bf16_m1_vs_read_floor"] = metrics["bf16_m1_us"] / metrics["read_best_bf16_us"]
    metrics["read_floor_int4_speedup_x"] = metrics["bf16_m1_us"] / metrics["read_best_int4_us"]
    workload = {"shape_kxn": [k, n], "int4_bytes": int4_bytes, "bf16_bytes": n * k * 2, "sms": sms,
                "variants": [v[0] for v in variants(sms, n // 64)],
                "timing": "CUDA graph over a ring of 8 buffers (bf16: 3), quant_common.graph_ms",
                "mma": "quant.linear's dispatch at M = 1 (the committed table), plain and with PDL"}
    path = write_result(f"read_floor_{device_tag(dev)}", workload, metrics,
                        results_dir=Path(args.results_dir) if args.results_dir else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
