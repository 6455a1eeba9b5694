"""The engine's L2 prefetch of o_proj weights (services/engine/model/prefetch.py): which tensors it
asks for (the ones the layer's kernel reads), when it is on (opt-in, triton table, sm90+), and on
a GPU that the decode graphs fork and rejoin its side stream with the greedy tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.model.prefetch import PREFETCH_ENV, WeightPrefetcher, prefetch_mode
from llmesh.engine.quant.linear import kernel_operands
from llmesh.engine.quant.quantize import quantize_int4

CPU = torch.device("cpu")


def test_kernel_operands_name_what_the_kernel_reads():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 256, generator=g)
    assert [t is dense for t in kernel_operands(dense, 1, CPU)] == [True]
    packed = quantize_int4(torch.randn(64, 256, generator=g), group_size=128)
    got = kernel_operands(packed, 1, CPU)
    assert [id(t) for t in got] == [id(packed.qweight), id(packed.scales), id(packed.mins)]
    both = kernel_operands([dense, packed], 1, CPU)  # a fused weight kept as parts
    assert len(both) == 4 and both[0] is dense


def test_kernel_operands_follow_the_measured_table(monkeypatch):
    """On a GPU the table's choice decides: the fragment-order copy where it exists, nothing for a
    kernel with a private copy of its own, the weight's own tensors for our other kernels."""
    from llmesh.engine.quant import mma_weights
    from llmesh.kernels import quant_gemm_config

    packed = quantize_int4(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), group_size=128)
    cuda = torch.device("cuda")  # only its type is read: the table lookup is the stand-in below
    own = [id(packed.qweight), id(packed.scales), id(packed.mins)]
    for choice, expected in ((("gemv", (64, 128, 4, 4, 1, True)), own), (("swapped", ("cfg",)), []),
                             (("fbgemm", ("shuffled",)), []), (None, own), (("mma", ("1,8,2,1,8",)), own)):
        monkeypatch.setattr(quant_gemm_config, "tuned_choice", lambda *args, c=choice: c)
        assert [id(t) for t in kernel_operands(packed, 1, cuda)] == expected, choice
    copy = mma_weights.MmaLayout(torch.zeros(4, dtype=torch.int32), torch.zeros(2, dtype=torch.float16), 128)
    packed.__dict__[mma_weights._CACHE] = copy  # the copy prepare_library_weights makes at load
    got = kernel_operands(packed, 1, cuda)
    assert got[0] is copy.codes and got[1] is copy.scales and len(got) == 2


def test_off_unless_asked_for_on_the_triton_table_of_a_hopper_gpu(monkeypatch):
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert prefetch_mode(CPU, "triton") == 0
    monkeypatch.setenv(PREFETCH_ENV, "2")
    assert prefetch_mode(CPU, "triton") == 0  # no CUDA device
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert prefetch_mode(cuda, "torch") == 0
        assert prefetch_mode(cuda, "triton") == (2 if torch.cuda.get_device_capability() >= (9, 0) else 0)
    monkeypatch.setenv(PREFETCH_ENV, "yes")
    with pytest.raises(ValueError, match="LLMESH_L2_PREFETCH='yes': expected one of 0, 1, 2"):
        prefetch_mode(CPU, "triton")
    off = WeightPrefetcher(CPU, 0)
    off.attention_window(torch.zeros(4, 4), torch.zeros(8, 4), 1)  # a no-op: nothing forked, nothing asked
    off.join()
    assert not off.forked and off.bytes_asked == 0


def _generate(path, quantization):
    llm = LLM(path, device="cuda", backend="triton", dtype="bfloat16", quantization=quantization, max_num_seqs=4,
              num_kv_blocks=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = [o.token_ids for o in llm.generate([[5, 6, 7, 8, 9], [10, 11], [12]], params)]
    return tokens, llm.engine.runner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cp.async.bulk.prefetch needs a Hopper (sm90) or later GPU")
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_decode_graphs_prefetch_with_the_same_greedy_tokens(tiny_llama, monkeypatch, quantization):
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    plain, runner = _generate(tiny_llama, quantization)
    assert runner.model.prefetch.mode == 0
    asked = {}
    for mode in ("1", "2"):
        monkeypatch.setenv(PREFETCH_ENV, mode)
        fetched, runner = _generate(tiny_llama, quantization)
        prefetch = runner.model.prefetch
        assert prefetch.mode == int(mode) and runner.stats.decode_graph_steps > 0
        assert prefetch.bytes_asked > 0 and not prefetch.forked  # captured, then joined
        assert fetched == plain
        asked[mode] = prefetch.bytes_asked
    assert asked["2"] > asked["1"]  # the gate/up lead on top of o_proj
