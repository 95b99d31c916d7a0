// The HT dispatch's row stores by the bulk-copy engine (TMA, sm_90 and up; EP_HT_BULK): a warp's
// row pieces are loaded into shared memory in chunks of CHUNK bytes (one bulk load each, lane 0),
// and each lane with a destination stores the chunk there (one bulk store each). The warp's chunks
// are one stream across its items, EP_BULK_STAGES in flight, so the next item's first chunks load
// while this item's last ones are stored. The bytes are the ones ep_copy_piece moves; only the
// engine differs.
// The HT dispatch is write-bound (each row is read once and written to about five ranks): on an
// H100, a probe of ht-4k's traffic moved it at 88 % of the copy floor with 16-byte stores from
// registers and 90 % with bulk stores (scripts/write-heavy-copy.cu, session 49). In the library the
// switch measured slower on an H100 (session 50: ht-4k dispatch +1.2 %, ht-std +0.8 %, skewed +1.3 %),
// so it is off; `bash scripts/device-verify bulk` measures it beside the default. The same engine
// for the LL dispatch (+8 to +14 %) and for FP8 codes quantised in the kernel (+17 to +26 %) measured
// slower still and was removed (docs/performance.md, "Tried and did not help").
// Each bulk store is one instruction of uniform operands: a lane-varying destination compiles to a
// loop over the lanes (R2UR, UBLKCP, BRA.U.ANY), one destination at a time.

#ifndef EP_HT_BULK
#define EP_HT_BULK 0          // HT dispatch (ep_ht.cu)
#endif
#define EP_HT_BULK_BYTES 1024  // a chunk: 2 stages × 16 warps × 1 KB beside the warp tables fits 48 KB
#define EP_BULK_STAGES 2
// Every address 16-byte aligned, every rank on this GPU (the stores are plain global writes of
// this device), a chip with the engine, and rows moved as they are (not quantised here).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && EP_VEC_BYTES == 16 && EP_TRANSPORT == 0 && EP_ONE_DEVICE && EP_FP8 != 1
#define EP_BULK_CAN 1
#else
#define EP_BULK_CAN 0
#endif

#if EP_BULK_CAN
EP_DEVICE ep_u32 ep_shared_address(const void* p) { return static_cast<ep_u32>(__cvta_generic_to_shared(p)); }

// Every bulk store of this lane's has landed, and is ordered before its later generic accesses
// (the arrival's fence and flags that tell peers the rows are there). Call from every lane.
EP_DEVICE void ep_bulk_end() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

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
