// W4A16 at decode sizes in CUDA C++: y[M, N] = x[M, K] @ W[K, N], W's codes in the fragment
// order of mma.sync (Marlin's idea), widened in registers and never staged as bf16.
//
// Compiled at run time by NVRTC (llmesh/kernels/cuda_rtc.py) with no headers: everything below is
// plain C++ and inline PTX, so a compile takes a fraction of a second and needs no CUDA toolkit.
// llmesh/kernels/w4a16_mma.py holds the layouts (it writes the codes and scales this kernel reads),
// the launch and a torch model of what each lane computes; docs/quantization.md the why.
//
// The weight is the MMA's A operand and x its B (swap AB, as decode GEMMs in TensorRT-LLM and
// CUTLASS do at small M): an m16n8k16 MMA computes 16 output columns for 8 rows of x, so at
// M <= 8 a 64-column strip takes four MMAs a K step where x as A (16 rows, 15 of them padding
// at M = 1) took eight, and holds half the accumulators; at 9-16 rows (NT = 2) two n8 tiles
// share each widened A fragment. The codes' layout serves both orientations: a lane's B
// fragments of column groups 2q and 2q + 1 are its A fragment of columns 16q..16q+15.
//
// Per warp: one strip of 64 output columns over a range of K in steps of 16. A step is one
// 16-byte load per lane (two for 8-bit codes, PLANES below) holding its A fragments of four MMAs: either straight into registers,
// STAGES steps ahead (BULK = 0: no shared memory for the weight, so many warps an SM), or (BULK
// > 0, Hopper) lane 0's bulk copy of BULK steps of the warp's contiguous codes into a ring slot
// in shared memory, STAGES slots, on an mbarrier. The codes widen by the exponent trick (a
// nibble OR-ed into the mantissa of bf16 128.0 gives 128 + q exactly, one lop3 for two), so
// the MMAs compute (128 + q) . x. The block sums each row of x over each group once, after
// staging x, and at each group's end  y += s * acc + (m - 128 s) * sum(x)  in float32 (w = q s
// + m), which costs no arithmetic per weight beyond the lop3 and its shift.
//
// Block: WN strips x WK warps along K; the WK warps' sums meet in shared memory, and the
// gridDim.y splits of K meet through float32 partials, the last split to arrive adding them
// in split order (one launch, CUDA-graph safe; llmesh/kernels/split_k.py does the same in Triton).
//
// The helpers it shares with the other CUDA kernels (types, streaming loads, bf16 conversions, PDL)
// are common.cuh's, which cuda_rtc.source puts in front of it; its PTX wrappers (mbarriers, bulk
// and async copies, ldmatrix, mma.sync, cache-hinted loads) are ptx.cuh's; how it makes its
// operands in registers (x's fused inputs, the codes' widening) is mma_operands.cuh's.

#include "ptx.cuh"
#include "mma_operands.cuh"

// codes:   u32 [N/64, Kp/16, PLANES, 32 lanes, 4]  (llmesh/kernels/w4a16_mma.py pack_codes; PLANES = 2:
//          an 8-bit code u = 16 hi + lo as its high then low nibble plane, each laid out as 4-bit
//          codes; the MMAs of both planes add into one accumulator: x . (2048 + 16 hi) +
//          x . (128 + lo) = x . (u + 2176), so the fold below subtracts OFF = 2176 sum(x))
// scales:  u32x4 [N/64, Kp/G, 8 (g), 2]    (pack_scales: per lane g its 8 columns' s, m as half2)
// x: bf16 [M, K] rows ldx apart; out: bf16 [M, N] rows ldo apart; part: float32 [splits, M, N]
// split_steps: K steps (of 16) per split, a multiple of WK * GS; smem: see w4a16_mma.py smem_bytes
// NT: n8 tiles of x rows a block (8 * NT rows a tile); grid (tiles x strip blocks, splits)
// XLOAD = 1 (one n8 tile, register loads only): x's B fragments loaded from global memory with
// the codes, STAGES steps ahead, and its sums taken by an MMA with ones as A: no x tile, no
// barrier before the loop (a variant, timed against the staged x by the sweep)
// XLOAD = 2 (no ACT): x staged into the tile a group at a time, one group ahead of the
// MMAs (cp.async), each warp copying the part its own K range needs, and its sums taken by MMAs
// with ones as A: no block barrier and no pass over the tile before the K loop, whose weight
// stream the whole-tile staging held back (3.6 us of 16 at 16 rows, w4a16_mma_ablation's
// no_xstage at 4096 x 14336)
// ACT = 1: x holds [gate | up] (rows of 2K, the fused gate/up projection's output) and the
// GEMM's input is silu(gate) * up, made as x is staged or loaded (llmesh/kernels/activation.py's
// rounding): a down projection without silu_and_mul's launch
// ACT = 2: the GEMM's input is rmsnorm(x + res) * nw (llmesh/kernels/rmsnorm.py's rounding; res
// may be null): every block first sums the squares of its row tile over the whole K (its own K
// range is only a part), and the first strip block of split 0 stores x + res to res_out (another
// buffer: the other blocks still read res); a qkv or gate/up projection without rmsnorm's launch.
// res, res_out rows are K apart; eps is the norm's epsilon
// W4A8 = 1 or 2 (4-bit codes u = q + 8, x staged whole, no ACT): x is E4M3 codes [M, K] (bytes, rows
// ldx apart) with float32 row scales xscale [M], and W = e4m3(q g) r with float32 column scales
// wscale [N]: the scales' halves hold each column's group scale g and -1032 g as float16, each
// weight is widened to e4m3(q g) in float16 (mma_operands.cuh), x to float16 as it is staged, the
// MMAs are float16 ones into float32, and y = xscale wscale sum at the end: FBGEMM's W4A8
// arithmetic (without its FP8 tensor cores' shortened accumulation) for decode sizes; 1 rounds
// the products to E4M3 by conversions, 2 by integer operations (w4a8_weight's ROUND)
template <int WN, int WK, int STAGES, int GS, int BULK = 0, int NT = 2, int PLANES = 1, int XLOAD = 0,
          int ACT = 0, int W4A8 = 0>
__global__ void __launch_bounds__(WN * WK * 32) w4a16_mma(
    const u32* __restrict__ codes, const u32x4* __restrict__ scales, const u16* __restrict__ x,
    u16* __restrict__ out, float* __restrict__ part, int* __restrict__ counters,
    int M, int N, int K, int Kp, int ldx, int ldo, int split_steps,
    const u16* __restrict__ res, u16* __restrict__ res_out, const u16* __restrict__ nw, float eps,
    const float* __restrict__ xscale, const float* __restrict__ wscale) {
  static_assert(NT == 1 || NT == 2, "one or two n8 tiles of x rows");
  static_assert(PLANES == 1 || PLANES == 2, "4-bit codes, or 8-bit codes as two nibble planes");
  constexpr int STEP = 512 * PLANES;             // bytes of a warp's K step
  constexpr float OFF = PLANES == 2 ? 2176.f : 128.f;  // what the widening adds to a code
  static_assert(BULK > 0 || GS % STAGES == 0, "the register ring's depth divides the group's steps");
  static_assert(XLOAD != 1 || (NT == 1 && BULK == 0), "x's fragments from global memory: one n8 tile, register loads");
  static_assert(XLOAD != 2 || !ACT, "x copied a group ahead: its activation is made while staging, not copied");
  static_assert(!W4A8 || (PLANES == 1 && XLOAD == 0 && ACT == 0), "W4A8: 4-bit codes, x widened as it is staged");
  static_assert(W4A8 >= 0 && W4A8 <= 2, "W4A8: 0 off, 1 products rounded by conversions, 2 by integer operations");
  static_assert(ACT >= 0 && ACT <= 2, "ACT: 0 none, 1 silu(gate) * up, 2 rmsnorm");
  constexpr bool XPIPE = XLOAD == 2;
  constexpr int THREADS = WN * WK * 32, MT = 8 * NT;
  constexpr int RED = 68;  // float row stride of the warps' sums: lanes' stores fall in distinct banks
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane >> 2, t = lane & 3;
  // blockIdx.x: the row tile fastest, then the block of strips: the tiles of a strip run side by
  // side, so the codes one reads from memory the others find in L2
  const int tiles = (M + MT - 1) / MT, sb = blockIdx.x / tiles;
  const int strip = sb * WN + wn;
  const int m0 = (blockIdx.x % tiles) * MT;
  const int mrows = min(MT, M - m0);
  const int ksteps = Kp >> 4, groups = ksteps / GS;
  const int warp_steps = split_steps / WK;
  const int kstep0 = blockIdx.y * split_steps;          // the block's first K step
  const int my0 = kstep0 + wk * warp_steps;              // this warp's first
  const bool live = strip < N / 64;  // a last block may hold fewer than WN strips
  const int count = live ? max(0, min(warp_steps, ksteps - my0)) : 0;
  const int kc = split_steps * 16;                       // K values the block's x tile holds
  const int xrow = kc + 8;                               // padded: ldmatrix rows 16 B apart in banks

  constexpr int SLOT = THREADS * 16 * BULK * PLANES;  // a ring slot: BULK steps of every warp
  constexpr int RING = BULK > 0 ? STAGES * SLOT : 0;
  unsigned char* ring = smem;                                  // BULK: STAGES slots of BULK steps a warp
  u16* xs = reinterpret_cast<u16*>(smem + RING);               // [mrows, xrow]
  u32x4* zero = reinterpret_cast<u32x4*>(xs + mrows * xrow);   // one 16-byte row of zeros
  float* xsum = reinterpret_cast<float*>(zero + 1);            // [mrows, kc / (16 GS)]: x's group sums

  const u32* wcodes = codes + ((size_t)strip * ksteps + my0) * 128 * PLANES;  // the warp's run: STEP B a step
  const u32x4* src = reinterpret_cast<const u32x4*>(wcodes) + lane;
  // BULK: lane 0 copies BULK steps of the warp's (contiguous) codes a slot with one bulk copy
  // (TMA's 1-D form), completion counted on the slot's mbarrier; the lanes wait on its phase
  __shared__ __align__(8) unsigned long long bars[BULK > 0 ? WN * WK * STAGES : 1];
  const u32 bar0 = smem_addr(bars) + warp * STAGES * 8;
  const u32 wring0 = smem_addr(ring) + warp * BULK * STEP;  // the warp's part of slot 0 (BULK)
  const unsigned char* wsrc = reinterpret_cast<const unsigned char*>(wcodes);
  u32x4 pre[BULK > 0 ? 1 : STAGES][PLANES];  // BULK = 0: the next STAGES steps' codes, in flight
  if constexpr (BULK > 0) {
    if (lane == 0) {
      for (int s = 0; s < STAGES; ++s) mbar_init(bar0 + s * 8);
      fence_mbar_init();
    }
    __syncwarp();
    if (lane == 0) {
      for (int c = 0; c < STAGES - 1; ++c)
        if (c * BULK < count) bulk_copy(wring0 + c * SLOT, wsrc + (size_t)c * BULK * STEP, BULK * STEP, bar0 + c * 8);
    }
  } else {
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
#pragma unroll
      for (int p = 0; p < PLANES; ++p)
        if (s < count) pre[s][p] = ldg_stream(src + (size_t)(s * PLANES + p) * 32);
  }

  // Launched with programmatic dependent launch (Hopper), the block may be resident before the
  // previous kernel has finished: the loads above read weights, which no kernel of a step
  // writes, so they are in flight during its tail; x, out and the split-K partials and counters
  // wait for it. Then the next kernel's blocks may be scheduled as ours retire. Without PDL
  // both return at once.
  pdl_wait_then_release();

  // ACT 2: each row's 1 / rms over the whole K (rmsnorm.py's statistics), the summed rows stored once
  __shared__ float rstd_s[ACT == 2 ? 16 : 1];
  if constexpr (ACT == 2)
    row_rstd<WN * WK>(rstd_s, x, res, res_out, res != nullptr && sb == 0 && blockIdx.y == 0, m0, mrows, K, ldx, eps);

  const int kbase = kstep0 * 16, gpb = split_steps / GS;
  // XLOAD: lane (g, t)'s B fragment of step i is x[m0 + g][k, k + 1] and [k + 8, k + 9] at
  // k = 16 (my0 + i) + 2t, as bf16 pairs; zero for rows past M and past K (K is even)
  const bool xg_live = g < mrows;
  const u32* xrow_g = reinterpret_cast<const u32*>(x + (size_t)(m0 + (xg_live ? g : 0)) * ldx);
  u32 px[XLOAD == 1 ? STAGES : 1][ACT == 1 ? 4 : ACT == 2 ? 6 : 2];
  const u32* rrow_g = ACT == 2 && res != nullptr
      ? reinterpret_cast<const u32*>(res + (size_t)(m0 + (xg_live ? g : 0)) * K) : nullptr;
  const u32* nw32 = reinterpret_cast<const u32*>(nw);
  const float xrstd = ACT == 2 ? rstd_s[xg_live ? g : 0] : 0.f;
  // XPIPE: the warp's group j (columns c0 + 16 GS j of the block's tile, every row) into x's tile:
  // its copies are one cp.async group. The WN warps of a K range copy the same bytes to the same
  // place (identical values, so whichever lands last changes nothing) and wait only for their own.
  const int c0 = wk * warp_steps * 16;
  auto stage_group = [&](int j) {
    if (j * GS < count) {
      for (int i = lane; i < mrows * 2 * GS; i += 32) {
        const int r = i / (2 * GS), c = c0 + j * 16 * GS + (i % (2 * GS)) * 8;
        const bool in_k = kbase + c < K;
        cp_async16(smem_addr(xs + r * xrow + c), x + (size_t)(m0 + r) * ldx + (in_k ? kbase + c : 0), in_k);
      }
    }
    cp_async_commit();  // empty past the warp's range: the wait below counts groups
  };
  if constexpr (XLOAD == 1) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
      if (s < count) load_xfrag<ACT>(px[s], xrow_g, (my0 + s) * 16 + 2 * t, K, xg_live, rrow_g, nw32);
  } else if constexpr (XPIPE) {
    if (lane == 0) *zero = u32x4{0u, 0u, 0u, 0u};  // every warp's lane 0: the same zeros
    stage_group(0);
    stage_group(1);
  } else {
    // x's rows of this m tile over the block's K range, zero past K (so the padded codes add nothing)
    for (int i = tid; i < mrows * (kc / 8); i += THREADS) {
      const int r = i / (kc / 8), c = (i % (kc / 8)) * 8;
      u32x4 v = {0u, 0u, 0u, 0u};
      if (W4A8 && kbase + c < K) {  // eight E4M3 codes, widened to float16 here
        u32 e0, e1;
        ld_act_u32x2(reinterpret_cast<const unsigned char*>(x) + (size_t)(m0 + r) * ldx + kbase + c, e0, e1);
        e4m3x4_to_f16(e0, v.x, v.y);
        e4m3x4_to_f16(e1, v.z, v.w);
      } else if (kbase + c < K) {
        const u16* xr = x + (size_t)(m0 + r) * ldx + kbase + c;
        v = ld_act(reinterpret_cast<const u32x4*>(xr));
        if constexpr (ACT == 1) {
          const u32x4 u = ld_act(reinterpret_cast<const u32x4*>(xr + K));
          v = u32x4{silu_mul2(v.x, u.x), silu_mul2(v.y, u.y), silu_mul2(v.z, u.z), silu_mul2(v.w, u.w)};
        }
        if constexpr (ACT == 2) {
          if (res != nullptr)
            v = add4(v, ld_act(reinterpret_cast<const u32x4*>(res + (size_t)(m0 + r) * K + kbase + c)));
          const u32x4 w = *reinterpret_cast<const u32x4*>(nw + kbase + c);
          const float rs = rstd_s[r];
          v = u32x4{norm2(v.x, w.x, rs), norm2(v.y, w.y, rs), norm2(v.z, w.z, rs), norm2(v.w, w.w, rs)};
        }
      }
      *reinterpret_cast<u32x4*>(xs + r * xrow + c) = v;
    }
    if (tid == 0) *zero = u32x4{0u, 0u, 0u, 0u};
    __syncthreads();
    // each row's sum over each group (none with W4A8: no min to fold): a thread a (row, group), its
    // 2 GS 16-byte chunks read from a lane-rotated first one (so a quarter-warp's lanes fall in distinct banks)
    for (int p = tid; p < (W4A8 ? 0 : mrows * gpb); p += THREADS) {
      const u16* row = xs + (p / gpb) * xrow + (p % gpb) * 16 * GS;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 2 * GS; ++j) {
        const u32x4 v = *reinterpret_cast<const u32x4*>(row + ((j + lane) & (2 * GS - 1)) * 8);
        const u32 h[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += __uint_as_float(h[e] << 16) + __uint_as_float(h[e] & 0xffff0000u);
      }
      xsum[p] = sum;
    }
    __syncthreads();
  }

  // x as the B operand (k16 x n8, column n = row n of x): ldmatrix (not transposed) of 8x8
  // tiles whose rows are x's rows gives lane l row l / 4 at k 2 (l % 4), +1: b0 from k 0-7,
  // b1 from k 8-15. Lanes 0-7 address rows 0-7 at k 0, 8-15 the same rows at k 8, and with NT
  // = 2 lanes 16-31 rows 8-15 likewise. Rows past M read zeros.
  const int xr = (lane & 7) + (NT == 2 ? (lane >> 4) * 8 : 0), xk = ((lane >> 3) & 1) * 8;
  const bool xr_live = xr < mrows;
  const u32 xa0 = xr_live ? smem_addr(xs + xr * xrow + wk * warp_steps * 16 + xk) : smem_addr(zero);
  const u32 xstep = xr_live ? 32u : 0u;

  // C fragment of MMA q, n8 tile nt: [0] column 16q + g, x row 8nt + 2t; [1] row + 1;
  // [2], [3] the same rows at column 16q + 8 + g
  float tot[NT][4][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) tot[nt][q][e] = 0.f;

  // the lane's x rows 8 nt + 2t and + 1 (C-fragment columns) in the group sums; rows past M
  // read row 0 (their results are never stored)
  int srow[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) srow[nt][e] = (8 * nt + 2 * t + e < mrows ? 8 * nt + 2 * t + e : 0) * gpb;
  const int sgroup0 = wk * warp_steps / GS;  // the warp's first group within the block's
  const u32x4* sc_src = scales + ((size_t)strip * groups + my0 / GS) * 16 + g * 2;
  // W4A8 widens each code with its group's scale, so a group's scales are loaded one group ahead
  u32x4 sc_next[2] = {u32x4{0u, 0u, 0u, 0u}, u32x4{0u, 0u, 0u, 0u}};
  if (W4A8 && count > 0) {
    sc_next[0] = ldg128(sc_src);
    sc_next[1] = ldg128(sc_src + 1);
  }
  for (int g0 = 0; g0 < count; g0 += GS) {
    u32x4 sc[2];  // this group's scales and mins: loaded now, used after its GS steps (W4A8: at once)
    if constexpr (W4A8) {
      sc[0] = sc_next[0];
      sc[1] = sc_next[1];
      if (g0 + GS < count) {
        sc_next[0] = ldg128(sc_src + (g0 / GS + 1) * 16);
        sc_next[1] = ldg128(sc_src + (g0 / GS + 1) * 16 + 1);
      }
    } else {
      sc[0] = ldg128(sc_src + (g0 / GS) * 16);
      sc[1] = ldg128(sc_src + (g0 / GS) * 16 + 1);
    }
    // W4A8: per MMA q, the group scale g and -1032 g of the lane's A rows as float16 pairs (g, g)
    // and (c, c): [q][0] column 16q + g, [q][1] column 16q + 8 + g
    u32 gg[W4A8 ? 4 : 1][2], cc[W4A8 ? 4 : 1][2];
    if constexpr (W4A8) {
      const u32 sv[8] = {sc[0].x, sc[0].y, sc[0].z, sc[0].w, sc[1].x, sc[1].y, sc[1].z, sc[1].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        gg[q][0] = __byte_perm(sv[2 * q], 0u, 0x1010);
        gg[q][1] = __byte_perm(sv[2 * q], 0u, 0x3232);
        cc[q][0] = __byte_perm(sv[2 * q + 1], 0u, 0x1010);
        cc[q][1] = __byte_perm(sv[2 * q + 1], 0u, 0x3232);
      }
    }
    float acc[NT][4][4], xsum_mma[NT][4];  // the latter: XLOAD's sums of x
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) xsum_mma[nt][e] = 0.f;
    if constexpr (XPIPE) {
      cp_async_wait_1();  // this group's copies are in (the next one's may not be)
      __syncwarp();       // and every lane's are visible to the warp's ldmatrix
      stage_group(g0 / GS + 2);  // its own place in the tile: nothing read yet is overwritten
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][q][e] = 0.f;
#pragma unroll
    for (int js = 0; js < GS; ++js) {
      const int i = g0 + js;
      u32x4 b[PLANES];
      if constexpr (BULK > 0) {
        const int c = i / BULK, slot = c % STAGES;
        if (js % BULK == 0) {
          mbar_wait(bar0 + slot * 8, (c / STAGES) & 1);
          __syncwarp();  // every lane is done with the slot chunk c - 1 used: refill it
          const int nc = c + STAGES - 1;
          if (lane == 0 && nc * BULK < count)
            bulk_copy(wring0 + (nc % STAGES) * SLOT, wsrc + (size_t)nc * BULK * STEP, BULK * STEP,
                      bar0 + (nc % STAGES) * 8);
        }
#pragma unroll
        for (int p = 0; p < PLANES; ++p) b[p] = lds128(wring0 + slot * SLOT + (js % BULK) * STEP + p * 512 + lane * 16);
      } else {
        // g0 is a multiple of GS, which STAGES divides: the ring index is a constant
        const int nxt = i + STAGES;
#pragma unroll
        for (int p = 0; p < PLANES; ++p) {
          b[p] = pre[js % STAGES][p];
          if (nxt < count) pre[js % STAGES][p] = ldg_stream(src + (size_t)(nxt * PLANES + p) * 32);
        }
      }
      u32 bx[2 * NT];
      if constexpr (XLOAD == 1) {
        const int nxt = i + STAGES;
        if constexpr (ACT == 1) {
          bx[0] = silu_mul2(px[js % STAGES][0], px[js % STAGES][2]);
          bx[1] = silu_mul2(px[js % STAGES][1], px[js % STAGES][3]);
        } else if constexpr (ACT == 2) {
          bx[0] = norm2(add2(px[js % STAGES][0], px[js % STAGES][2]), px[js % STAGES][4], xrstd);
          bx[1] = norm2(add2(px[js % STAGES][1], px[js % STAGES][3]), px[js % STAGES][5], xrstd);
        } else {
          bx[0] = px[js % STAGES][0];
          bx[1] = px[js % STAGES][1];
        }
        if (nxt < count) load_xfrag<ACT>(px[js % STAGES], xrow_g, (my0 + nxt) * 16 + 2 * t, K, xg_live, rrow_g, nw32);
        const u32 ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};  // bf16 pairs (1, 1)
        mma(xsum_mma[0], ones, bx[0], bx[1]);  // C row r, column 2t (+1): x's row 2t (+1) summed over k
      } else {
        if constexpr (NT == 1) {
          ldmatrix_x2(bx, xa0 + i * xstep);
        } else {
          ldmatrix_x4(bx, xa0 + i * xstep);
        }
        if constexpr (XPIPE) {
          const u32 ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma(xsum_mma[nt], ones, bx[2 * nt], bx[2 * nt + 1]);
        }
      }
#pragma unroll
      for (int p = 0; p < PLANES; ++p) {
        const u32 w[4] = {b[p].x, b[p].y, b[p].z, b[p].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          // word q's nibble pairs 0..3: b0, b1 of column group 2q, then of 2q + 1 (the B-fragment
          // order they were packed in); as A: rows g (group 2q) and g + 8 (group 2q + 1). With
          // two planes, plane 0 holds the high nibbles (widened to 2048 + 16 hi)
          if constexpr (W4A8) {
            const u32 a[4] = {w4a8_weight<W4A8>(w[q], gg[q][0], cc[q][0]),
                              w4a8_weight<W4A8>(w[q] >> 8, gg[q][1], cc[q][1]),
                              w4a8_weight<W4A8>(w[q] >> 4, gg[q][0], cc[q][0]),
                              w4a8_weight<W4A8>(w[q] >> 12, gg[q][1], cc[q][1])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_f16(acc[nt][q], a, bx[2 * nt], bx[2 * nt + 1]);
          } else {
            const u32 mg = PLANES == 2 && p == 0 ? 0x45004500u : 0x43004300u;  // a constant once unrolled
            const u32 a[4] = {widen(w[q], mg), widen(w[q] >> 8, mg), widen(w[q] >> 4, mg), widen(w[q] >> 12, mg)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma(acc[nt][q], a, bx[2 * nt], bx[2 * nt + 1]);
          }
        }
      }
    }
    if constexpr (W4A8) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) tot[nt][q][e] += acc[nt][q][e];  // the group scales were in the weights
      continue;
    }
    const u32 sw[8] = {sc[0].x, sc[0].y, sc[0].z, sc[0].w, sc[1].x, sc[1].y, sc[1].z, sc[1].w};
    const int sg = sgroup0 + g0 / GS;
    float xs0[NT], xs1[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      xs0[nt] = XLOAD ? xsum_mma[nt][0] : xsum[srow[nt][0] + sg];
      xs1[nt] = XLOAD ? xsum_mma[nt][1] : xsum[srow[nt][1] + sg];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // sw[2q]: (s of column 16q + g, s of 16q + 8 + g) as half2; sw[2q + 1] the mins
      const float sa = half_lo(sw[2 * q]), sb = half_hi(sw[2 * q]);
      const float za = half_lo(sw[2 * q + 1]) - OFF * sa, zb = half_hi(sw[2 * q + 1]) - OFF * sb;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        tot[nt][q][0] += sa * acc[nt][q][0] + za * xs0[nt];
        tot[nt][q][1] += sa * acc[nt][q][1] + za * xs1[nt];
        tot[nt][q][2] += sb * acc[nt][q][2] + zb * xs0[nt];
        tot[nt][q][3] += sb * acc[nt][q][3] + zb * xs1[nt];
      }
    }
  }
  __syncthreads();  // the ring and x tile are free: the WK warps' sums meet there

  float* red = reinterpret_cast<float*>(smem);  // [WK, WN, mrows, RED]
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = 8 * nt + 2 * t;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int col = 16 * q + g;
      if (r < mrows) {
        float* p = red + ((wk * WN + wn) * mrows + r) * RED + col;
        p[0] = tot[nt][q][0];
        p[8] = tot[nt][q][2];
      }
      if (r + 1 < mrows) {
        float* p = red + ((wk * WN + wn) * mrows + r + 1) * RED + col;
        p[0] = tot[nt][q][1];
        p[8] = tot[nt][q][3];
      }
    }
  }
  __syncthreads();

  const int splits = gridDim.y, n0 = sb * WN * 64;
  const int pairs = WN * mrows * 32;  // column pairs of the block's [mrows, WN * 64] tile
  // W4A8: a finished pair of outputs times its row's and columns' scales (x's were written by the
  // kernel before: a coherent load)
  auto store = [&](int r, int n, float v0, float v1) {
    if constexpr (W4A8) {
      const float xsr = __uint_as_float(ld_act_u32(xscale + m0 + r));
      v0 *= xsr * wscale[n];
      v1 *= xsr * wscale[n + 1];
    }
    *reinterpret_cast<u32*>(out + (size_t)(m0 + r) * ldo + n) = pack_bf16(v0, v1);
  };
  for (int i = tid; i < pairs; i += THREADS) {
    const int sn = i / (mrows * 32), r = (i / 32) % mrows, c = (i % 32) * 2;
    const int n = n0 + sn * 64 + c;
    if (n >= N) continue;
    float v0 = 0.f, v1 = 0.f;
#pragma unroll
    for (int k = 0; k < WK; ++k) {
      const float* p = red + ((k * WN + sn) * mrows + r) * RED + c;
      v0 += p[0];
      v1 += p[1];
    }
    if (splits == 1) {
      store(r, n, v0, v1);
    } else {
      float* p = part + ((size_t)blockIdx.y * M + m0 + r) * N + n;
      p[0] = v0;
      p[1] = v1;
    }
  }
  if (splits == 1) return;

  __shared__ int last;
  __threadfence();  // this split's partials are visible before its arrival is
  __syncthreads();
  if (tid == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = tid; i < pairs; i += THREADS) {
    const int sn = i / (mrows * 32), r = (i / 32) % mrows, c = (i % 32) * 2;
    const int n = n0 + sn * 64 + c;
    if (n >= N) continue;
    float v0 = 0.f, v1 = 0.f;
    for (int s = 0; s < splits; ++s) {  // in split order: the same sum whichever split came last
      const float* p = part + ((size_t)s * M + m0 + r) * N + n;
      v0 += ldcg(p);
      v1 += ldcg(p + 1);
    }
    store(r, n, v0, v1);
  }
  if (tid == 0) atomicExch(counters + blockIdx.x, 0);  // ready for the next launch on this stream
}
