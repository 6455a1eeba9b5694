"""One decoder for the Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias), Qwen3
(q/k norm) and SmolLM2 (tied embeddings) differ only in flags of ModelConfig; Mixtral and
Qwen2/3-MoE run a mixture of experts (moe.py) in place of the MLP of their sparse layers.

Tokens of all sequences in a step are flattened into one dimension ``T``; attention
finds each sequence's context through the paged KV pool and its metadata. Every op goes
through an op table (ops.py): the torch table is the reference, the triton table the
fast backend; the weights, their fusion and the order of operations are shared.

Checkpoints load by their Hugging Face names: q/k/v and gate/up tensors are stacked into
one fused weight each as they arrive (``STACKED``), as vLLM's stacked-params mapping does.

With a ``shard`` of several ranks (tensor parallelism, model/shard.py) each rank holds its
heads of q/k/v and its columns of gate/up (column-parallel), the matching input rows of
o_proj and down_proj (row-parallel, all-reduced), its vocabulary range of the embedding and
LM head; loading takes the rank's slice of each checkpoint tensor as it arrives. A sparse
layer under expert parallelism holds whole experts instead (moe.py); its output is
all-reduced like down_proj's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.moe import SparseMoeBlock, moe_tensor_name
from llmesh.engine.model.ops import ModelOps, make_ops
from llmesh.engine.model.prefetch import WeightPrefetcher, prefetch_mode
from llmesh.engine.model.shard import ShardSpec, check_shardable, own_storage, slice_out_features
from llmesh.engine.model.weights import FusedLinear, weight_nbytes
from llmesh.engine.quant.cpu_matmul import cpu_layout
from llmesh.engine.quant.linear import Weight
from llmesh.kernels.paged_attention import AttentionMetadata

STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
"""HF projection → (fused projection, output block)."""

DEFAULT_MAX_POSITIONS = 4096
"""RoPE table rows built up front when the caller gives no bound (the torch table grows)."""


@dataclass
class DecoderLayer:
    qkv_proj: FusedLinear
    o_proj: FusedLinear
    gate_up_proj: FusedLinear | None  # None in a sparse layer: ``moe`` replaces the MLP
    down_proj: FusedLinear | None
    input_layernorm: torch.Tensor | None = None      # [H]
    post_attention_layernorm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None               # [D] (Qwen3)
    k_norm: torch.Tensor | None = None
    moe: SparseMoeBlock | None = None


class LlamaForCausalLM:
    """Built from a weights iterable of (HF name, tensor or packed weight) pairs.

    ``linear_method`` (quant/config.py QuantSpec): none, int8 / int4 / fp8 (decoder linears
    quantized as they load; embeddings and LM head stay in the model dtype, as is usual), or
    keep (every linear and the embeddings store what the checkpoint holds, packed or not).
    ``ops``: the op table, torch or triton. ``max_positions``: the longest sequence served
    (None: grown on demand by the torch table).
    """

    def __init__(self, cfg: ModelConfig, weights: Iterable[tuple[str, Weight]], *, linear_method: str = "none",
                 ops: str = "torch", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_positions: int | None = None, shard: ShardSpec | None = None) -> None:
        self.config = cfg
        self.device, self.dtype, self.linear_method = torch.device(device), dtype, linear_method
        self.shard = shard or ShardSpec()
        tp = self.shard.world_size
        if self.shard.parallel:
            check_shardable(cfg, tp, expert_parallel=self.shard.expert_parallel)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp, cfg.head_dim)
        self.vocab_start, self.vocab_end = self.shard.range(cfg.vocab_size)
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.ops: ModelOps = make_ops(ops, cfg, device=self.device, dtype=dtype,
                                      max_positions=max_positions or min(cfg.max_position_embeddings,
                                                                         DEFAULT_MAX_POSITIONS))
        self.prefetch = WeightPrefetcher(self.device, prefetch_mode(self.device, ops))
        """Weights into L2 during attention in decode graphs (opt-in; model/prefetch.py)."""
        self.expert_tokens = torch.zeros(len(cfg.sparse_layers), cfg.num_experts, dtype=torch.int64,
                                         device=self.device)
        """Tokens routed to each expert of each sparse layer [L_sparse, E], counted on the device."""
        self.layers = [self._new_layer(i) for i in range(cfg.num_hidden_layers)]
        self.embed_tokens: Weight | None = None
        self.norm: torch.Tensor | None = None
        head_method = "keep" if linear_method == "keep" else "none"
        self.lm_head = (None if cfg.tie_word_embeddings else
                        self._linear(cfg.hidden_size, [cfg.vocab_size], False, head_method, "column"))
        self._load(weights)
        if ops == "torch" and self.device.type == "cpu":
            self._cpu_layouts()
        self._layer_kv: tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]] = (None, [])
        """(the KV pool, each layer's (k_cache, v_cache) views of it): the pool lives as long as
        the runner, so its per-layer views are made once, not four indexing ops a layer a step."""

    def _linear(self, k: int, parts: list[int], bias: bool, method: str, parallel: str) -> FusedLinear:
        """A linear of the whole layer's sizes; ``parallel`` (column / row) says how it shards."""
        return FusedLinear(k, parts, bias, method, dtype=self.dtype, device=self.device, shard=self.shard,
                           parallel=parallel)

    def _new_layer(self, i: int) -> DecoderLayer:
        c, m = self.config, self.linear_method
        h, d = c.hidden_size, self.head_dim
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        # HF's Llama/Qwen3 put the bias on o_proj too when attention_bias is set; Qwen2 never does.
        o_bias = c.attention_bias and c.architecture not in ("qwen2", "qwen2_moe")
        layer = DecoderLayer(qkv_proj=self._linear(h, [q, kv, kv], c.attention_bias, m, "column"),
                             o_proj=self._linear(q, [h], o_bias, m, "row"), gate_up_proj=None, down_proj=None)
        if c.is_sparse_layer(i):
            layer.moe = SparseMoeBlock.empty(c, self.expert_tokens[c.sparse_layers.index(i)], linear_method=m,
                                             dtype=self.dtype, device=self.device, shard=self.shard)
        else:
            layer.gate_up_proj = self._linear(h, [c.intermediate_size] * 2, False, m, "column")
            layer.down_proj = self._linear(c.intermediate_size, [h], False, m, "row")
        return layer

    # ---- loading ----------------------------------------------------------------------
    def named_linears(self) -> Iterator[tuple[str, FusedLinear]]:
        for i, layer in enumerate(self.layers):
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                if (lin := getattr(layer, name.split(".")[1])) is not None:
                    yield f"model.layers.{i}.{name}", lin
        if self.lm_head is not None:
            yield "lm_head", self.lm_head

    def linear_weights(self) -> Iterator[object]:
        """Every weight a linear() call multiplies by: the fused projections, the LM head (the
        embedding, when tied) and the MoE shared experts' (routed experts run in the fused MoE kernel)."""
        lins = [lin for _, lin in self.named_linears()]
        for layer in self.layers:
            if layer.moe is not None:
                lins += [lin for lin in (layer.moe.shared_gate_up, layer.moe.shared_down) if lin is not None]
        for lin in lins:
            yield from (lin.weight if isinstance(lin.weight, list) else [lin.weight])
        if self.lm_head is None:
            yield self.embed_tokens

    def _tensor_names(self) -> dict[str, tuple[object, str, int]]:
        """HF name of each plain tensor → (owner, attribute, expected length; 0: the embedding)."""
        c = self.config
        names: dict[str, tuple[object, str, int]] = {"model.embed_tokens.weight": (self, "embed_tokens", 0),
                                                     "model.norm.weight": (self, "norm", c.hidden_size)}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            names[p + "input_layernorm.weight"] = (layer, "input_layernorm", c.hidden_size)
            names[p + "post_attention_layernorm.weight"] = (layer, "post_attention_layernorm", c.hidden_size)
            if c.qk_norm:
                names[p + "self_attn.q_norm.weight"] = (layer, "q_norm", self.head_dim)
                names[p + "self_attn.k_norm.weight"] = (layer, "k_norm", self.head_dim)
        return names

    def _linear_parts(self) -> dict[str, tuple[FusedLinear, int]]:
        """HF prefix of each projection → (the fused linear holding it, output block)."""
        parts: dict[str, tuple[FusedLinear, int]] = {}
        for name, lin in self.named_linears():
            if name == "lm_head":
                parts[name] = (lin, 0)
                continue
            prefix, _, short = name.rpartition(".layers.")[2].partition(".")
            layer_prefix = f"model.layers.{prefix}."
            fused = [hf for hf, (target, _) in STACKED.items() if target == short]
            for hf in fused:
                parts[layer_prefix + hf] = (lin, STACKED[hf][1])
            if not fused:
                parts[layer_prefix + short] = (lin, 0)
        return parts

    @torch.no_grad()
    def _load(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Every tensor must be provided exactly once; errors name the checkpoint tensor."""
        linears, tensors = self._linear_parts(), self._tensor_names()
        seen: set[str] = set()
        for name, t in weights:
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            prefix, _, kind = name.rpartition(".")
            try:
                if prefix in linears:
                    lin, part = linears[prefix]
                    lin.load(part, kind, t)
                elif name in tensors:
                    self._load_tensor(tensors[name], t)
                elif (moe := moe_tensor_name(name)) is not None and self._moe_block(moe[0]) is not None:
                    self._moe_block(moe[0]).load(*moe[1:], t)
                elif "rotary_emb" in name:
                    continue
                else:
                    raise ModelLoadError(
                        f"checkpoint tensor {name!r} has no place in the {self.config.architecture} model")
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name!r} {exc}") from exc
            seen.add(name)
        expected = set(tensors) | {f"{p}.weight" for p in linears}
        expected |= {f"{p}.bias" for p, (lin, _) in linears.items() if lin.has_bias}
        missing = sorted(expected - seen) + [n for i, layer in enumerate(self.layers) if layer.moe is not None
                                             for n in layer.moe.missing(i)]
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _cpu_layouts(self) -> None:
        """Float32 weights in the layout the CPU's GEMMs read fastest (quant/cpu_matmul.py)."""
        for _, lin in self.named_linears():
            if isinstance(lin.weight, torch.Tensor):
                lin.weight = cpu_layout(lin.weight)
        if self.lm_head is None and isinstance(self.embed_tokens, torch.Tensor):
            self.embed_tokens = cpu_layout(self.embed_tokens)  # tied: it is the LM head too

    def _moe_block(self, layer: int) -> SparseMoeBlock | None:
        return self.layers[layer].moe if 0 <= layer < len(self.layers) else None

    def _load_tensor(self, target: tuple[object, str, int], t: Weight) -> None:
        owner, attr, length = target
        c = self.config
        if length == 0:  # the embedding table: dense, or packed (a GGUF's token_embd) kept so
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else (t.out_features, t.in_features)
            if shape != (c.vocab_size, c.hidden_size):
                raise ValueError(f"has shape {shape}, the model expects {(c.vocab_size, c.hidden_size)}")
            if self.shard.parallel:
                t = slice_out_features(t, self.vocab_start, self.vocab_end)
                t = own_storage(t) if isinstance(t, torch.Tensor) else t.map_tensors(own_storage)
            t = t.to(device=self.device, dtype=self.dtype) if isinstance(t, torch.Tensor) else t.to(self.device)
        else:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (length,):
                raise ValueError(f"has shape {tuple(getattr(t, 'shape', ()))}, the model expects {(length,)}")
            t = t.to(device=self.device, dtype=self.dtype)
        setattr(owner, attr, t)

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take as loaded, packed ones at their packed size."""
        norms = [self.norm] + [t for layer in self.layers for t in (
            layer.input_layernorm, layer.post_attention_layernorm, layer.q_norm, layer.k_norm)]
        return (weight_nbytes(self.embed_tokens) + sum(lin.nbytes() for _, lin in self.named_linears())
                + sum(weight_nbytes(t) for t in norms)
                + sum(layer.moe.nbytes() for layer in self.layers if layer.moe is not None))

    # ---- forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, positions: [T]; kv_caches: [L, 2, num_blocks, block_size, H_kv, D] → [T, hidden];
        # kv_scales: [L, 2, num_blocks, block_size, H_kv] uint8 beside an FP8 pool (llmesh/kernels/kv_quant.py)
        ops, eps = self.ops, self.eps
        t, nq, nkv, d = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        ops.prepare(meta)
        x = self._embed(input_ids)  # [T, H]
        residual = None
        # Padding rows of a replayed CUDA graph (slot -1) route too; they are not counted.
        real_tokens = (meta.slot_mapping >= 0).long() if self.expert_tokens.numel() else None  # [T]
        layer_kv = self._kv_views(kv_caches)
        for i, layer in enumerate(self.layers):
            qk_norm = None if layer.q_norm is None else (layer.q_norm, layer.k_norm, eps)
            k_cache, v_cache = layer_kv[i]
            k_scales, v_scales = (None, None) if kv_scales is None else (kv_scales[i, 0], kv_scales[i, 1])
            q, k, v, residual = ops.norm_qkv_rope(x, residual, layer.input_layernorm, eps, layer.qkv_proj.weight,
                                                  layer.qkv_proj.bias, (nq, nkv, d), positions, k_cache, v_cache,
                                                  meta, k_scales, v_scales, qk_norm)  # q, k, v: [T, heads, d]
            mlp = None if layer.gate_up_proj is None else layer.gate_up_proj.weight
            self.prefetch.attention_window(layer.o_proj.weight, mlp, t)  # read after the attention below
            o = ops.attention(q, k, v, k_cache, v_cache, meta, self.scale, k_scales, v_scales)  # [T, nq, d]
            x = self.shard.all_reduce(ops.linear(o.reshape(t, nq * d), layer.o_proj.weight, layer.o_proj.bias))
            if layer.moe is not None:
                x, residual = layer.moe.forward(ops, x, residual, layer.post_attention_layernorm, eps, real_tokens)
                x = self.shard.all_reduce(x)
                continue
            gate_up, residual = ops.norm_linear(x, residual, layer.post_attention_layernorm, eps,
                                                layer.gate_up_proj.weight)  # [T, 2 I]
            x = self.shard.all_reduce(ops.act_linear(gate_up, layer.down_proj.weight))
        out, _ = ops.rmsnorm(x, self.norm, eps, residual)
        self.prefetch.join()
        return out

    __call__ = forward

    def _kv_views(self, kv_caches: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pool, views = self._layer_kv
        if pool is not kv_caches:
            views = [(kv_caches[i, 0], kv_caches[i, 1]) for i in range(kv_caches.shape[0])]
            self._layer_kv = (kv_caches, views)
        return views

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, H]
        if not self.shard.parallel:
            return self.ops.embed(self.embed_tokens, input_ids, self.dtype)
        # Vocab-parallel: ids outside this rank's range look up row 0 and are zeroed; the sum
        # over ranks has each token's row exactly once.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        x = self.ops.embed(self.embed_tokens, local, self.dtype) * mine[:, None].to(self.dtype)
        return self.shard.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] → logits [N, vocab] in the model dtype. Tensor-parallel: every rank
        must call it with the same rows; rank 0 gets the gathered logits, the others their own part.

        Not widened to float32 here: the usual serving batch is all greedy, and its argmax over
        the 16-bit logits is the argmax over their exact float32 copies. That copy was a kernel a
        step writing 4 bytes a logit (48 µs at 128 rows of a 128k vocabulary on the H200,
        kernel_profile_h200_b128_*.json) and the argmax read it back; whoever needs float32
        (sampling, penalties, logprobs) widens what it uses."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        logits = self.ops.linear(hidden, weight)  # [N, vocab part]
        return self.shard.gather_last_dim(logits, self.config.vocab_size)
