// What the CUDA C++ kernels of llmesh/kernels/cuda/ share: put in front of each source by
// llmesh/kernels/cuda_rtc.source (NVRTC is given no include paths: this and the headers a source
// includes, such as ptx.cuh, go into the one string it compiles as text).

typedef unsigned int u32;
typedef unsigned short u16;

struct alignas(16) u32x4 { u32 x, y, z, w; };

// Programmatic dependent launch (Hopper): wait until the previous kernel's writes are visible,
// then (release) let the next kernel's blocks be scheduled. Without PDL both return at once.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_then_release() {
  pdl_wait();
  pdl_release();
}

// What the kernel before wrote (activations, routing), read after pdl_wait: coherent loads. Not
// ld.global.nc (ldg_stream, ldg_weights, and what a plain read through a `const __restrict__`
// pointer compiles to): the read-only path takes the data as fixed for the kernel's whole life,
// and under PDL that life begins while the writer still runs. In a decode graph, where one layer's
// buffers are the next one's, it served rows of the layer before (tests/engine/test_cuda_gemv_engine.py;
// the NVRTC compile tests of test_moe_gemv.py and test_w4a16_mma.py check the machine code's load forms).
__device__ __forceinline__ u32x4 ld_act(const u32x4* p) {
  u32x4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// ... and from L2 (.cg), for a read that goes out before pdl_wait: no L1 line of an earlier kernel
__device__ __forceinline__ u32 ld_l2_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ u16 ld_l2_u16(const void* p) {  // another block's store, after its arrival
  u16 v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 ld_act_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void ld_act_u32x2(const void* p, u32& a, u32& b) {
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ u16 ld_act_u16(const void* p) {
  u16 v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ u32x4 ldg_stream(const u32x4* p) {  // read once: skip L1
  u32x4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ float silu(float g) { return g * (1.f / (1.f + __expf(-g))); }

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {  // rounded to nearest even
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float round_bf16(float v) { return bf16_lo(pack_bf16(v, 0.f)); }
