// The fragment-order kernel's operands as it makes them in registers (w4a16_mma.cu includes it):
// x's fused inputs (silu(gate) * up, rmsnorm(x + residual)), rounded where the Triton kernels
// round, and the weight's widening: 4-bit codes to bf16 by the exponent trick, and W4A8's codes
// to float16 products rounded to E4M3. Helpers from common.cuh and ptx.cuh.

// a B fragment of x straight from global memory: bf16 pairs at columns k and k + 8 of a row;
// ACT 1: also up's at K + k and K + k + 8 (f[2], f[3]); ACT 2: the residual row's pairs (f[2],
// f[3]; zeros without one) and the norm weight's (f[4], f[5]). Combined when the fragment is
// used, so the loads stay in flight until then
template <int ACT>
__device__ __forceinline__ void load_xfrag(u32* f, const u32* row, int k, int K, bool live,
                                           const u32* rrow = nullptr, const u32* nw = nullptr) {
  f[0] = live && k < K ? ld_act_u32(row + k / 2) : 0u;
  f[1] = live && k + 8 < K ? ld_act_u32(row + k / 2 + 4) : 0u;
  if constexpr (ACT == 1) {
    f[2] = live && k < K ? ld_act_u32(row + (K + k) / 2) : 0u;
    f[3] = live && k + 8 < K ? ld_act_u32(row + (K + k) / 2 + 4) : 0u;
  }
  if constexpr (ACT == 2) {
    f[2] = rrow && live && k < K ? ld_act_u32(rrow + k / 2) : 0u;
    f[3] = rrow && live && k + 8 < K ? ld_act_u32(rrow + k / 2 + 4) : 0u;
    f[4] = live && k < K ? ldg_u32(nw + k / 2) : 0u;
    f[5] = live && k + 8 < K ? ldg_u32(nw + k / 2 + 4) : 0u;
  }
}

// (v & 0x000f000f) | MAGIC: two nibbles (bits 0-3 and 16-19) into the low mantissa bits of a
// bf16 pair: MAGIC 0x43004300 gives 128 + q (bf16 spacing 1 in [128, 256)), 0x45004500 gives
// 2048 + 16 q (spacing 16 in [2048, 4096)): both exact
__device__ __forceinline__ u32 widen(u32 v, u32 magic = 0x43004300u) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(0x000f000fu), "r"(magic));
  return r;
}

// silu(gate) * up of two bf16 pairs, rounded where llmesh/kernels/activation.py rounds (the SiLU to
// bf16, then the product): the down projection's input made as it is read, silu_and_mul's
// launch and its round trip through memory gone. silu(0) * 0 = 0, so padding stays zero.
__device__ __forceinline__ u32 silu_mul2(u32 gate, u32 up) {
  const u32 a = pack_bf16(silu(bf16_lo(gate)), silu(bf16_hi(gate)));
  return pack_bf16(bf16_lo(a) * bf16_lo(up), bf16_hi(a) * bf16_hi(up));
}

// x + residual of two bf16 pairs, rounded as HF's residual add (and llmesh/kernels/rmsnorm.py) rounds
__device__ __forceinline__ u32 add2(u32 a, u32 b) {
  return pack_bf16(bf16_lo(a) + bf16_lo(b), bf16_hi(a) + bf16_hi(b));
}

__device__ __forceinline__ float sq2(u32 v) { return bf16_lo(v) * bf16_lo(v) + bf16_hi(v) * bf16_hi(v); }

// RMSNorm of a bf16 pair of a summed row s whose rstd is known, rounded where rmsnorm.py rounds
// (s * rstd to bf16, then times the weight to bf16): the projection's input made as it is read,
// rmsnorm's launch and its round trip through memory gone. Padding (s = w = 0) stays zero.
__device__ __forceinline__ u32 norm2(u32 s, u32 w, float rstd) {
  const u32 n = pack_bf16(bf16_lo(s) * rstd, bf16_hi(s) * rstd);
  return pack_bf16(bf16_lo(w) * bf16_lo(n), bf16_hi(w) * bf16_hi(n));
}

__device__ __forceinline__ u32x4 add4(u32x4 a, u32x4 b) {
  return u32x4{add2(a.x, b.x), add2(a.y, b.y), add2(a.z, b.z), add2(a.w, b.w)};
}

// W4A8: a nibble pair (u = q + 8) widened to float16 (1024 + u_lo, 1024 + u_hi) (spacing 1 in
// [1024, 2048)), then (1024 + u) g - 1032 g = q g in one paired FMA with gg = (g, g) and cc =
// (-1032 g, -1032 g): exact, as f16 holds every product of a code and an E4M3 scale up to 63
// (and 1032 g too). Rounded to E4M3, it is the weight FBGEMM's kernel multiplies: the products'
// rounding is part of the format (docs/quantization.md, W4A8). ROUND 1: converted to E4M3 and
// back (two conversions a pair, sm_89 on). ROUND 2: rounded in place on the float16 bits, to
// nearest even at E4M3's 3 mantissa bits (add 0x3F plus the lowest kept bit, clear the 7
// dropped; a half's carry never reaches the sign or the other half, |q g| <= 448): four integer
// operations a pair, exact for every scale up to 56 (w4a8_mma.int_rounding_exact: the products
// stay within 448, and a subnormal scale's lie on E4M3's subnormal grid)
template <int ROUND>
__device__ __forceinline__ u32 w4a8_weight(u32 v, u32 gg, u32 cc) {
  const u32 h = widen(v, 0x64006400u);
  u32 p;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p) : "r"(h), "r"(gg), "r"(cc));
  if constexpr (ROUND == 2) {
    return (p + 0x003F003Fu + ((p >> 7) & 0x00010001u)) & 0xFF80FF80u;
  } else {
    u32 r;
    asm("{ .reg .b16 e; cvt.rn.satfinite.e4m3x2.f16x2 e, %1; cvt.rn.f16x2.e4m3x2 %0, e; }" : "=r"(r) : "r"(p));
    return r;
  }
}

// four E4M3 codes (x's bytes k..k+3) as two float16 pairs: exact, every E4M3 value is a float16
__device__ __forceinline__ void e4m3x4_to_f16(u32 v, u32& lo, u32& hi) {
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; cvt.rn.f16x2.e4m3x2 %1, h; }"
      : "=r"(lo), "=r"(hi) : "r"(v));
}

// ACT 2: 1 / rms of each row of the block's tile over the whole K into rstd (rmsnorm.py's
// statistics; the block's own K range is only a part); with a residual the rows are x + res, and
// the block that ``keep``s stores them to res_out (another buffer: the other blocks still read res)
template <int WARPS>
__device__ __forceinline__ void row_rstd(float* rstd, const u16* x, const u16* res, u16* res_out, bool keep,
                                         int m0, int mrows, int K, int ldx, float eps) {
  constexpr int THREADS = WARPS * 32;
  __shared__ float nsum[WARPS][16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int r = 0; r < mrows; ++r) {
    const u16* xr = x + (size_t)(m0 + r) * ldx;
    float ss = 0.f;
    for (int c = tid * 8; c < K; c += THREADS * 8) {
      u32x4 v = ld_act(reinterpret_cast<const u32x4*>(xr + c));
      if (res != nullptr) {
        v = add4(v, ld_act(reinterpret_cast<const u32x4*>(res + (size_t)(m0 + r) * K + c)));
        if (keep) *reinterpret_cast<u32x4*>(res_out + (size_t)(m0 + r) * K + c) = v;
      }
      ss += sq2(v.x) + sq2(v.y) + sq2(v.z) + sq2(v.w);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) nsum[warp][r] = ss;
  }
  __syncthreads();
  if (tid < mrows) {
    float ss = 0.f;
    for (int w = 0; w < WARPS; ++w) ss += nsum[w][tid];
    rstd[tid] = rsqrtf(ss / K + eps);
  }
  __syncthreads();
}
