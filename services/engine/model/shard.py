"""Tensor parallelism inside the model: which slice of each weight a rank holds, and the
collectives that put the partial results back together (Megatron-style).

- column-parallel (q/k/v fused by heads, gate/up): a rank holds a range of output features;
  its output is the matching slice of the full output, nothing is communicated;
- row-parallel (o_proj, down_proj): a rank holds a range of input features and multiplies
  its slice of the activations; the partial sums are all-reduced;
- vocab-parallel embedding: a rank holds a range of vocabulary rows, looks up the ids that
  fall in it (others give zeros) and the rows are all-reduced;
- vocab-parallel LM head: a rank computes the logits of its vocabulary range; rank 0
  gathers them (only rank 0 samples);
- expert-parallel MoE (``expert_parallel``): a rank holds whole experts, a contiguous range of
  E / N of them, and runs only the routed (token, expert) pairs that fall in it; the partial
  outputs are all-reduced like a row-parallel layer's. Attention leaves the hidden states
  replicated on every rank, so every rank routes every token and dispatch needs no
  communication. Shared experts stay column/row-parallel.

Packed (quantized) weights slice in their own layouts (packed.py), so a rank's shard is
bit for bit the matching part of the whole weight quantized at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmesh.engine.quant.linear import Weight
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight, Int4Weight, Int8Weight, W4A8Weight, pack_int4


@dataclass(frozen=True)
class ShardSpec:
    """This process's place in the tensor-parallel group (rank 0 of 1: no parallelism)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    """The torch.distributed process group (None with one rank)."""
    expert_parallel: bool = False
    """Mixture-of-experts layers split whole experts over the ranks (``enable_expert_parallel``)."""

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def range(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's part of ``total`` items split in world_size near-equal
        parts (ceil-sized; the last part may be shorter)."""
        per = -(-total // self.world_size)
        start = min(self.rank * per, total)
        return start, min(start + per, total)

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the experts this rank holds: all of them without expert
        parallelism, else an equal contiguous share."""
        if not (self.parallel and self.expert_parallel):
            return 0, num_experts
        check_experts_divisible(num_experts, self.world_size)
        per = num_experts // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def padded_part(self, total: int) -> int:
        return -(-total // self.world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place (capturable in a CUDA graph on NCCL)."""
        if self.parallel:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Rank 0: the ranks' ``x`` [..., part] concatenated along the last dim and cut to
        ``total``; other ranks: their own ``x`` (they do not use it)."""
        if not self.parallel:
            return x
        per = self.padded_part(total)
        if x.shape[-1] < per:  # collectives need equal sizes: pad the short last part
            x = F.pad(x, (0, per - x.shape[-1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        torch.distributed.gather(x, parts, dst=0, group=self.group)
        if self.rank != 0:
            return x
        return torch.cat(parts, dim=-1)[..., :total]


def check_divisible(what: str, count: int, world_size: int) -> None:
    if count % world_size:
        raise ValueError(f"tensor parallelism: {what} ({count}) must be divisible by tensor_parallel_size "
                         f"({world_size})")


def check_experts_divisible(num_experts: int, world_size: int) -> None:
    if num_experts % world_size:
        raise ValueError(f"enable_expert_parallel: num_experts ({num_experts}) must be divisible by "
                         f"tensor_parallel_size ({world_size}); every rank holds an equal share of whole experts")


def check_shardable(cfg, world_size: int, expert_parallel: bool = False) -> None:
    """What the model itself refuses to split, raised as ModelLoadError (the model checks the
    same again; the engine core asks first, before any worker loads a byte)."""
    from llmesh.engine.errors import ModelLoadError

    if cfg.num_experts and not expert_parallel:
        # Slicing every expert's FFN dim would leave tiny per-rank GEMMs; whole experts per
        # rank (expert parallelism) is the supported split.
        raise ModelLoadError(f"{cfg.architecture}: mixture-of-experts layers split over ranks only by expert "
                             "parallelism; set enable_expert_parallel (or serve with tensor_parallel_size 1)")
    try:
        # KV heads are split, never replicated: every rank's pool holds distinct heads.
        check_divisible("num_attention_heads", cfg.num_attention_heads, world_size)
        check_divisible("num_key_value_heads", cfg.num_key_value_heads, world_size)
        if any(not cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)):
            check_divisible("intermediate_size", cfg.intermediate_size, world_size)
        if cfg.num_experts:
            check_experts_divisible(cfg.num_experts, world_size)
            check_divisible("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, world_size)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own size: a slice of a whole checkpoint tensor (already on the
    device, in the model dtype) would otherwise keep the whole tensor alive."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        t = t.clone()
    return t


def slice_out_features(w: Weight, start: int, end: int) -> Weight:
    """Output features [start, end) of a weight (nn.Linear rows; packed weights' N columns)."""
    if isinstance(w, torch.Tensor):
        return w[start:end]
    if isinstance(w, Fp8Weight):
        return w.map_tensors(lambda t: t[start:end])
    if isinstance(w, Fp8BlockWeight):
        bn = w.block[0]
        _check_group_cut(f"{w.format} (block-scaled)", start, end, w.out_features, bn, "output")
        return Fp8BlockWeight(w.qweight[start:end], w.scales[start // bn: -(-end // bn)], w.block, w.format)
    if isinstance(w, W4A8Weight):
        w._check_readable()
        return W4A8Weight(w.qweight[start:end], w.group_scales[:, start:end], w.scales[start:end], w.group_size,
                          w.in_features)
    if isinstance(w, Int4Weight) and w.perm is not None:
        return w.map_tensors(lambda t: t if t is w.perm else t[:, start:end])
    return w.map_tensors(lambda t: t[:, start:end])


def _unpack_int4(w: Int4Weight) -> torch.Tensor:
    """The codes q [K, N] of an Int4Weight (its two nibble halves put back in order)."""
    # qweight: [Kp/2, N]: low nibbles rows 0..Kp/2, high nibbles rows Kp/2..Kp
    return torch.cat([w.qweight & 0xF, w.qweight >> 4], dim=0)[: w.in_features]


def slice_in_features(w: Weight, start: int, end: int) -> Weight:
    """Input features [start, end) of a weight (a row-parallel shard). Grouped formats need
    the cut on a group boundary; act-order INT4 cannot be cut at all."""
    if isinstance(w, torch.Tensor):
        return w[:, start:end]
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.qweight[:, start:end], w.scales, w.format)
    if isinstance(w, Fp8BlockWeight):
        bk = w.block[1]
        _check_group_cut(f"{w.format} (block-scaled)", start, end, w.in_features, bk)
        return Fp8BlockWeight(w.qweight[:, start:end], w.scales[:, start // bk: -(-end // bk)], w.block, w.format)
    k = w.in_features
    if isinstance(w, W4A8Weight):  # the row scale holds for every slice of K
        w._check_readable()
        g = w.group_size
        _check_group_cut(w.format, start, end, k, g)
        stop = w.padded_in_features if end == k else end  # the last shard keeps the padding
        return W4A8Weight(w.qweight[:, start // 2:stop // 2], w.group_scales[start // g:stop // g], w.scales, g,
                          end - start)
    if isinstance(w, Int8Weight):
        if w.group_size == k:  # per channel: the one scale row holds for every slice of K
            return Int8Weight(w.qweight[start:end], w.scales, end - start, w.format)
        _check_group_cut(w.format, start, end, k, w.group_size)
        g = w.group_size
        return Int8Weight(w.qweight[start:end], w.scales[start // g: -(-end // g)], g, w.format)
    if w.perm is not None:
        raise ValueError(f"a {w.format} weight with act-order (desc_act) cannot be split along its input "
                         "features for tensor parallelism; use a checkpoint without act-order")
    g = w.group_size
    _check_group_cut(w.format, start, end, k, g)
    q = _unpack_int4(w)[start:end]
    groups = slice(start // g, -(-end // g))
    return pack_int4(q, w.scales[groups], w.mins[groups], g, fmt=w.format)


def _check_group_cut(fmt: str, start: int, end: int, k: int, group: int, features: str = "input") -> None:
    if start % group or (end % group and end != k):
        raise ValueError(f"a {fmt} weight of {k} {features} features in groups of {group} cannot be split at "
                         f"[{start}, {end}) for tensor parallelism: a shard boundary must be a group boundary "
                         f"(tensor_parallel_size must divide the {features} features into whole groups)")
