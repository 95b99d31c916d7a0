// Dispatch's row stores by the bulk-copy engine (TMA, sm_90 and up), two ways:
// - rows moved as they are (EP_HT_BULK, EP_LL_BULK): a warp's row pieces are loaded into shared
//   memory in chunks of CHUNK bytes (one bulk load each, lane 0), and each lane with a destination
//   stores the chunk there (one bulk store each). The warp's chunks are one stream across its
//   items, EP_BULK_STAGES in flight, so the next item's first chunks load while this item's last
//   ones are stored. The bytes are the ones ep_copy_piece moves; only the engine differs.
// - FP8 quantised in the kernel (EP_FP8_BULK): the warp writes a chunk's codes to shared memory
//   and each lane with a destination stores them there in one bulk store, instead of every lane
//   storing 16 bytes to every destination (ep_fp8_send_chunk in ep_wire.cuh).
// The HT dispatch is write-bound (each row is read once and written to about five ranks): on an
// H100, a probe of ht-4k's traffic moved it at 88 % of the copy floor with 16-byte stores from
// registers and 90 % with bulk stores (scripts/write-heavy-copy.cu, session 49). Each switch is off
// until measured on the GPU machine (`bash scripts/device-verify bulk`; docs/performance.md,
// "Trying a kernel variant").

#ifndef EP_HT_BULK
#define EP_HT_BULK 0          // HT dispatch (ep_ht.cu)
#endif
#ifndef EP_LL_BULK
#define EP_LL_BULK 0          // LL dispatch (ep_ll.cu), where its stages fit (EP_LL_BULK_FITS, the host's word)
#endif
#ifndef EP_FP8_BULK
#define EP_FP8_BULK 0         // FP8 quantised in the kernel (HT; LL where EP_LL_BULK_FITS)
#endif
#ifndef EP_LL_BULK_FITS
#define EP_LL_BULK_FITS 0
#endif
#define EP_HT_BULK_BYTES 1024  // a chunk: 2 stages × 16 warps × 1 KB beside the warp tables fits 48 KB
#define EP_LL_BULK_BYTES 512   // beside the fused LL kernel's update arrays
#define EP_BULK_STAGES 2
// Every address 16-byte aligned, every rank on this GPU (the stores are plain global writes of
// this device), and a chip with the engine; rows moved as they are (EP_BULK_CAN) or quantised
// here (EP_FP8_BULK_ON: HT, or LL where the stages fit beside the fused launch's arrays).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && EP_VEC_BYTES == 16 && EP_TRANSPORT == 0 && EP_ONE_DEVICE
#define EP_BULK_ENGINE 1
#else
#define EP_BULK_ENGINE 0
#endif
#if defined(EP_HT) && EP_HT
#define EP_BULK_HT 1
#else
#define EP_BULK_HT 0
#endif
#define EP_BULK_CAN (EP_BULK_ENGINE && EP_FP8 != 1)
#define EP_FP8_BULK_ON (EP_BULK_ENGINE && EP_FP8 == 1 && EP_FP8_BULK && (EP_BULK_HT || EP_LL_BULK_FITS))

#if EP_BULK_ENGINE
EP_DEVICE ep_u32 ep_shared_address(const void* p) { return static_cast<ep_u32>(__cvta_generic_to_shared(p)); }

// Every bulk store of this lane's has landed, and is ordered before its later generic accesses
// (the arrival's fence and flags that tell peers the rows are there). Call from every lane.
EP_DEVICE void ep_bulk_end() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
}
#endif

#if EP_FP8_BULK_ON
// A warp's two stages of quantised codes (one chunk: EP_FP8_CHUNK_BYTES) and the count of chunks
// it has staged, whose parity picks the stage (the stage of the chunk before the last is free once
// this lane's bulk stores of it have read it: at most one group, the last chunk's, still reading).
#define EP_FP8_CHUNK_BYTES 512   // EP_FP8_CHUNK e4m3 codes (ep_wire.cuh)
struct EpFp8Stages {
    alignas(128) ep_u8 codes[EP_WARPS][2][EP_FP8_CHUNK_BYTES];
    int staged[EP_WARPS];
};
__shared__ EpFp8Stages ep_fp8_stages;   // the dispatch kernels' that quantise

// Before a warp's first chunk (every lane; the count's start is any value, but a read of shared
// memory nothing wrote is a finding of compute-sanitizer's initcheck).
EP_DEVICE void ep_fp8_stages_begin(int warp, int lane) {
    if (lane == 0) ep_fp8_stages.staged[warp] = 0;
    __syncwarp();
}

// Stores this lane's 16 codes of a chunk at byte `at` of it (inside: the lane's elements are in
// the row) into the warp's next stage, then each lane c < fanout whose slot `destination[c]` (the
// warp's table of destination rows) is not null stores the chunk's `bytes` there at byte `offset`
// of the row. The slot is read only after the stage is written, so its address is not held in
// registers across the waits. Call from every lane.
EP_DEVICE void ep_fp8_bulk_store(int warp, int lane, bool inside, int at, const ep_vec& codes, const ep_u64* destination,
                                 int fanout, int offset, int bytes) {
    const int n = ep_fp8_stages.staged[warp];
    ep_u8* stage = ep_fp8_stages.codes[warp][n & 1];
    asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");   // this stage's last stores (two chunks ago) have read it
    __syncwarp();   // every lane has read the count and waited
    if (lane == 0) ep_fp8_stages.staged[warp] = n + 1;   // seen by every lane after the barrier below
    if (inside) *reinterpret_cast<ep_vec*>(stage + at) = codes;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");     // the generic writes, before the engine reads them
    __syncwarp();
    const ep_u64 target = lane < fanout ? destination[lane] : 0ull;
    if (target != 0ull) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     :: "l"(target + static_cast<ep_u64>(offset)), "r"(ep_shared_address(stage)), "r"(bytes) : "memory");
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
#endif

#if EP_BULK_CAN
template <int CHUNK>
struct EpBulkStages {
    static_assert(CHUNK % 16 == 0, "bulk chunks are whole 16-byte units");
    alignas(128) ep_u8 bytes[EP_WARPS][EP_BULK_STAGES][CHUNK];
    ep_u64 barrier[EP_WARPS][EP_BULK_STAGES];
};

EP_DEVICE void ep_bulk_wait_phase(ep_u64* barrier, ep_u32 parity) {
    asm volatile("{\n.reg .pred done;\nEP_BULK_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra EP_BULK_WAIT;\n}"
                 :: "r"(ep_shared_address(barrier)), "r"(parity) : "memory");
}

// One warp's stream of chunks: position q is chunk q % chunks of the warp's item q / chunks (its
// items are first, first + stride, ... below `items`; item i is piece i % slices of token
// i / slices). Every item has `chunks` positions; those past its piece's bytes move nothing.
template <int CHUNK>
struct EpBulkStream {
    const ep_u8* rows;   // the rank's source rows
    int first, stride, items, slices, per_slice, chunks;

    __device__ __forceinline__ int item(int q) const { return first + (q / chunks) * stride; }
    // Bytes of position q's chunk (0: none) and its offset in the wire row.
    __device__ __forceinline__ int bytes(int q, ep_u64& offset) const {
        const int i = item(q), piece = i % slices;
        const int start = piece * per_slice, end = min(EP_WIRE_VECS, start + per_slice);
        const int at = (q % chunks) * CHUNK, piece_bytes = (end - start) * EP_VEC_BYTES;
        offset = static_cast<ep_u64>(start) * EP_VEC_BYTES + at;
        return max(0, min(CHUNK, piece_bytes - at));
    }
};

// Starts the load of position q into its stage (lane 0; the stage's last stores have read it).
template <int CHUNK>
EP_DEVICE void ep_bulk_issue(EpBulkStages<CHUNK>& stages, int warp, const EpBulkStream<CHUNK>& s, int q, int lane) {
    if (lane != 0 || s.item(q) >= s.items) return;
    ep_u64 offset;
    const int bytes = s.bytes(q, offset);
    const int stage = q % EP_BULK_STAGES;
    ep_u64* barrier = &stages.barrier[warp][stage];
    const ep_u32 bar = ep_shared_address(barrier);
    if (bytes == 0) {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
        return;
    }
    const ep_u8* src = s.rows + static_cast<ep_u64>(s.item(q) / s.slices) * EP_WIRE_BYTES + offset;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(ep_shared_address(stages.bytes[warp][stage])), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// The warp's barriers, and its stream's first EP_BULK_STAGES loads. Call from every lane, once.
template <int CHUNK>
EP_DEVICE void ep_bulk_begin(EpBulkStages<CHUNK>& stages, int warp, const EpBulkStream<CHUNK>& s, int lane) {
    if (lane == 0) {
        for (int i = 0; i < EP_BULK_STAGES; ++i) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(ep_shared_address(&stages.barrier[warp][i])) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    for (int q = 0; q < EP_BULK_STAGES; ++q) ep_bulk_issue(stages, warp, s, q, lane);
}

// Stores the chunks of the warp's k-th item (positions k·chunks …) to `target` (this lane's
// destination row, null: none), refilling each stage with the position EP_BULK_STAGES ahead once
// its stores have read it. Call from every lane.
template <int CHUNK>
EP_DEVICE void ep_bulk_send_item(EpBulkStages<CHUNK>& stages, int warp, const EpBulkStream<CHUNK>& s, int k, ep_u8* target, int lane) {
    for (int c = 0; c < s.chunks; ++c) {
        const int q = k * s.chunks + c, stage = q % EP_BULK_STAGES;
        ep_u64 offset;
        const int bytes = s.bytes(q, offset);
        ep_bulk_wait_phase(&stages.barrier[warp][stage], static_cast<ep_u32>((q / EP_BULK_STAGES) & 1));
        if (target != nullptr && bytes > 0) {
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                         :: "l"(target + offset), "r"(ep_shared_address(stages.bytes[warp][stage])), "r"(bytes) : "memory");
        }
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        __syncwarp();
        ep_bulk_issue(stages, warp, s, q + EP_BULK_STAGES, lane);
    }
}

#endif
