"""The skinny GEMM and its fused-prologue kernels on CUDA against their torch references, one
line per case with the largest error relative to max |y| (the tests' measure): a quick look
when tests/kernels/test_skinny_gemm.py or test_fused_skinny.py fail on a GPU.

Usage: python bench/skinny_diag.py  (prints, writes nothing; without CUDA, small shapes through
TRITON_INTERPRET=1 check the script itself)
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmesh.kernels.fused_skinny import rmsnorm_linear, rmsnorm_linear_ref
from llmesh.kernels.rmsnorm import rmsnorm
from llmesh.kernels.skinny_gemm import skinny_gemm, skinny_gemm_ref
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, default_config


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float().cpu(), ref.float().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def main() -> None:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(torch.cuda.get_device_name() if cuda else "cpu", "fp32 matmul precision", torch.get_float32_matmul_precision(),
          "tf32", torch.backends.cuda.matmul.allow_tf32)
    gen = torch.Generator().manual_seed(0)
    big = ((1, 6144, 4096), (4, 4096, 14336), (16, 6144, 4096)) if cuda else ()
    for m, n, k in (*big, (3, 40, 200)):
        x = torch.randn(m, k, generator=gen).bfloat16()
        w = (torch.randn(n, k, generator=gen) * 0.5).bfloat16()
        ref = skinny_gemm_ref(x, w)
        for cfg in (default_config(m, n, k), SkinnyConfig(16, 32, 128, 4, 4, 4, True),
                    SkinnyConfig(1, 8, 512, 2, 4, 2, False), SkinnyConfig(1, 8, 32, 3, 1, 1, False),
                    SkinnyConfig(1, 8, 32, 1, 1, 1, False), SkinnyConfig(16, 32, 16, 4, 1, 1, True),
                    SkinnyConfig(16, 32, 16, 1, 1, 1, True), SkinnyConfig(1, 8, 1024, 1, 4, 1, False)):
            try:
                got = skinny_gemm(x.to(dev), w.to(dev), config=cfg)
                again = skinny_gemm(x.to(dev), w.to(dev), config=cfg)
                print(f"skinny m{m} n{n} k{k} {cfg.short():<28} err {rel(got, ref):.2e} "
                      f"repeat-equal {torch.equal(got, again)} gpu-ref err {rel(got, skinny_gemm_ref(x.to(dev), w.to(dev))):.2e}")
            except Exception as e:  # noqa: BLE001 - a diagnostic: print and go on
                print(f"skinny m{m} n{n} k{k} {cfg.short()} raised {type(e).__name__}: {e}")
    for m, n, k in ((1, 40, 100), (5, 24, 72), *big[:1]):
        x = torch.randn(m, k, generator=gen).bfloat16()
        r = torch.randn(m, k, generator=gen).bfloat16()
        g = (1 + 0.1 * torch.randn(k, generator=gen)).bfloat16()
        w = (torch.randn(n, k, generator=gen) * 0.5).bfloat16()
        ref_y, ref_res = rmsnorm_linear_ref(x, r, g, 1e-5, w)
        h, kres = rmsnorm(x.to(dev), g.to(dev), 1e-5, residual=r.to(dev))
        print(f"rmsnorm kernel m{m} k{k}: residual equal {torch.equal(kres.cpu(), ref_res)}")
        for cfg in (SkinnyConfig(1, 16, 32, 1, 1, 1, False), SkinnyConfig(16, 32, 16, 4, 1, 1, True),
                    default_config(m, n, k)):
            try:
                y, res = rmsnorm_linear(x.to(dev), r.to(dev), g.to(dev), 1e-5, w.to(dev), config=cfg)
                comp = skinny_gemm(h, w.to(dev), config=cfg)
                print(f"rmsnorm_linear m{m} n{n} k{k} {cfg.short():<28} err {rel(y, ref_y):.2e} vs composition "
                      f"{rel(y, comp):.2e} residual-equal {torch.equal(res.cpu(), ref_res)} "
                      f"residual-equal-kernel {torch.equal(res, kres)}")
            except Exception as e:  # noqa: BLE001
                print(f"rmsnorm_linear m{m} {cfg.short()} raised {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
