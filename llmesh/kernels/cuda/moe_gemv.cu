// A mixture-of-experts layer at one token in CUDA C++, bf16 experts: the two weight streams of a
// decode step at batch 1 (llmesh/kernels/moe_gemv.py launches them; docs/moe.md the why).
//
// One token routed to k experts reads k gate/up matrices [2I, H] and k down matrices [H, I] once
// each (75 MB a layer at Qwen3-30B-A3B's shape) and does two multiply-adds per weight: a pure
// stream. A warp owns whole weight rows: each lane issues every 16-byte load of its part of the
// warp's rows before it multiplies any (ldg_stream, no L1), so a warp keeps 8-16 KB in flight and
// an SM many warps' worth, with no shared memory, no barriers and no split-K; the 32 lanes' sums
// meet by shuffles.
//
// moe_gemv_up: warp w takes pair p and R gate rows n.. with their up rows I + n..: silu(gate) * up
//   into hidden [k, I], rounded as the torch reference rounds (gate and up to bf16, the SiLU to
//   bf16, the product to bf16).
// moe_gemv_down: warp w takes R output rows n.. and every pair: row n of each pair's expert times
//   that pair's hidden row, each rounded to bf16 and times its routing weight (rounded again),
//   summed over the pairs in slot order in float32 and rounded once: the top-k sum with no atomics
//   and no second kernel (fused_moe's one-token slot sum gives the same).
// A pair whose expert id is negative (held by another rank under expert parallelism) adds nothing.
// dense_gemv runs the down kernel's rows with ID64 = 2: no ids and no routing weights (one pair,
// expert 0, weight 1), out = W x rounded once as F.linear rounds (moe_gemv.gemv: the batch-1
// projections around the experts). A template value, not a null-pointer test: that cost the Qwen
// instance 80 registers. router_gemv is dense_gemv over the router's rows with the choice of
// experts after it, made by the grid's last block (router_gemv.router).
// Both wait for the previous kernel's writes (PDL) before reading the routing, and let the next
// kernel's blocks in only after their loads, so those do not sit on the SMs the stream needs
// (moe_gemv_down_early and dense_gemv's EARLY form issue their first weight loads before the wait).

// ldg_stream without `volatile`: ptxas may then issue all of a pass's loads before the first
// multiply that needs one (with it, it interleaves them, two loads in flight a warp)
__device__ __forceinline__ u32x4 ldg_weights(const u32x4* p) {
  u32x4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// the float32 dot of a lane's 16-byte slices: 8 weights times 8 activations, bf16 each
__device__ __forceinline__ float dot8(u32x4 w, u32x4 a, float acc) {
  acc = fmaf(bf16_lo(w.x), bf16_lo(a.x), acc);
  acc = fmaf(bf16_hi(w.x), bf16_hi(a.x), acc);
  acc = fmaf(bf16_lo(w.y), bf16_lo(a.y), acc);
  acc = fmaf(bf16_hi(w.y), bf16_hi(a.y), acc);
  acc = fmaf(bf16_lo(w.z), bf16_lo(a.z), acc);
  acc = fmaf(bf16_hi(w.z), bf16_hi(a.z), acc);
  acc = fmaf(bf16_lo(w.w), bf16_lo(a.w), acc);
  return fmaf(bf16_hi(w.w), bf16_hi(a.w), acc);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int ID64>
__device__ __forceinline__ int expert_of(const void* ids, int p) {  // ids < 2^31 (checked by the launch)
  if (ID64 == 2) return 0;  // a dense GEMV
  // an int64 id's low word is the id (ids in [-1, 2^31)); from L2: the early down kernel reads them before pdl_wait
  return static_cast<int>(ld_l2_u32(ID64 ? static_cast<const void*>(static_cast<const long long*>(ids) + p)
                                         : static_cast<const void*>(static_cast<const int*>(ids) + p)));
}

// R gate rows and their R up rows a warp, U 16-byte slices of each row a lane per pass over H
template <int R, int U, int ID64>
__global__ void __launch_bounds__(256, 2) moe_gemv_up(
    const u16* __restrict__ x, const u16* __restrict__ w13, const void* __restrict__ ids, u16* __restrict__ hidden,
    int H, int I, long long stride_e, int pairs) {
  const int lane = threadIdx.x & 31;
  const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int per_pair = (I + R - 1) / R;
  pdl_wait();
  if (warp >= pairs * per_pair) {
    pdl_release();
    return;
  }
  const int p = warp / per_pair, n0 = (warp % per_pair) * R;
  const int e = expert_of<ID64>(ids, p);
  if (e < 0) {
    pdl_release();
    return;  // another rank's expert: the down kernel skips this pair
  }
  const int slices = H >> 3;  // 16-byte slices of a row
  const u16* base = w13 + (long long)e * stride_e;
  float acc[2 * R];
#pragma unroll
  for (int r = 0; r < 2 * R; ++r) acc[r] = 0.f;
  for (int s0 = 0; s0 < slices; s0 += 32 * U) {
    u32x4 w[2 * R][U];
#pragma unroll
    for (int r = 0; r < 2 * R; ++r) {
      const int row = r < R ? n0 + r : I + n0 + (r - R);
      const bool live = (r < R ? n0 + r : n0 + r - R) < I;
      const u32x4* src = reinterpret_cast<const u32x4*>(base + (size_t)row * H);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = s0 + u * 32 + lane;
        w[r][u] = live && s < slices ? ldg_weights(src + s) : u32x4{0u, 0u, 0u, 0u};
      }
    }
    const u32x4* xs = reinterpret_cast<const u32x4*>(x);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * 32 + lane;
      const u32x4 a = s < slices ? ld_act(xs + s) : u32x4{0u, 0u, 0u, 0u};
#pragma unroll
      for (int r = 0; r < 2 * R; ++r) acc[r] = dot8(w[r][u], a, acc[r]);
    }
  }
  pdl_release();
#pragma unroll
  for (int r = 0; r < 2 * R; ++r) acc[r] = warp_sum(acc[r]);
  if (lane < R && n0 + lane < I) {
    float g = 0.f, up = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {  // lane r stores row n0 + r (registers stay statically indexed)
      if (r == lane) {
        g = acc[r];
        up = acc[R + r];
      }
    }
    const float a = round_bf16(silu(round_bf16(g)));
    hidden[(size_t)p * I + n0 + lane] = static_cast<u16>(pack_bf16(a * round_bf16(up), 0.f));
  }
}

// R output rows a warp, for all KMAX >= k pairs; U 16-byte slices of each row a lane per pass over I.
// ID64: int64 ids, else int32 (2: none, a dense GEMV). W32: the routing weights are float32 (Mixtral),
// else bf16 (Qwen-MoE). EARLY: the first pass's weight loads go out before pdl_wait (the kernels
// below say which entry point does which; 2: held there by a branch in the dense form too).
template <int R, int KMAX, int U, int ID64, int W32, int EARLY>
__device__ __forceinline__ void down_rows(
    const u16* __restrict__ hidden, const u16* __restrict__ w2, const void* __restrict__ ids,
    const void* __restrict__ topk_w, u16* __restrict__ out, int H, int I, long long stride_e, int pairs) {
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
  if (!EARLY) pdl_wait();
  if (n0 >= H) {
    if (EARLY) pdl_wait();
    pdl_release();
    return;
  }
  // EARLY reads the ids and routing weights before pdl_wait: the router wrote them before the up
  // kernel, which passed its own wait (so the router had finished) before it let this grid in.
  int e[KMAX];
#pragma unroll
  for (int p = 0; p < KMAX; ++p) e[p] = p < pairs ? expert_of<ID64>(ids, p) : -1;
  const int slices = I >> 3;
  float acc[KMAX][R];
#pragma unroll
  for (int p = 0; p < KMAX; ++p)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[p][r] = 0.f;
  for (int s0 = 0; s0 < slices; s0 += 32 * U) {
    u32x4 w[KMAX][R][U];
#pragma unroll
    for (int p = 0; p < KMAX; ++p)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool live = e[p] >= 0 && n0 + r < H;
        const u16* row = w2 + (long long)(live ? e[p] : 0) * stride_e + (size_t)(n0 + r) * I;
        const u32x4* src = reinterpret_cast<const u32x4*>(row);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int s = s0 + u * 32 + lane;
          w[p][r][u] = live && s < slices ? ldg_weights(src + s) : u32x4{0u, 0u, 0u, 0u};
        }
      }
    if (EARLY && s0 == 0) {
      if (ID64 != 2 || EARLY == 2) {
        // ptxas sinks loads past the wait (moving a load later is always allowed): a branch on
        // their values keeps this pass's weight loads before it. Never taken (pairs >= 1). The
        // dense GEMV's kept them there without it (EARLY 2 asks for it: router_gemv's did not).
        u32 seen = static_cast<u32>(pairs);
#pragma unroll
        for (int p = 0; p < KMAX; ++p)
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) seen |= w[p][r][u].x;
        if (seen == 0u) __trap();
      }
      pdl_wait();  // hidden is the up kernel's
    }
#pragma unroll
    for (int p = 0; p < KMAX; ++p) {
      const u32x4* hs = reinterpret_cast<const u32x4*>(hidden + (size_t)p * I);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = s0 + u * 32 + lane;
        const u32x4 a = e[p] >= 0 && s < slices ? ld_act(hs + s) : u32x4{0u, 0u, 0u, 0u};
#pragma unroll
        for (int r = 0; r < R; ++r) acc[p][r] = dot8(w[p][r][u], a, acc[p][r]);
      }
    }
  }
  pdl_release();
#pragma unroll
  for (int p = 0; p < KMAX; ++p)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[p][r] = warp_sum(acc[p][r]);
  if (lane < R && n0 + lane < H) {
    float total = 0.f;
#pragma unroll
    for (int p = 0; p < KMAX; ++p) {
      if (e[p] < 0) continue;
      float v = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r == lane) v = acc[p][r];
      const float wt = ID64 == 2 ? 1.f
                       : W32      ? __uint_as_float(ld_act_u32(static_cast<const float*>(topk_w) + p))
                                  : bf16_lo(ld_act_u16(static_cast<const u16*>(topk_w) + p));
      total += round_bf16(round_bf16(v) * wt);
    }
    out[n0 + lane] = static_cast<u16>(pack_bf16(total, 0.f));
  }
}

#define DOWN_PARAMS                                                                                 \
  const u16 *__restrict__ hidden, const u16 *__restrict__ w2, const void *__restrict__ ids,       \
      const void *__restrict__ topk_w, u16 *__restrict__ out, int H, int I, long long stride_e, int pairs
#define DOWN_ARGS hidden, w2, ids, topk_w, out, H, I, stride_e, pairs

// The plain down kernel: it waits for the up kernel before any load; 174 registers at Qwen3's
// shape leave one 8-warp block an SM, so its 2,048 output rows run in two waves.
template <int R, int KMAX, int U, int ID64, int W32>
__global__ void __launch_bounds__(256, 1) moe_gemv_down(DOWN_PARAMS) {
  down_rows<R, KMAX, U, ID64, W32, 0>(DOWN_ARGS);
}

// The early form (MoeGemvConfig.early_regs, LLMESH_GEMV_EARLY): the first pass of weight loads goes
// out before the wait (held there by a branch on their values: ptxas sank all but one of them below
// it otherwise), under a register cap (__maxnreg__) of 255, 168 or 128: 8, 12 or 16 warps an SM, the
// capped ones spilling a few words to the stack. No device's default until timed again
// (moe_gemv.CONFIGS says why).
template <int R, int KMAX, int U, int ID64, int W32, int MAXREG>
__global__ void __maxnreg__(MAXREG) moe_gemv_down_early(DOWN_PARAMS) {
  down_rows<R, KMAX, U, ID64, W32, 1>(DOWN_ARGS);
}

// The dense one-row GEMV (moe_gemv.gemv): an entry point of its own, so a profile names it apart
// from the MoE layer. EARLY as above; its 80-150 registers need no cap.
template <int R, int U, int EARLY>
__global__ void __launch_bounds__(256, 1) dense_gemv(DOWN_PARAMS) {
  down_rows<R, 1, U, 2, 1, EARLY>(DOWN_ARGS);
}

// The router at one token: the logits (dense_gemv's rows over the E experts, rounded to bf16 as
// F.linear rounds), then, in the grid's last block to arrive, moe_router's choice from them:
// softmax in float32, the top k (ties to the lower id, a NaN probability above every number),
// renormalised to sum 1 under RENORM, the weights rounded to bf16 (W32: kept float32), the ids as
// int64, and counts[id] grown by counted[0] (COUNT). One launch where the GEMV and
// moe_router.topk_softmax took two: at batch 1 each of those is a few microseconds of one layer's
// path. E <= 32 EPL (the last block's first warp holds the row, EPL experts a lane), k <= KMAX.
template <int R, int U, int EARLY, int EPL, int KMAX, int RENORM, int W32, int COUNT>
__global__ void __launch_bounds__(256, 1) router_gemv(
    const u16* __restrict__ x, const u16* __restrict__ w, u16* __restrict__ logits, int* __restrict__ counter,
    void* __restrict__ topk_w, long long* __restrict__ ids, unsigned long long* __restrict__ counts,
    const long long* __restrict__ counted, int E, int H, int k) {
  // pairs = k (>= 1, a run-time value): the one pair is live either way, and the early form's
  // branch then tests a value ptxas cannot fold away, which holds the loads before the wait
  down_rows<R, 1, U, 2, 1, EARLY ? 2 : 0>(x, w, nullptr, nullptr, logits, E, H, 0, k);
  __shared__ int last;
  __threadfence();  // this block's logits are visible before its arrival is
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!last || threadIdx.x >= 32) return;
  __threadfence();
  const int lane = threadIdx.x;
  const float NEG_INF = __int_as_float(0xff800000);
  float p[EPL], cand[EPL];
  float m = NEG_INF;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const int e = lane + 32 * j;
    p[j] = e < E ? bf16_lo(ld_l2_u16(logits + e)) : NEG_INF;
    m = fmaxf(m, p[j]);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    p[j] = lane + 32 * j < E ? __expf(p[j] - m) : 0.f;
    s += p[j];
  }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    p[j] = p[j] / s;
    // moe_router._candidates: NaN above every number, experts past E below every pick
    cand[j] = lane + 32 * j < E ? (p[j] != p[j] ? __int_as_float(0x7f800000) : p[j]) : -2.f;
  }
  float picked_w = 0.f, total = 0.f;
  int picked_id = 0;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j >= k) break;
    float bv = cand[0], bp = p[0];
    int bi = lane;
#pragma unroll
    for (int q = 1; q < EPL; ++q)  // a lane's experts in ascending id: strict > keeps the lower on ties
      if (cand[q] > bv) {
        bv = cand[q];
        bp = p[q];
        bi = lane + 32 * q;
      }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o), op = __shfl_xor_sync(0xffffffffu, bp, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bp = op;
        bi = oi;
      }
    }
#pragma unroll
    for (int q = 0; q < EPL; ++q)
      if (lane + 32 * q == bi) cand[q] = -1.f;  // taken
    total += bp;  // in pick order, as the reference's sum of the top k (up to the last bits)
    if (lane == j) {
      picked_w = bp;
      picked_id = bi;
    }
  }
  if (lane < k) {
    const float wt = RENORM ? picked_w / total : picked_w;
    if (W32)
      static_cast<float*>(topk_w)[lane] = wt;
    else
      static_cast<u16*>(topk_w)[lane] = static_cast<u16>(pack_bf16(wt, 0.f));
    ids[lane] = picked_id;
    if (COUNT) atomicAdd(counts + picked_id, static_cast<unsigned long long>(ld_act_u32(counted)));
  }
  if (lane == 0) atomicExch(counter, 0);  // ready for the next launch on this stream
}
