// Device helpers shared by every kernel. Every `.cuh` file in this folder is prepended, in
// name order, to every `.cu` file before NVRTC compiles it (NVRTC has no include path for
// our sources). Include-free on purpose: the JIT needs only libnvrtc, no toolkit headers.
//
// Conventions for kernel files (`.cu`):
// - kernels are `extern "C" __global__`, so the driver finds them by their source name;
// - every compile-time constant has a default (`#ifndef NAME / #define NAME …`), so each
//   file compiles with no -D options (CI compiles every file that way);
// - bf16 and f16 are raw 16-bit values (`unsigned short`), converted by the helpers below
//   exactly as the CPU oracle (ElementConversion) converts them.

typedef unsigned char ep_u8;
typedef unsigned short ep_u16;
typedef unsigned int ep_u32;
typedef unsigned long long ep_u64;
typedef long long ep_i64;

#define EP_DEVICE static __device__ __forceinline__

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (compute capability 9.0+). Every step kernel (those taking
// `const EpArgs`) starts with this, before any read or write of global memory: it waits until
// the grids before it in the stream have finished and their writes are visible (the host may
// launch it as a dependent launch, whose blocks start while the previous kernel still runs;
// launched plainly, the wait returns at once), then lets the next dependent launch start its
// own blocks, which wait the same way. Below 9.0: nothing (every launch there is plain).

EP_DEVICE void ep_grid_dependency() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// 16-byte vectors: the unit of every bulk copy (one LDG.128 / STG.128 per thread).

struct __align__(16) ep_vec16 {
    ep_u32 x, y, z, w;
};

// Coherent 16-byte load: for data another rank or block wrote (read it after the acquire
// load of the flag that published it).
EP_DEVICE ep_vec16 ep_load16(const void* address) {
    return *static_cast<const ep_vec16*>(address);
}

// Read-only, L1-bypassing 16-byte load: for inputs that no one writes during the kernel.
EP_DEVICE ep_vec16 ep_load16_nc(const void* address) {
    ep_vec16 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
}

// Coherent 16-byte loads that bypass L1 (cached in L2 only), and that use it.
EP_DEVICE ep_vec16 ep_load16_cg(const void* address) {
    ep_vec16 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(address));
    return v;
}

EP_DEVICE ep_vec16 ep_load16_ca(const void* address) {
    ep_vec16 v;
    asm volatile("ld.global.ca.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(address));
    return v;
}

EP_DEVICE void ep_store16(void* address, ep_vec16 v) {
    *static_cast<ep_vec16*>(address) = v;
}

// Streaming 16-byte store that does not allocate in L1: for data this block never reads back.
EP_DEVICE void ep_store16_na(void* address, ep_vec16 v) {
    asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// This thread's index in the whole grid (x only), and the grid's thread count: the start
// and step of a grid-stride loop.
EP_DEVICE ep_u64 ep_grid_thread() {
    return static_cast<ep_u64>(blockIdx.x) * blockDim.x + threadIdx.x;
}

EP_DEVICE ep_u64 ep_grid_threads() {
    return static_cast<ep_u64>(gridDim.x) * blockDim.x;
}

EP_DEVICE bool ep_is_aligned16(const void* address) {
    return (reinterpret_cast<ep_u64>(address) & 15ull) == 0;
}

// ---------------------------------------------------------------------------------------
// Flags between ranks. A flag holds a sequence number that only grows (no reset pass):
// the writer publishes with a release store after its data, the reader polls with acquire
// loads. `sys` scope reaches peers over NVLink/PCIe; `gpu` scope is enough on one GPU.

EP_DEVICE ep_u32 ep_load_acquire_sys(const ep_u32* flag) {
    ep_u32 value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
    return value;
}

EP_DEVICE ep_u32 ep_load_acquire_gpu(const ep_u32* flag) {
    ep_u32 value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
    return value;
}

EP_DEVICE void ep_store_release_sys(ep_u32* flag, ep_u32 value) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(flag), "r"(value) : "memory");
}

EP_DEVICE void ep_store_release_gpu(ep_u32* flag, ep_u32 value) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(flag), "r"(value) : "memory");
}

EP_DEVICE ep_u32 ep_atomic_add_release_sys(ep_u32* address, ep_u32 value) {
    ep_u32 old;
    asm volatile("atom.add.release.sys.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(address), "r"(value) : "memory");
    return old;
}

// Nanoseconds from the GPU's global timer (comparable across SMs of one GPU).
EP_DEVICE ep_u64 ep_globaltimer_ns() {
    ep_u64 now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

// True when sequence number `value` has reached `target` (wrap-around safe).
EP_DEVICE bool ep_seq_reached(ep_u32 value, ep_u32 target) {
    return static_cast<int>(value - target) >= 0;
}

// Waits until the flag, read with `load` (an acquire load of the right scope), reaches
// `target`, at most `timeout_ns`. Returns false on timeout; the caller marks the peer
// inactive and carries on. Never traps.
template <typename AcquireLoad>
EP_DEVICE bool ep_wait_flag(const ep_u32* flag, ep_u32 target, ep_u64 timeout_ns, AcquireLoad load) {
    if (ep_seq_reached(load(flag), target)) return true;
    const ep_u64 start = ep_globaltimer_ns();
    while (true) {
        for (int spin = 0; spin < 32; ++spin) {
            if (ep_seq_reached(load(flag), target)) return true;
        }
        if (ep_globaltimer_ns() - start > timeout_ns) return false;
    }
}

// Waits for a flag written by another GPU (or this one) with a sys-scope release.
EP_DEVICE bool ep_wait_flag_sys(const ep_u32* flag, ep_u32 target, ep_u64 timeout_ns) {
    return ep_wait_flag(flag, target, timeout_ns, ep_load_acquire_sys);
}

// Waits for a flag written on this GPU (ranks that share one GPU).
EP_DEVICE bool ep_wait_flag_gpu(const ep_u32* flag, ep_u32 target, ep_u64 timeout_ns) {
    return ep_wait_flag(flag, target, timeout_ns, ep_load_acquire_gpu);
}

// ---------------------------------------------------------------------------------------
// 16-bit floats by bit arithmetic, bit-identical to ElementConversion on the CPU.

EP_DEVICE float ep_bf16_to_float(ep_u16 bits) {
    return __uint_as_float(static_cast<ep_u32>(bits) << 16);
}

// Round to nearest even; NaN stays NaN (quiet bit set), infinities and overflow give inf.
EP_DEVICE ep_u16 ep_float_to_bf16(float value) {
    const ep_u32 bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<ep_u16>((bits >> 16) | 0x0040u);
    const ep_u32 rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<ep_u16>((bits + rounding_bias) >> 16);
}

// IEEE binary16 to float: exact for every value, subnormals included.
EP_DEVICE float ep_f16_to_float(ep_u16 half) {
    const ep_u32 sign = static_cast<ep_u32>(half & 0x8000u) << 16;
    const ep_u32 exponent = (half >> 10) & 0x1fu;
    const ep_u32 mantissa = half & 0x3ffu;
    if (exponent == 0x1fu) {  // inf, or NaN made quiet
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u));
    }
    if (exponent == 0) {  // zero or subnormal: mantissa × 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Float to IEEE binary16, round to nearest even, subnormals and overflow to inf handled.
EP_DEVICE ep_u16 ep_float_to_f16(float value) {
    const ep_u32 bits = __float_as_uint(value);
    const ep_u32 sign = (bits >> 16) & 0x8000u;
    const ep_u32 magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {  // NaN: keep the top payload bits, set the quiet bit
        return static_cast<ep_u16>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
    }
    if (magnitude >= 0x477ff000u) {  // ≥ 65520 rounds to inf (and inf stays inf)
        return static_cast<ep_u16>(sign | 0x7c00u);
    }
    if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, or zero
        const ep_u32 exponent = magnitude >> 23;
        const ep_u32 shift = 126u - exponent;  // value × 2^24 = significand >> shift
        if (shift > 24u) return static_cast<ep_u16>(sign);
        const ep_u32 significand = (magnitude & 0x7fffffu) | 0x800000u;
        ep_u32 result = significand >> shift;
        const ep_u32 remainder = significand & ((1u << shift) - 1u);
        const ep_u32 halfway = 1u << (shift - 1u);
        if (remainder > halfway || (remainder == halfway && (result & 1u))) result += 1u;
        return static_cast<ep_u16>(sign | result);
    }
    const ep_u32 rebased = magnitude - 0x38000000u;  // exponent bias 127 → 15
    return static_cast<ep_u16>(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13));
}

// The one rounding step of every combine: acc + weight × x, fused.
EP_DEVICE float ep_fma(float weight, float x, float acc) {
    return __fmaf_rn(weight, x, acc);
}
