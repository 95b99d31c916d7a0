// Kernels that exercise every helper in ep_common.cuh, for the GPU tests (which compare
// them with the CPU oracle) and so that compiling this file checks all their inline PTX.

extern "C" __global__ void ep_selftest_bf16_to_float(const ep_u16* in, float* out, ep_u64 count) {
    for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) {
        out[i] = ep_bf16_to_float(in[i]);
    }
}

extern "C" __global__ void ep_selftest_float_to_bf16(const float* in, ep_u16* out, ep_u64 count) {
    for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) {
        out[i] = ep_float_to_bf16(in[i]);
    }
}

extern "C" __global__ void ep_selftest_f16_to_float(const ep_u16* in, float* out, ep_u64 count) {
    for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) {
        out[i] = ep_f16_to_float(in[i]);
    }
}

extern "C" __global__ void ep_selftest_float_to_f16(const float* in, ep_u16* out, ep_u64 count) {
    for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) {
        out[i] = ep_float_to_f16(in[i]);
    }
}

// out[i] = fma(weight[i], x[i], acc[i]) with one rounding.
extern "C" __global__ void ep_selftest_fma(const float* weight, const float* x, const float* acc, float* out, ep_u64 count) {
    for (ep_u64 i = ep_grid_thread(); i < count; i += ep_grid_threads()) {
        out[i] = ep_fma(weight[i], x[i], acc[i]);
    }
}

// Copies `vectors` 16-byte vectors with the coherent load and plain store.
extern "C" __global__ void ep_selftest_copy16(ep_vec16* dst, const ep_vec16* src, ep_u64 vectors) {
    for (ep_u64 i = ep_grid_thread(); i < vectors; i += ep_grid_threads()) {
        ep_store16(dst + i, ep_load16(src + i));
    }
}

// Launch with 2 blocks of 1 thread and zeroed `flags[4]`, `results[8]`.
// Block 0 publishes payload then flags (sys and gpu scope); block 1 waits for them, reads the
// payload, and also waits on a flag nobody sets, which must time out after `timeout_ns`.
// results: [0] sys wait ok, [1] payload seen after sys wait, [2] gpu wait ok, [3] payload seen
// after gpu wait, [4] unset-flag wait result (must be 0), [5] its elapsed ns ≥ timeout (1 = yes),
// [6] value before atomic add, [7] value after.
extern "C" __global__ void ep_selftest_flags(ep_u32* flags, ep_u32* payload, ep_u32* results, ep_u64 timeout_ns) {
    if (threadIdx.x != 0) return;
    if (blockIdx.x == 0) {
        payload[0] = 0xC0FFEEu;
        ep_store_release_sys(&flags[0], 1u);
        payload[1] = 0xBEEFu;
        ep_store_release_gpu(&flags[1], 7u);
        results[6] = ep_atomic_add_release_sys(&flags[3], 5u);
    } else if (blockIdx.x == 1) {
        const bool sys_ok = ep_wait_flag_sys(&flags[0], 1u, timeout_ns);
        results[0] = sys_ok;
        results[1] = sys_ok && payload[0] == 0xC0FFEEu;
        const bool gpu_ok = ep_wait_flag_gpu(&flags[1], 7u, timeout_ns);
        results[2] = gpu_ok;
        results[3] = gpu_ok && payload[1] == 0xBEEFu;
        const ep_u64 start = ep_globaltimer_ns();
        results[4] = ep_wait_flag_sys(&flags[2], 1u, timeout_ns);
        results[5] = ep_globaltimer_ns() - start >= timeout_ns;
        results[7] = ep_wait_flag_sys(&flags[3], 5u, timeout_ns) ? ep_load_acquire_sys(&flags[3]) : 0u;
    }
}
