// Device-to-device byte copy, used to measure copy bandwidth (the ceiling for LL and HT
// data movement) and as the smallest end-to-end check of compile → load → launch.

#ifndef EP_COPY_UNROLL
#define EP_COPY_UNROLL 4  // 16-byte vectors in flight per thread per loop step
#endif

// Grid-stride copy of `bytes` bytes. When both pointers are 16-byte aligned the body moves
// 16-byte vectors (consecutive threads take consecutive vectors, so warps stay coalesced),
// and the last `bytes % 16` bytes are copied one by one; otherwise every byte is.
extern "C" __global__ void ep_copy_bytes(ep_u8* __restrict__ dst, const ep_u8* __restrict__ src, ep_u64 bytes) {
    const ep_u64 thread = ep_grid_thread();
    const ep_u64 threads = ep_grid_threads();
    ep_u64 tail_start = 0;
    if (ep_is_aligned16(dst) && ep_is_aligned16(src)) {
        const ep_u64 vectors = bytes / 16;
        const ep_vec16* in = reinterpret_cast<const ep_vec16*>(src);
        ep_vec16* out = reinterpret_cast<ep_vec16*>(dst);
        ep_u64 i = thread;
        for (; i + (EP_COPY_UNROLL - 1) * threads < vectors; i += EP_COPY_UNROLL * threads) {
            ep_vec16 v[EP_COPY_UNROLL];
#pragma unroll
            for (int u = 0; u < EP_COPY_UNROLL; ++u) v[u] = ep_load16_nc(in + i + u * threads);
#pragma unroll
            for (int u = 0; u < EP_COPY_UNROLL; ++u) ep_store16_na(out + i + u * threads, v[u]);
        }
        for (; i < vectors; i += threads) ep_store16_na(out + i, ep_load16_nc(in + i));
        tail_start = vectors * 16;
    }
    for (ep_u64 i = tail_start + thread; i < bytes; i += threads) dst[i] = src[i];
}
