"""The swapped-operand W4A16 kernel (weight on the dot's left, llmesh/kernels/w4a16_swapped.py) matches
the torch reference of Int4Weight's layout: rows up to 64, K padded, groups of 32-128, K split
across programs (twice on the same arrival counters), float32 and 16-bit activations."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.compile_check import nvidia_backend  # noqa: E402
from llmesh.kernels.quant_ref import w4a16_gemm_ref  # noqa: E402
from llmesh.kernels.quant_gemm_config import GemmConfig  # noqa: E402
from llmesh.kernels.w4a16_swapped import config_str, default_config, parse_config, swap_codes, w4a16_swapped  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}



def _run(w, x, device, **kw):
    return w4a16_swapped(x.to(device), swap_codes(w.qweight).to(device), w.scales.to(device), w.mins.to(device),
                         w.group_size, **kw)


@pytest.mark.parametrize("m,n,k,g,config", [
    (1, 128, 256, 64, None),
    (3, 80, 96, 32, GemmConfig(16, 64, 16, 1, 4, 2)),        # K pads to Kp = 128; masked columns
    (16, 64, 512, 128, GemmConfig(16, 64, 32, 3, 4, 2)),     # split K, a split shorter than the others
    (40, 64, 256, 128, GemmConfig(64, 64, 64, 2, 4, 2)),     # 64-row x tiles, masked rows
    (17, 192, 256, 64, GemmConfig(16, 64, 64, 2, 4, 2)),     # two row tiles, three column tiles
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, m, n, k, g, config, dtype, int4_weight):
    gen = torch.Generator().manual_seed(m * 100 + n + k + g)
    w = int4_weight(k, n, g, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    # W's codes go to the dot exact and its scale and min to the product: the reference keeps W in
    # float32 (the torch backend's rounds W to x's dtype first, about an ulp of W per product)
    ref = w4a16_gemm_ref(x.float(), w.qweight, w.scales, w.mins, g).to(dtype)
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = _run(w, x, device, config=config)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_config_round_trips_and_bad_arguments_are_named(device, int4_weight):
    cfg = GemmConfig(16, 128, 64, 4, 4, 3)
    assert parse_config(config_str(cfg)) == cfg
    with pytest.raises(ValueError, match="six integers"):
        parse_config("16,128")
    d = default_config(1, 14336, 2048, 128)
    assert d.block_m == 16 and d.block_n == 128 and 1 <= d.split_k <= 16
    gen = torch.Generator().manual_seed(0)
    w = int4_weight(128, 64, 64, gen)
    with pytest.raises(ValueError, match="up to 64 rows"):
        _run(w, torch.randn(65, 128), device)
    with pytest.raises(ValueError, match="K=200"):
        _run(w, torch.randn(1, 200), device)
    with pytest.raises(ValueError, match="block_k must divide"):
        _run(w, torch.randn(1, 128), device, config=GemmConfig(16, 64, 48, 1, 4, 2))


@pytest.mark.skipif(not nvidia_backend(), reason="this Triton build has no NVIDIA backend")
def test_sm90_compile_feeds_the_widened_weight_to_wgmma_from_registers(tmp_path):
    """What the kernel is for, checked on the CPU (bench/ttgir_audit.py's case w4a16_swapped, an
    sm90 compile): on Hopper both dots are warp-group MMAs whose left operand, the widened codes,
    is in registers (not read from shared memory), the codes come by the exponent trick's lop3,
    the code tiles are cp.async copies, and the K loop waits on no plain load (the scale and min
    rows are carried a step ahead)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "bench/ttgir_audit.py", "--only", "w4a16_swapped", "--json", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())["w4a16_swapped"]
    assert got["wgmma"] == 2 and got["wgmma_register_lhs"] == 2, got
    assert got["ptx_lop3"] > 0, "the codes were not widened by the lop3 exponent trick"
    assert got["async_copies"] >= 6, got
    assert got["waited_loads"] and got["waited_loads"][0] == [], got["waited_loads"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the measured table dispatches on CUDA only")
def test_the_measured_table_dispatches_to_it(monkeypatch, int4_weight):
    """A table entry ["swapped", [config]] sends the weight's decode rows to this kernel, with the
    transposed codes made once (and counted) by prepare_library_weights; rows past the table's
    largest measured M keep the default path."""
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.engine.quant import swapped_int4
    from llmesh.kernels import quant_gemm_config
    from llmesh.kernels.common import cuda_device_tag

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    w = int4_weight(256, 128, 128, gen).to(device)
    table = {cuda_device_tag(device): {quant_gemm_config.table_key("w4a16", 128, 256, 16):
                                       ["swapped", ["16,64,64,2,4,3"]]}}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: table)
    assert linear_mod.prepare_library_weights([w], device, torch.bfloat16) == 128 * 128
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    got = linear_mod._tuned_matmul(x.to(device), w)
    ref = w4a16_gemm_ref(x.float(), w.qweight.cpu(), w.scales.cpu(), w.mins.cpu(), 128).to(torch.bfloat16)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert swapped_int4.copy_bytes(w) == 128 * 128
    assert linear_mod._tuned_matmul(torch.randn(17, 256, device=device, dtype=torch.bfloat16), w) is None
