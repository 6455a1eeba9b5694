"""Where the fragment-order INT4 kernel's time goes (llmesh/kernels/w4a16_mma.py), by leaving stages out.

METHOD: with no hardware counters, time variants of the kernel that leave one stage out and
compare. The variants are the kernel's own source with one function body replaced, compiled by
NVRTC as the kernel is (their results are wrong by design; only their time is used):

  full          the kernel
  no_mma        the MMAs replaced by an XOR into the accumulator (the widening kept)
  loads_only    no MMA and no widening: the register loads, the x tile and its group sums,
                the scales and the epilogue only
  interleaved   loads_only with the WK warps of a block reading consecutive 512-byte steps
                (warp w: steps w, w + WK, ...) rather than a contiguous run each: DRAM locality
  no_xstage     (M = 16, forms that stage x's whole tile) the kernel without that staging and
                its group sums

at 4096 x 14336 (the issue's headline shape), M = 1, for four register-path block shapes and
the forms the dispatch table picks at M = 1 (bulk copies; x loaded with the codes, split K), and
M = 16 for the forms it picks at 16-64 rows, plus the table's own entry for this device and M
when it has one, against bf16 F.linear and a
device-to-device copy of the same bytes in the same run. For the bulk form ``interleaved`` is
``loads_only`` (its copies are whole runs). Timing as bench/quant_gemm.py: one CUDA graph over a
ring of weight copies (> 3x L2), quant_common.graph_ms.

Output: bench/results/w4a16_mma_ablation_<dev>.json, metrics ``<variant>_<config>_us`` (config as
the table writes it, commas as dashes; ``_m16`` appended at M = 16), ``<variant>_..._tb_s``
(packed bytes / time), ``bf16_us`` (``bf16_m16_us``), ``copy_us``.
Usage (GPU, about a minute): python bench/w4a16_mma_ablation.py [--ms 1,16] [--suffix _x] [--results-dir DIR]
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
from llmesh.kernels.common import arrival_counters  # noqa: E402
from llmesh.kernels.w4a16_mma import (MmaConfig, config_str, pack_codes, pack_scales, parse_config,  # noqa: E402
                                      plan_launch)

MMA = '''  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));'''
NO_MMA = '''  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(b0 ^ b1 ^ a[0]));
  c[0] += f;'''
WIDEN = '''  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(0x000f000fu), "r"(magic));'''
SRC = "const u32x4* src = reinterpret_cast<const u32x4*>(wcodes) + lane;"
PRO, NXT = "src + (size_t)(s * PLANES + p) * 32", "src + (size_t)(nxt * PLANES + p) * 32"  # the loads' steps
CONFIGS = {1: (MmaConfig(1, 8, 4, 1), MmaConfig(1, 8, 8, 1), MmaConfig(1, 16, 4, 1), MmaConfig(1, 4, 4, 1),
               MmaConfig(1, 8, 2, 1, 8), MmaConfig(2, 8, 4, 4, 0, 0, 1), MmaConfig(1, 8, 4, 1, 0, 0, 1)),
           # 16 rows: the bulk-copy and register forms the table picks at 16-64 rows
           16: (MmaConfig(2, 8, 2, 4, 4), MmaConfig(1, 8, 2, 1, 8), MmaConfig(4, 4, 4, 1), MmaConfig(2, 8, 4, 1),
                # x staged a group ahead of the MMAs (xload 2), register and bulk-copy weights
                MmaConfig(2, 8, 4, 1, 0, 0, 2), MmaConfig(2, 8, 2, 1, 4, 0, 2))}
# x's tile staged and its group sums taken (the loops before the K loop): left out by no_xstage
STAGE_LOOP = "for (int i = tid; i < mrows * (kc / 8); i += THREADS) {"
SUM_LOOP = "for (int p = tid; p < (W4A8 ? 0 : mrows * gpb); p += THREADS) {"


def configs(dev: torch.device, n: int, k: int, m: int) -> list[MmaConfig]:
    """CONFIGS[m] and the dispatch table's entry for this shape and M on ``dev`` (when it is ours)."""
    from llmesh.kernels.quant_gemm_config import tuned_choice

    out = list(CONFIGS[m])
    choice = tuned_choice(dev, "w4a16", m, n, k)
    if choice is not None and choice[0] == "mma" and parse_config(str(choice[1][0])) not in out:
        out.append(parse_config(str(choice[1][0])))
    return out


def variants(source: str) -> dict[str, str]:
    for part in (MMA, WIDEN, SRC, PRO, NXT, STAGE_LOOP, SUM_LOOP):
        if part not in source:
            raise SystemExit(f"llmesh/kernels/cuda/w4a16_mma.cu changed: update this script ({part[:40]!r} not found)")
    loads = source.replace(MMA, NO_MMA).replace(WIDEN, "  r = v;")
    strided = (loads.replace(SRC, "const u32x4* src = reinterpret_cast<const u32x4*>(codes + ((size_t)strip * ksteps"
                                  " + kstep0 + wk) * 128) + lane;")
               .replace(PRO, "src + (size_t)(s * PLANES * WK + p) * 32")
               .replace(NXT, "src + (size_t)(nxt * PLANES * WK + p) * 32"))
    unstaged = (source.replace(STAGE_LOOP, STAGE_LOOP.replace("i < mrows", "i < 0 * mrows"))
                .replace(SUM_LOOP, SUM_LOOP.replace(": mrows", ": 0 * mrows")))
    return {"full": source, "no_mma": source.replace(MMA, NO_MMA), "loads_only": loads, "interleaved": strided,
            "no_xstage": unstaged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,16", help="rows of x: 1 and/or 16")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("a CUDA kernel's ablation: needs a GPU")
    from llmesh.engine.quant.quantize import quantize_int4

    dev = torch.device("cuda")
    k, n = 4096, 14336
    ms = [int(v) for v in args.ms.split(",")]
    if set(ms) - set(CONFIGS):
        raise SystemExit(f"--ms: rows from {sorted(CONFIGS)}")
    w = seeded_weight(n, k, dev)
    q = quantize_int4(w)
    packed = (pack_codes(q.codes()), pack_scales(q.scales.half(), q.mins.half()))
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    ring = [tuple(t.clone() for t in packed) for _ in range(8)]
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    metrics = {"copy_us": graph_ms([lambda: dst.copy_(src)]) * 1e3}
    source = cuda_rtc.source("w4a16_mma.cu")
    swept = {}
    for m in ms:
        sfx = "" if m == 1 else f"_m{m}"  # M = 1's names as earlier runs wrote them
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        bf16 = graph_ms([lambda wc=wc: torch.nn.functional.linear(x, wc) for wc in [w.clone() for _ in range(3)]]) * 1e3
        metrics[f"bf16{sfx}_us"] = bf16
        print(f"M = {m}: bf16 F.linear {bf16:.2f} us; copy of {nbytes / 1e6:.1f} MB {metrics['copy_us']:.2f} us")
        swept[m] = configs(dev, n, k, m)
        for name, text in variants(source).items():
            if name == "no_xstage" and m == 1:
                continue  # one row: 8 KB of x a block
            for cfg in swept[m]:
                if name == "no_xstage" and cfg.xload:
                    continue  # nothing staged
                plan = plan_launch(cfg, m, n, 4096, q.group_size)
                kern = cuda_rtc.load_source(text, plan.name, dev)
                part = torch.empty(plan.grid[1], m, n, dtype=torch.float32, device=dev)
                counters = arrival_counters("w4a16_mma_ablation", dev, plan.grid[0])
                # no fused input: null residual, residual_out and norm weight, eps 0; no W4A8 scales
                launch_args = [m, n, k, 4096, k, n, plan.split_steps, *[ctypes.c_void_p(0)] * 3, ctypes.c_float(0.0),
                               *[ctypes.c_void_p(0)] * 2]
                fns = [lambda c=c, s=s: kern.launch(plan.grid, plan.threads, plan.smem,
                                                    [c, s, x, out, part, counters, *launch_args])
                       for c, s in ring]
                us = graph_ms(fns) * 1e3
                tag = f"{name}_{config_str(cfg).replace(',', '-')}{sfx}"
                metrics[f"{tag}_us"], metrics[f"{tag}_tb_s"] = us, nbytes / (us * 1e-6) / 1e12
                print(f"M={m:<3} {name:12} {config_str(cfg):<16} {us:6.2f} us  "
                      f"{bf16 / us:.2f}x bf16  {metrics[f'{tag}_tb_s']:.2f} TB/s", flush=True)
    workload = {"shape_kxn": [k, n], "ms": ms, "group": q.group_size, "packed_bytes": nbytes,
                "configs": {m: [config_str(c) for c in cs] for m, cs in swept.items()},
                "variants": list(variants(source)),
                "timing": "CUDA graph over 8 weight copies (> 3x L2), quant_common.graph_ms; bf16 over 3 copies"}
    path = write_result(f"w4a16_mma_ablation_{device_tag(dev)}{args.suffix}", workload, metrics,
                        results_dir=Path(args.results_dir) if args.results_dir else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
