"""PyTorch's grouped GEMM (torch._grouped_mm, CUTLASS on sm90) for the MoE layer at prefill
sizes, against llmesh/kernels/fused_moe.py, Qwen3-30B-A3B's shape: whether a library kernel should
take the prefill GEMMs (docs/moe.md). Per token count: the fused layer, a layer built on
grouped_mm (sort, gather, two grouped GEMMs, SiLU-mul, weighting, index_add), and the two
grouped GEMMs alone. CUDA-graph timing where the call can be captured, else eager.
Writes bench/results/moe_grouped_<dev>.json. Usage: python bench/moe_grouped_probe.py"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceilings import graph_time_ms, time_ms  # noqa: E402
from moe_shapes import QWEN3_30B_A3B as S, experts  # noqa: E402
from moe_steps import routing  # noqa: E402

from llmesh.kernels.fused_moe import fused_moe  # noqa: E402
from llmesh.kernels.fused_moe_ref import fused_moe_ref  # noqa: E402

dev = torch.device("cuda")
gen = torch.Generator(dev).manual_seed(0)
w13, w2 = experts(S, dev, gen)
w13t, w2t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: views, column-major
I = S.inter


CAPTURED = {"ok": True}


def best(fn) -> float:
    try:
        return min(graph_time_ms(fn, dev) for _ in range(2))
    except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly
        CAPTURED["ok"] = False
        print("  (no graph:", type(e).__name__, str(e)[:80], ")")
        torch.cuda.synchronize()
        return min(time_ms(fn, dev) for _ in range(2))


def grouped(x, weights, ids, b13=w13t, b2=w2t):
    T, k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.bincount(flat, minlength=S.experts).cumsum(0).to(torch.int32)
    a = x.index_select(0, tok)
    h = torch._grouped_mm(a, b13, offs=offs)
    g = F.silu(h[:, :I]) * h[:, I:]
    o = torch._grouped_mm(g, b2, offs=offs)
    o = o * weights.flatten().index_select(0, order)[:, None].to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


metrics: dict[str, float] = {}
for t in (512, 1024, 2048, 4096, 8192):
    x = torch.randn(t, S.hidden, generator=gen, device=dev).bfloat16()
    weights, ids = routing(t, S, dev, gen)
    flops = 2 * t * S.top_k * (2 * I * S.hidden + S.hidden * I)
    try:
        got = grouped(x, weights, ids)
        if t == 512:
            ref = fused_moe_ref(x, w13, w2, weights, ids)
            print("max err vs ref", float((got.float() - ref.float()).abs().max()), "ref max", float(ref.abs().max()))
        g_ms = best(lambda: grouped(x, weights, ids))
        # the GEMMs alone (inputs pre-sorted)
        flat = ids.flatten(); order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=S.experts).cumsum(0).to(torch.int32)
        a = x.index_select(0, order // S.top_k)
        g = torch.randn(t * S.top_k, I, device=dev).bfloat16()
        gemm_ms = best(lambda: (torch._grouped_mm(a, w13t, offs=offs), torch._grouped_mm(g, w2t, offs=offs)))
        # row-major weights (a copy laid out [E, K, N])
        b13c, b2c = w13t.contiguous(), w2t.contiguous()
        gemm_c_ms = best(lambda: (torch._grouped_mm(a, b13c, offs=offs), torch._grouped_mm(g, b2c, offs=offs)))
    except Exception as e:  # noqa: BLE001
        print(t, "grouped_mm failed:", type(e).__name__, e)
        metrics["grouped_failed"] = 1.0
        g_ms = gemm_ms = gemm_c_ms = float("nan")
    f_ms = best(lambda: fused_moe(x, w13, w2, weights, ids))
    tf = lambda ms: flops / (ms / 1e3) / 1e12  # noqa: E731
    print(f"T={t:5d} fused_moe {f_ms:.3f} ms ({tf(f_ms):.0f} TF/s) | grouped layer {g_ms:.3f} ms ({tf(g_ms):.0f}) "
          f"| grouped GEMMs only {gemm_ms:.3f} ({tf(gemm_ms):.0f}) | row-major weights {gemm_c_ms:.3f} ({tf(gemm_c_ms):.0f})",
          flush=True)
    metrics.update({f"t{t}_fused_moe_ms": f_ms, f"t{t}_grouped_layer_ms": g_ms, f"t{t}_grouped_gemms_ms": gemm_ms,
                    f"t{t}_grouped_gemms_rowmajor_ms": gemm_c_ms, f"t{t}_fused_moe_tflops": tf(f_ms),
                    f"t{t}_grouped_gemms_tflops": tf(gemm_ms)})
metrics["grouped_graph_capturable"] = float(CAPTURED["ok"])
from llmesh.bench_results import device_tag, write_result  # noqa: E402

print(write_result(f"moe_grouped_{device_tag(dev)}", {"shape": "Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, ffn 768",
                   "dtype": "bfloat16", "timing": "CUDA graph replay where capturable, else eager",
                   "torch": torch.__version__}, metrics))
