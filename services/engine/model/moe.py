"""The sparse mixture-of-experts block a decoder layer runs instead of its dense MLP.

    router_logits = x @ gate^T                       [T, E]
    p = softmax(router_logits) (float32), top-k      [T, k] weights and expert ids
    (renormalised to sum 1 when norm_topk_prob; Mixtral always)
    y = sum_j p_j * SwiGLU_{e_j}(x)  (+ sigmoid(x @ g_s^T) * SwiGLU_shared(x), Qwen2-MoE)

Routing is computed here, once for both op tables; the experts run through the table's
``moe`` op (torch: a per-expert loop in HF's order; triton: the fused grouped GEMMs of
llmesh/kernels/fused_moe.py).

Checkpoints store one tensor per expert and projection (HF: ``experts.{e}.gate_proj`` /
``w1``...) or one stacked tensor per projection (GGUF's ``ffn_gate_exps``, named
``experts.gate_proj`` by the GGUF loader); both fill stacked weights w13 [E, 2I, H] (gate rows,
then up rows) and w2 [E, H, I]. With ``linear_method`` int8 each expert is quantized as it
arrives (per output channel, so part by part equals the whole), likewise FP8 E4M3 with
``fp8`` (whose experts also take an FP8 checkpoint's codes and scales as stored, per row or per
block), and INT4 in groups of 128 input channels with ``int4`` (each output column its own
groups: gate and up may arrive apart); other quantized methods keep the experts in the model
dtype.

Each block counts the tokens routed to each expert in a device tensor (no host read per
layer); the engine reads all counts at most once per stats interval (``expert_token_counts``).

Expert parallelism (a ``shard`` with ``expert_parallel``, model/shard.py): the block holds
only experts [expert_start, expert_end) — only those are loaded — and routes every token with
the whole (replicated) router. Global ids outside its range become -1 (the ``moe`` op skips
those pairs, llmesh/kernels/fused_moe.py), local ones are shifted to start at 0; the output is this
rank's partial sum, which the decoder all-reduces. Counting happens on the global ids before
the mapping, so every rank's counts cover all experts once (rank 0's are the ones read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.shard import ShardSpec
from llmesh.engine.model.weights import FusedLinear, weight_nbytes
from llmesh.engine.quant.linear import Weight
from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight

_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
"""Checkpoint projection names (Qwen / Mixtral) → part of the stacked weights."""

_NAME_RE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.(?P<rest>"
    r"gate\.weight|shared_expert_gate\.weight|shared_expert\.(?:gate|up|down)_proj\.weight"
    r"|experts\.(?:(?P<expert>\d+)\.)?(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight)$")


def moe_tensor_name(name: str) -> tuple[int, str, int | None, str | None] | None:
    """(layer, what, expert, part) of an MoE checkpoint tensor, or None for other tensors.
    what: "router", "shared_gate", "shared.gate_proj"..., or "experts" (expert None: stacked)."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    rest = m["rest"]
    if m["proj"] is not None:
        expert = int(m["expert"]) if m["expert"] is not None else None
        return int(m["layer"]), "experts", expert, _EXPERT_PARTS[m["proj"]]
    if rest == "gate.weight":
        return int(m["layer"]), "router", None, None
    if rest == "shared_expert_gate.weight":
        return int(m["layer"]), "shared_gate", None, None
    return int(m["layer"]), "shared." + rest.split(".")[1], None, None


def quantize_experts_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8 of stacked experts (quant/quantize.py's rule per
    expert): w [E, N, K] → (codes int8 [E, N, K], scales float32 [E, N]), w ≈ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-10)  # [E, N]
    q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""


def quantize_experts_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8 E4M3 of stacked experts: w [E, N, K] → (float8_e4m3fn [E, N, K],
    scales float32 [E, N]), w ≈ q * scale, each row's largest weight mapped to 448."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-10)  # [E, N]
    q = (w / scales[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


def quantize_experts_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise INT4 with zero points of stacked experts, quantize_int4's rule per expert:
    w [E, N, K] → (codes uint8 [E, Kp / 2, N] in Int4Weight's halves layout, scales and mins
    float16 [E, Kp / 128, N]), w ≈ q * scale + min (llmesh/kernels/fused_moe.py's INT4 layout)."""
    from llmesh.engine.quant.quantize import quantize_int4

    parts = [quantize_int4(one) for one in w]  # [N, K] each, an nn.Linear weight's layout
    return (torch.stack([q.qweight for q in parts]), torch.stack([q.scales for q in parts]),
            torch.stack([q.mins for q in parts]))


EXPERT_QUANTIZERS = {"int8": (torch.int8, quantize_experts_int8), "fp8": (torch.float8_e4m3fn, quantize_experts_fp8),
                     "int4": (torch.uint8, quantize_experts_int4)}
"""linear_method → (stored dtype, quantizer) of the routed experts; other methods keep them float."""


@dataclass
class StackedExperts:
    """The routed experts of one layer (this rank's E of them under expert parallelism): w13
    [E, 2I, H], w2 [E, H, I] in the model dtype, or int8 / float8_e4m3fn codes with per-row
    scales w13_scale [E, 2I], w2_scale [E, H]; or INT4 codes w13 [E, Kp(H) / 2, 2I], w2
    [E, Kp(I) / 2, H] with group scales and mins [E, Kp / 128, N] (``int4`` is then True)."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    w13_min: torch.Tensor | None = None
    w2_min: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    """(BN, BK) of a block-scaled FP8 checkpoint's experts: scales [E, rows / BN, K / BK]."""

    @property
    def int4(self) -> bool:
        return self.w13_min is not None

    def quant_args(self) -> dict:
        """The ``moe`` ops' keyword arguments for these weights' scales (and mins, or blocks)."""
        args = dict(w13_scale=self.w13_scale, w2_scale=self.w2_scale)
        if self.int4:
            args.update(w13_min=self.w13_min, w2_min=self.w2_min)
        if self.block is not None:
            args.update(weight_block=self.block)
        return args

    def use_blocks(self, block: tuple[int, int], k13: int, k2: int) -> None:
        """Switch FP8 experts' per-row scales to ``block`` scales (a block-scaled checkpoint's
        first expert tensor): the scales are small, so they are allocated when the block is known."""
        if self.block == block:
            return
        if self.block is not None or self.w13.dtype != torch.float8_e4m3fn:
            raise ValueError(f"is scaled by {block} blocks; this layer's experts are "
                             + (f"scaled by {self.block} blocks" if self.block else f"{self.w13.dtype}, not FP8"))
        e, bn, bk = self.w13.shape[0], *block

        def scales(rows: int, k: int) -> torch.Tensor:
            return torch.empty(e, -(-rows // bn), -(-k // bk), dtype=torch.float32, device=self.w13.device)

        self.w13_scale, self.w2_scale, self.block = scales(self.w13.shape[1], k13), scales(self.w2.shape[1], k2), block

    def nbytes(self) -> int:
        return sum(weight_nbytes(t) for t in (self.w13, self.w2, self.w13_scale, self.w2_scale, self.w13_min,
                                              self.w2_min))


def _empty_int4_experts(e: int, h: int, i: int, device: torch.device) -> StackedExperts:
    from llmesh.engine.quant.packed import padded_k
    from llmesh.engine.quant.quantize import INT4_GROUP_SIZE as G

    kh, ki = padded_k(h, G), padded_k(i, G)  # gate/up read H, down reads I

    def group_tensor(kp: int, n: int) -> torch.Tensor:
        return torch.empty(e, kp // G, n, dtype=torch.float16, device=device)

    return StackedExperts(w13=torch.empty(e, kh // 2, 2 * i, dtype=torch.uint8, device=device),
                          w2=torch.empty(e, ki // 2, h, dtype=torch.uint8, device=device),
                          w13_scale=group_tensor(kh, 2 * i), w2_scale=group_tensor(ki, h),
                          w13_min=group_tensor(kh, 2 * i), w2_min=group_tensor(ki, h))


@dataclass
class SparseMoeBlock:
    """One layer's router, routed experts and optional gated shared expert."""

    cfg: ModelConfig
    experts: StackedExperts
    expert_tokens: torch.Tensor
    """int64 [E] on the model's device: tokens routed to each expert (the model's counts row)."""
    dtype: torch.dtype
    """The model dtype: the router and the shared gate stay in it when the experts are int8."""
    router: torch.Tensor | None = None  # [E, H]
    shared_gate_up: FusedLinear | None = None
    shared_down: FusedLinear | None = None
    shared_expert_gate: torch.Tensor | None = None  # [1, H]
    expert_start: int = 0
    expert_end: int = 0
    """The global ids [expert_start, expert_end) of the experts held here (all without expert
    parallelism)."""
    _filled: set[tuple[str, int]] = field(default_factory=set)

    @classmethod
    def empty(cls, cfg: ModelConfig, expert_tokens: torch.Tensor, *, linear_method: str, dtype: torch.dtype,
              device: torch.device, shard: ShardSpec | None = None) -> SparseMoeBlock:
        shard = shard or ShardSpec()
        start, end = shard.expert_range(cfg.num_experts)
        e, h, i = end - start, cfg.hidden_size, cfg.moe_intermediate_size
        scaled = linear_method in EXPERT_QUANTIZERS
        wdtype = EXPERT_QUANTIZERS[linear_method][0] if scaled else dtype
        if linear_method == "int4":
            experts = _empty_int4_experts(e, h, i, device)
        else:
            experts = StackedExperts(
                w13=torch.empty(e, 2 * i, h, dtype=wdtype, device=device),
                w2=torch.empty(e, h, i, dtype=wdtype, device=device),
                w13_scale=torch.empty(e, 2 * i, dtype=torch.float32, device=device) if scaled else None,
                w2_scale=torch.empty(e, h, dtype=torch.float32, device=device) if scaled else None)
        block = cls(cfg=cfg, experts=experts, expert_tokens=expert_tokens, dtype=dtype, expert_start=start,
                    expert_end=end)
        si = cfg.shared_expert_intermediate_size
        if si:  # tensor-parallel like a dense MLP: its partial sum joins the routed one's all-reduce
            block.shared_gate_up = FusedLinear(h, [si, si], False, linear_method, dtype=dtype, device=device,
                                               shard=shard, parallel="column")
            block.shared_down = FusedLinear(si, [h], False, linear_method, dtype=dtype, device=device,
                                            shard=shard, parallel="row")
        return block

    @property
    def partial_experts(self) -> bool:
        """Whether other ranks hold some of the experts (expert parallelism)."""
        return self.expert_end - self.expert_start != self.cfg.num_experts

    # ---- loading ------------------------------------------------------------------------
    def load(self, what: str, expert: int | None, part: str | None, t: Weight) -> None:
        """Take one checkpoint tensor (see moe_tensor_name). Raises ValueError when it does
        not fit."""
        c, h = self.cfg, self.cfg.hidden_size
        packed = not isinstance(t, torch.Tensor)
        if packed and what in ("router", "shared_gate") and hasattr(t, "dequantize"):
            # A GGUF kept packed: the router runs in float (a packed weight dequantizes to [K, N]).
            t, packed = t.dequantize().t(), False
        fp8_experts = self.experts.w13.dtype == torch.float8_e4m3fn
        # The shared expert's FusedLinear takes packed weights; FP8 experts take an FP8 checkpoint's.
        if packed and not what.startswith("shared.") and not (
                fp8_experts and isinstance(t, (Fp8Weight, Fp8BlockWeight))):
            raise ValueError(f"is a {type(t).__name__}; experts load from float tensors"
                             + (" or FP8 weights" if fp8_experts else ""))
        if what == "shared_gate" and t.dim() == 1:
            t = t[None]  # GGUF stores the shared-expert gate as a vector [H]
        if what == "router":
            self.router = self._dense(t, (c.num_experts, h))
        elif what == "shared_gate":
            if self.shared_gate_up is None:
                raise ValueError("is a shared-expert gate, and the config has no shared expert")
            self.shared_expert_gate = self._dense(t, (1, h))
        elif what.startswith("shared."):
            if self.shared_gate_up is None:
                raise ValueError("is a shared-expert weight, and the config has no shared expert")
            proj = what.removeprefix("shared.")
            if proj == "down_proj":
                self.shared_down.load(0, "weight", t)
            else:
                self.shared_gate_up.load(0 if proj == "gate_proj" else 1, "weight", t)
        else:
            self._load_expert(part, expert, t)
            return
        self._filled.add((what, -1))

    def _dense(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise ValueError(f"has shape {tuple(t.shape)}, the model expects {shape}")
        return t.to(device=self.expert_tokens.device, dtype=self.dtype)

    def _load_expert(self, part: str, expert: int | None, t: torch.Tensor | Fp8Weight | Fp8BlockWeight) -> None:
        c = self.cfg
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        start, end = self.expert_start, self.expert_end
        rows = slice(0, i) if part == "gate" else slice(i, 2 * i) if part == "up" else slice(0, h)
        one = (i, h) if part != "down" else (h, i)
        if expert is not None and not 0 <= expert < e:
            raise ValueError(f"is expert {expert}, the model has {e} experts")
        shape = (e, *one) if expert is None else one
        stored = isinstance(t, (Fp8Weight, Fp8BlockWeight))
        got = (t.out_features, t.in_features) if stored else tuple(t.shape)
        if got != shape:
            raise ValueError(f"has shape {got}, the model expects {shape}")
        if expert is not None and not start <= expert < end:
            return  # another rank's expert (expert parallelism): never copied to this device
        experts = range(start, end) if expert is None else [expert]
        target, scale = ((self.experts.w2, self.experts.w2_scale) if part == "down"
                         else (self.experts.w13, self.experts.w13_scale))
        sel = slice(0, end - start) if expert is None else slice(expert - start, expert - start + 1)
        if stored:  # one expert of an FP8 checkpoint: its codes and scales as stored
            scale_rows = rows
            if isinstance(t, Fp8BlockWeight):
                bn = t.block[0]
                if i % bn:
                    raise ValueError(f"is scaled by {t.block} blocks; the experts' gate and up rows ({i} each) must "
                                     f"be whole blocks of {bn} rows")
                if self.experts.block is None and any(p in ("gate", "up", "down") for p, _ in self._filled):
                    raise ValueError(f"is scaled by {t.block} blocks; this layer's other experts are scaled per row")
                self.experts.use_blocks(t.block, h, i)
                scale = self.experts.w2_scale if part == "down" else self.experts.w13_scale
                scale_rows = slice(rows.start // bn, -(-rows.stop // bn))
            elif self.experts.block is not None:
                raise ValueError(f"is a per-channel FP8 weight; this layer's experts are scaled by {self.experts.block} "
                                 f"blocks")
            target[sel, rows] = t.qweight.to(target.device)[None]
            scale[sel, scale_rows] = t.scales.to(scale.device)[None]
            self._filled.update((part, x) for x in experts)
            return
        # Only this rank's experts travel to the device (a stacked tensor is cut first).
        stacked = (t[start:end] if expert is None else t[None]).to(self.expert_tokens.device)  # [n, rows, cols]
        if self.experts.int4:  # N is the last dimension of the INT4 layout
            low = self.experts.w2_min if part == "down" else self.experts.w13_min
            target[sel, :, rows], scale[sel, :, rows], low[sel, :, rows] = quantize_experts_int4(stacked)
        elif scale is not None:
            quantize = next(fn for dtype, fn in EXPERT_QUANTIZERS.values() if dtype == target.dtype)
            q, s = quantize(stacked)
            target[sel, rows] = q
            scale[sel, rows] = s
        else:
            target[sel, rows] = stacked.to(target.dtype)
        self._filled.update((part, x) for x in experts)

    def missing(self, layer: int) -> list[str]:
        """Checkpoint names (HF spelling) this block still lacks."""
        mixtral = self.cfg.architecture == "mixtral"
        prefix = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}"
        out = [] if ("router", -1) in self._filled else [f"{prefix}.gate.weight"]
        for part, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            lacking = [x for x in range(self.expert_start, self.expert_end) if (part, x) not in self._filled]
            if lacking:
                out.append(f"{prefix}.experts.{lacking[0]}.{hf if mixtral else part + '_proj'}.weight")
        if self.shared_gate_up is not None:
            if not self.shared_gate_up.loaded:
                out.append(f"{prefix}.shared_expert.gate_proj.weight")
            if not self.shared_down.loaded:
                out.append(f"{prefix}.shared_expert.down_proj.weight")
            if ("shared_gate", -1) not in self._filled:
                out.append(f"{prefix}.shared_expert_gate.weight")
        return out

    def nbytes(self) -> int:
        shared = sum(lin.nbytes() for lin in (self.shared_gate_up, self.shared_down) if lin is not None)
        return (self.experts.nbytes() + weight_nbytes(self.router) + weight_nbytes(self.shared_expert_gate)
                + shared)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, ops, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the attention block's output [T, H], residual as ModelOps.rmsnorm's, norm_weight the
        layer's post-attention norm, counted: int64 [T] 1 for tokens the expert counts include →
        ([T, H] the block's output, with several ranks this rank's partial sum (the caller
        all-reduces it); x + residual)."""
        c = self.cfg
        # Mixtral multiplies the expert outputs by float32 weights; Qwen-MoE rounds them first.
        weights_dtype = torch.float32 if c.architecture == "mixtral" else x.dtype
        x, residual, weights, ids = ops.norm_router(x, residual, norm_weight, eps, self.router,
                                                    c.num_experts_per_tok, c.norm_topk_prob, weights_dtype,
                                                    self.expert_tokens, counted)  # x: normalised [T, H]
        if self.partial_experts:
            # Global → local ids; other ranks' experts → -1, which the moe op skips. No host read.
            local = ids - self.expert_start  # [T, k]
            ids = torch.where((local >= 0) & (local < self.expert_end - self.expert_start), local, -1)
        out = ops.moe(x, self.experts, weights, ids)  # [T, H]: this rank's experts' share
        if self.shared_gate_up is not None:
            shared = ops.act_linear(ops.linear(x, self.shared_gate_up.weight), self.shared_down.weight)  # [T, H]
            gate = torch.sigmoid(ops.linear(x, self.shared_expert_gate))  # [T, 1]
            out = out + gate * shared
        return out, residual
