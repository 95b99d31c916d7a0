// The step machinery shared by the LL and HT kernels: the compile-time shape, the argument
// block (every rank's buffer addresses: the peer table), the workspace words all algorithms
// use, status codes, flags between ranks, row vectors and element conversion.

#ifndef EP_R
#define EP_R 8            // ranks
#endif
#ifndef EP_L
#define EP_L 32           // local experts per rank
#endif
#ifndef EP_K
#define EP_K 8            // top-k
#endif
#ifndef EP_BMAX
#define EP_BMAX 128       // max tokens per rank
#endif
#ifndef EP_ROW_BYTES
#define EP_ROW_BYTES 14336  // hidden × element size
#endif
#ifndef EP_ELEM
#define EP_ELEM 0         // 0 bf16, 1 f16, 2 f32, 3 raw bytes (dispatch only)
#endif
#ifndef EP_IDX_BYTES
#define EP_IDX_BYTES 4    // topk_idx input: int32 or int64
#endif
#ifndef EP_RIDX_BYTES
#define EP_RIDX_BYTES 4   // received idx output: int32 or int64
#endif
#ifndef EP_VEC_BYTES
#define EP_VEC_BYTES 16   // 16 when every row address is 16-byte aligned, else 8
#endif
#ifndef EP_FP8
#define EP_FP8 0          // dispatch rows: 0 as given; FP8 (docs/fp8.md): 1 quantised here, 2 the caller's e4m3 + scales
#endif
#ifndef EP_FP8_BLOCK
#define EP_FP8_BLOCK 128  // FP8: elements per scale (128, or 32 for E8M0)
#endif
#ifndef EP_FP8_POW2
#define EP_FP8_POW2 0     // FP8: 0 float32 scales, 1 power-of-two exponent bytes packed 4 to a word
#endif


#define EP_E (EP_R * EP_L)

// Workspace of one rank, in 32-bit words: the group's words, shared by every step (sequence
// numbers, status, flags between ranks, the update's all-gathered counts). Each algorithm's
// kernel file adds its own after WS_COUNTS. What one step derives from its routing (slots,
// layout) lives in that step's handle (H_* words below), so several steps can be in flight.
// The host computes the same offsets (StepWorkspace.swift) and passes them as EP_HOST_* defines,
// checked below: a mismatch fails to compile.
#define WS_SEQ 0                          // updates begun on this rank (picks the count table's parity)
#define WS_STATUS 1                       // [4] code, a, b, c: first error since the host last read it
#define WS_DISP_CALLS 5                   // dispatch calls that published flags (their sequence number)
                                          // word 6 is unused
#define WS_DISP_BLOCKS 7                  // this rank's dispatch blocks finished (reset by the last)
#define WS_COMB_BLOCKS 8                  // this rank's combine blocks finished (reset by the last)
#define WS_COMB_CALLS 9                   // combine calls that published flags (their sequence number)
#define WS_COUNT_FLAG 10                  // [R] seq*2 + bad, written by source s after its counts
#define WS_DISP_DONE (WS_COUNT_FLAG + EP_R)   // [R] dispatch call number once source s finished writing here
#define WS_COMB_DONE (WS_DISP_DONE + EP_R)    // [R] combine call number once source s finished reading here
#define WS_COMB_READY (WS_COMB_DONE + EP_R)   // [R] combine call number once peer p's expert outputs may be read
#define WS_COUNTS (WS_COMB_READY + EP_R)      // [2][R][E + R] counts all-gathered, by update parity

// A step's handle, per rank, in 32-bit words: written by the update, read by that rank's own
// dispatch and combine only (never by a peer), so it needs no sharing between processes.
#define H_STEP_OK 0                       // 1 when every rank's routing of the step was valid
#define H_SEQ 1                           // the update's sequence number (for debugging)
#define H_READY 2                         // fused update + dispatch: 1 once this rank's update block is done
#define H_TICKET 3                        // fused: blocks of the launch started (the first local rank's words)
#define H_PASSED 4                        // fused: blocks of the launch past the ready wait (first local rank's)
#define H_COMMON 5                        // each algorithm's own words start here

// What a launch does besides moving data. One launch covering every rank needs none of it
// (the launch's end is the barrier); separate launches per rank and split calls (send-only,
// then complete) meet through these flags.
#define EP_SYNC_SIGNAL 1   // dispatch: announce arrival to each destination; combine: announce ready
#define EP_SYNC_WAIT 2     // dispatch: wait for every source's arrival; combine: wait until peers are ready
#define EP_SYNC_NO_DATA 4  // only the flags: the send-only half of combine, the complete half of dispatch
#define EP_SYNC_DONE 8     // combine: tell each peer its rows were read, and wait until ours were

#define EP_STATUS_INDEX_RANGE 1   // a = token, b = column, c = value (low 32 bits)
#define EP_STATUS_REPEATED 2      // a = token, b = first column << 16 | second column, c = expert
#define EP_STATUS_TIMEOUT 3       // a = missing peer
#define EP_STATUS_PEER_FAILED 4   // a = peer whose routing was invalid
#define EP_STATUS_OVERFLOW 5      // a = destination rank, b = rows required, c = capacity

// The kernels' one parameter. Every field is 8 bytes, so field i sits at byte 8 i: the X-macro
// lists fix the order, and the host (StepArguments.swift) fills the fields by the same names at
// offsets it passes as EP_OFF_* defines, checked below.
#define EP_RANK_FIELDS(F)                                                                           \
    F(ep_u64, x, X)                       /* dispatch: [B, H] rows */                               \
    F(ep_u64, topk_idx, TOPK_IDX)         /* [B, K] */                                              \
    F(ep_u64, topk_weights, TOPK_WEIGHTS) /* [B, K] f32 of this rank (dispatch; LL expert-major     \
                                             combine), or, in HT expert-major combine, each        \
                                             destination's per-slot weights [N] */                 \
    F(ep_u64, recv, RECV)                 /* dispatch output / combine input (expert outputs) */    \
    F(ep_u64, recv_idx, RECV_IDX)         /* received local ids */                                  \
    F(ep_u64, recv_weights, RECV_WEIGHTS) /* received weights, f32 */                               \
    F(ep_u64, out, OUT)                   /* combine output [B, H] */                               \
    F(ep_u64, workspace, WORKSPACE)       /* the group's WS_* words of this rank */                 \
    F(ep_i64, tokens, TOKENS)             /* B of this rank in this step */                         \
    F(ep_u64, weight_grads_in, WEIGHT_GRADS_IN)   /* HT backward combine: per received row/slot */  \
    F(ep_u64, weight_grads_out, WEIGHT_GRADS_OUT) /* HT backward combine: [B, K] f32 */             \
    F(ep_u64, handle, HANDLE)             /* the step's H_* words of this rank */                   \
    F(ep_u64, stage, STAGE)               /* staged transport: this rank's EpStage (ep_transport.cuh) */   \
    F(ep_u64, counts, COUNTS)             /* dispatch: [L] int32 rows per local expert, or 0 */            \
    F(ep_u64, source_counts, SOURCE_COUNTS) /* dispatch: [L][R] int32 rows per (expert, source), or 0 */          \
    F(ep_u64, scales, SCALES)             /* FP8 pass-through dispatch: [B, EP_SCALE_WORDS] scales of x */  \
    F(ep_u64, recv_scales, RECV_SCALES)   /* FP8 dispatch: the received rows' scale words */

#define EP_LAUNCH_FIELDS(F)                                                                         \
    F(ep_u64, mask, MASK)                 /* the group's active-rank mask (u64 in device memory) */ \
    F(ep_u64, timeout_ns, TIMEOUT_NS)                                                               \
    F(ep_i64, first_rank, FIRST_RANK)     /* rank of blockIdx.y == 0 */                             \
    F(ep_i64, sync, SYNC)                 /* EP_SYNC_* bits: which flags this launch publishes */   \
    F(ep_i64, weighted, WEIGHTED)         /* combine: apply topk_weights (forward, expert-major) */ \
    F(ep_i64, slices, SLICES)             /* pieces each row is cut into; a warp moves one piece */

#define EP_DECLARE_FIELD(type, name, NAME) type name;
#define EP_FIELD_INDEX(type, name, NAME) EP_INDEX_##NAME,
#define EP_FIELD_IS_A_WORD(type, name, NAME) static_assert(sizeof(type) == 8, #name " must be 8 bytes");

struct EpRankArgs { EP_RANK_FIELDS(EP_DECLARE_FIELD) };
enum EpRankFieldIndex { EP_RANK_FIELDS(EP_FIELD_INDEX) EP_RANK_FIELD_COUNT };

struct EpArgs {
    EpRankArgs rank[EP_R];
    EP_LAUNCH_FIELDS(EP_DECLARE_FIELD)
};
enum EpLaunchFieldIndex { EP_LAUNCH_FIELDS(EP_FIELD_INDEX) EP_LAUNCH_FIELD_COUNT };

EP_RANK_FIELDS(EP_FIELD_IS_A_WORD)
EP_LAUNCH_FIELDS(EP_FIELD_IS_A_WORD)
static_assert(sizeof(EpRankArgs) == 8 * EP_RANK_FIELD_COUNT, "EpRankArgs has padding");
static_assert(sizeof(EpArgs) == sizeof(EpRankArgs) * EP_R + 8 * EP_LAUNCH_FIELD_COUNT, "EpArgs has padding");

// The host's view, when it passes one (EP_HOST_CONTRACT): every field where the host writes it,
// and the constants both sides use.
#ifdef EP_HOST_CONTRACT
#define EP_CHECK_RANK_FIELD(type, name, NAME) \
    static_assert(8 * EP_INDEX_##NAME == EP_OFF_RANK_##NAME, "EpRankArgs." #name " is not at the offset the host writes (EP_OFF_RANK_" #NAME ")");
#define EP_CHECK_LAUNCH_FIELD(type, name, NAME) \
    static_assert(sizeof(EpRankArgs) * EP_R + 8 * EP_INDEX_##NAME == EP_OFF_##NAME, "EpArgs." #name " is not at the offset the host writes (EP_OFF_" #NAME ")");
EP_RANK_FIELDS(EP_CHECK_RANK_FIELD)
EP_LAUNCH_FIELDS(EP_CHECK_LAUNCH_FIELD)
static_assert(sizeof(EpRankArgs) == EP_RANK_ARGS_BYTES, "EpRankArgs size differs from the host's (EP_RANK_ARGS_BYTES)");
static_assert(sizeof(EpArgs) == EP_ARGS_BYTES, "EpArgs size differs from the host's (EP_ARGS_BYTES)");
static_assert(WS_STATUS == EP_HOST_WS_STATUS, "WS_STATUS differs from the host's");
static_assert(WS_DISP_CALLS == EP_HOST_WS_DISP_CALLS, "WS_DISP_CALLS differs from the host's");
static_assert(WS_COMB_CALLS == EP_HOST_WS_COMB_CALLS, "WS_COMB_CALLS differs from the host's");
static_assert(WS_COUNTS == EP_HOST_WS_COUNTS, "WS_COUNTS differs from the host's");
static_assert(H_STEP_OK == EP_HOST_H_STEP_OK, "H_STEP_OK differs from the host's");
static_assert(H_COMMON == EP_HOST_H_COMMON, "H_COMMON differs from the host's");
#endif

// Each algorithm's file checks its own words once it has defined them (WS_WORDS, H_LAYOUT,
// H_ORIGIN; the staged transport keeps one origin word per receive row after H_ORIGIN).
#ifdef EP_HOST_CONTRACT
#define EP_CHECK_ALGORITHM_CONTRACT(NAME, UPDATE_WARPS, RECEIVE_ROWS)                                               \
    static_assert(WS_WORDS == EP_HOST_WS_WORDS, NAME " WS_WORDS differs from the host's");                          \
    static_assert(H_LAYOUT == EP_HOST_H_LAYOUT, NAME " H_LAYOUT differs from the host's");                          \
    static_assert(H_ORIGIN + (EP_TRANSPORT == 1 ? (RECEIVE_ROWS) : 0) == EP_HOST_H_WORDS, NAME " H_WORDS differs from the host's"); \
    static_assert((UPDATE_WARPS) * 32 == EP_HOST_UPDATE_THREADS, NAME " update threads differ from the host's");
#else
#define EP_CHECK_ALGORITHM_CONTRACT(NAME, UPDATE_WARPS, RECEIVE_ROWS)
#endif

// Which of its rank's blocks this block is, and how many the rank has in the launch: the grid's
// x (every kernel but the fused update + dispatch, which places its blocks by arrival).
struct EpBlock {
    int index;
    int count;
};
EP_DEVICE EpBlock ep_grid_block() { return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x)}; }

EP_DEVICE ep_u32* ep_ws(const EpArgs& args, int rank) {
    return reinterpret_cast<ep_u32*>(args.rank[rank].workspace);
}

// This rank's words of the call's handle (H_*).
EP_DEVICE ep_u32* ep_hs(const EpArgs& args, int rank) {
    return reinterpret_cast<ep_u32*>(args.rank[rank].handle);
}

EP_DEVICE bool ep_active(ep_u64 mask, int rank) { return (mask >> rank) & 1ull; }

EP_DEVICE ep_u64 ep_load_mask(const EpArgs& args) {
    return *reinterpret_cast<volatile ep_u64*>(args.mask);
}

// The mask as one value for the whole block (thread 0 loads it; call from every thread, at a
// point every thread reaches). Where a block branches on the mask, a peer masking a rank between
// two threads' loads must not split the block.
EP_DEVICE ep_u64 ep_block_mask(const EpArgs& args) {
    __shared__ ep_u64 value;
    __syncthreads();   // an earlier call's value has been read by every thread
    if (threadIdx.x == 0) value = ep_load_mask(args);
    __syncthreads();
    return value;
}

// Records the first error of a step on `rank` (later ones keep the first).
EP_DEVICE void ep_set_status(ep_u32* ws, ep_u32 code, ep_u32 a, ep_u32 b, ep_u32 c) {
    if (atomicCAS(ws + WS_STATUS, 0u, code) == 0u) {
        ws[WS_STATUS + 1] = a;
        ws[WS_STATUS + 2] = b;
        ws[WS_STATUS + 3] = c;
    }
}

// A peer that missed the timeout leaves the mask; this rank notes it and carries on.
EP_DEVICE void ep_timeout(const EpArgs& args, ep_u32* ws, int peer) {
    atomicAnd(reinterpret_cast<unsigned long long*>(args.mask), ~(1ull << peer));
    ep_set_status(ws, EP_STATUS_TIMEOUT, static_cast<ep_u32>(peer), 0, 0);
}

EP_DEVICE long long ep_read_index(const EpArgs& args, int rank, int flat) {
#if EP_IDX_BYTES == 8
    return reinterpret_cast<const long long*>(args.rank[rank].topk_idx)[flat];
#else
    return reinterpret_cast<const int*>(args.rank[rank].topk_idx)[flat];
#endif
}

// ------------------------------------------------------------------------------------------
// Vectors of a row.

// Rows' loads: 0 the read-only path (ld.global.nc), 1 L2 only (.cg), 2 through L1 (.ca; for
// trying only). An H200 (docs/performance.md, session 16): HT's bulk copies and sums are faster
// through .cg (ht-4k R = 8 dispatch 484.7 → 473.9 µs, combine 429.4 → 415.3), LL's combine through
// .nc (ll-std R = 8 38.9 against 41.5); the small LL kernels do not tell them apart.
#ifndef EP_ROW_LOADS
#if defined(EP_HT) && EP_HT
#define EP_ROW_LOADS 1
#else
#define EP_ROW_LOADS 0
#endif
#endif
#if EP_VEC_BYTES == 16
typedef ep_vec16 ep_vec;
EP_DEVICE ep_vec16 ep_load_row16(const void* p) {
    return EP_ROW_LOADS == 1 ? ep_load16_cg(p) : EP_ROW_LOADS == 2 ? ep_load16_ca(p) : ep_load16_nc(p);
}
EP_DEVICE ep_vec ep_load_vec(const void* p) { return ep_load_row16(p); }
// Expert outputs are final before combine starts (kernel boundary, or the peer's ready flag
// in separate launches), so the read-only path (LL's) is used on one device; it bypasses L1, so
// nothing goes stale, as nothing does through L2 only (HT's). An NCCL rank's peers write their
// expert outputs while its combine already runs (it waits for their ready flags): data the
// kernel sees change is not read-only for its lifetime, which ld.global.nc requires, so such
// ranks read through L2 only.
#if defined(EP_ONE_DEVICE) && EP_ONE_DEVICE
EP_DEVICE ep_vec ep_load_vec_peer(const void* p) { return ep_load_row16(p); }
#else
EP_DEVICE ep_vec ep_load_vec_peer(const void* p) { return ep_load16_cg(p); }
#endif
EP_DEVICE void ep_store_vec(void* p, ep_vec v) { ep_store16_na(p, v); }
#else
struct __align__(8) ep_vec8 { ep_u32 x, y; };
typedef ep_vec8 ep_vec;
EP_DEVICE ep_vec ep_load_vec(const void* p) { return *static_cast<const ep_vec8*>(p); }
EP_DEVICE ep_vec ep_load_vec_peer(const void* p) { return *static_cast<const ep_vec8*>(p); }
EP_DEVICE void ep_store_vec(void* p, ep_vec v) { *static_cast<ep_vec8*>(p) = v; }
#endif
#define EP_ROW_VECS (EP_ROW_BYTES / EP_VEC_BYTES)

// The row as dispatch moves it (the wire row): the element row itself, or with FP8 its hidden
// e4m3 bytes, with EP_SCALE_WORDS 4-byte scale words beside it (ep_wire.cuh). Combine's rows
// are always element rows (EP_ROW_BYTES).
#if EP_ELEM == 2
#define EP_ELEM_BYTES 4
#elif EP_ELEM == 3
#define EP_ELEM_BYTES 1
#else
#define EP_ELEM_BYTES 2
#endif
#define EP_HIDDEN (EP_ROW_BYTES / EP_ELEM_BYTES)
#if EP_FP8
#define EP_WIRE_BYTES EP_HIDDEN
#if EP_FP8_POW2
#define EP_SCALE_WORDS ((EP_HIDDEN / EP_FP8_BLOCK + 3) / 4)
#else
#define EP_SCALE_WORDS (EP_HIDDEN / EP_FP8_BLOCK)
#endif
static_assert(EP_ELEM != 3, "FP8 dispatch needs bf16, f16 or f32 elements");
static_assert(EP_HIDDEN % EP_FP8_BLOCK == 0 && EP_HIDDEN % 32 == 0, "FP8: hidden must be a multiple of the scale block");
static_assert(EP_FP8_BLOCK == 128 || EP_FP8_BLOCK == 32, "FP8: blocks of 128 or 32 elements");
#else
#define EP_WIRE_BYTES EP_ROW_BYTES
#define EP_SCALE_WORDS 0
#endif
#define EP_WIRE_VECS (EP_WIRE_BYTES / EP_VEC_BYTES)
#if defined(EP_HOST_CONTRACT) && EP_FP8
static_assert(EP_SCALE_WORDS == EP_HOST_SCALE_WORDS, "FP8 scale words per row differ from the host's");
#endif
#ifndef EP_UNROLL
#define EP_UNROLL 4       // dispatch pipeline depth: vectors per lane loaded before they are stored
#endif
#ifndef EP_DEST_GROUP
#define EP_DEST_GROUP 1   // dispatch: destinations whose addresses a lane reads before storing to them
#endif
#define EP_WARPS 16       // warps per dispatch/combine block (512 threads)
#ifdef EP_HOST_CONTRACT
static_assert(EP_WARPS * 32 == EP_HOST_THREADS, "dispatch/combine threads per block differ from the host's");
#endif
#ifndef EP_CHUNK
#define EP_CHUNK 8        // combine: rows loaded before the first use
#endif

// An NCCL rank's combine from a caller's expert outputs (args.rank[].x): copies the rows of this
// rank's step that its peers read into the buffer they read (recv), and nothing else: `zones`
// zones, zone z `count(hs, z)` rows (hs: the step's words) from row `first(z)`. The buffer is
// sized for the worst case (ll-std at one rank: 470 MB, of which a step uses 15 MB). The body
// of each algorithm's copy kernel; `count` bounds its counts by the zone's rows (ranks whose
// masks disagree may count more).
template <typename First, typename Count>
EP_DEVICE void ep_copy_received(const EpArgs& args, int zones, First first, Count count) {
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    const ep_u32* hs = ep_hs(args, rank);
    if (hs[H_STEP_OK] == 0) return;   // nothing was received, and nobody reads
    ep_u8* __restrict__ dst = reinterpret_cast<ep_u8*>(args.rank[rank].recv);
    const ep_u8* __restrict__ src = reinterpret_cast<const ep_u8*>(args.rank[rank].x);
    const ep_u64 threads = ep_grid_threads();
    if (zones == 1) {
        // One zone (HT's rows in use; rank-major at one rank): one contiguous range, every thread
        // of the grid on consecutive vectors, EP_UNROLL in flight (ep_copy_bytes's loop).
        const ep_u64 vectors = static_cast<ep_u64>(count(hs, 0)) * EP_ROW_VECS;
        const ep_u64 base = static_cast<ep_u64>(first(0)) * EP_ROW_BYTES;
        for (ep_u64 i = ep_grid_thread(); i < vectors; i += EP_UNROLL * threads) {
            ep_vec values[EP_UNROLL];
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) {
                if (i + u * threads < vectors) values[u] = ep_load_vec(src + base + (i + u * threads) * EP_VEC_BYTES);
            }
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) {
                if (i + u * threads < vectors) ep_store_vec(dst + base + (i + u * threads) * EP_VEC_BYTES, values[u]);
            }
        }
        return;
    }
    // Many zones of few rows (LL expert-major: ll-std at one rank 256 zones of ~4 rows): a warp
    // per row.
    __shared__ int longest;
    if (threadIdx.x == 0) longest = 0;
    __syncthreads();
    for (int z = threadIdx.x; z < zones; z += blockDim.x) atomicMax(&longest, count(hs, z));
    __syncthreads();
    const int rows = longest, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int item = blockIdx.x * warps + threadIdx.x / 32; item < zones * rows; item += gridDim.x * warps) {
        const int z = item % zones, j = item / zones;
        if (j >= count(hs, z)) continue;
        const ep_u64 offset = static_cast<ep_u64>(first(z) + j) * EP_ROW_BYTES;
        const ep_u8* from = src + offset;
        ep_u8* to = dst + offset;
        int v = lane;
        for (; v + 32 * (EP_UNROLL - 1) < EP_ROW_VECS; v += 32 * EP_UNROLL) {
            ep_vec values[EP_UNROLL];
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) values[u] = ep_load_vec(from + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES);
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) ep_store_vec(to + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES, values[u]);
        }
        for (; v < EP_ROW_VECS; v += 32) ep_store_vec(to + static_cast<ep_u64>(v) * EP_VEC_BYTES, ep_load_vec(from + static_cast<ep_u64>(v) * EP_VEC_BYTES));
    }
}

// Each lane of a warp publishes one row address (and weight) for its warp to read back by
// index: the table lives in shared memory, not in K registers per lane, so large top-k does
// not spill and two 512-thread blocks fit on an SM.
struct EpWarpRows {
    ep_u64 address[EP_WARPS][32];
    float weight[EP_WARPS][32];
#if EP_FP8
    ep_u64 scales[EP_WARPS][32];   // dispatch: where each row's scale words go (null: none)
#endif
};

// Destinations [c0, c0 + EP_DEST_GROUP) of a warp's table (0 past `fanout`), read at once before
// the stores to them: each store is an asm the compiler may not move a shared read across, so
// with a group of 1 every destination waits on its own read (45 % of the FP8 ll-std R = 8
// dispatch's stall samples). Groups of 2, 4 or 8 did not make that dispatch faster and made the
// bf16 LL dispatch 2-4 % slower (docs/performance.md), so 1 is the default.
EP_DEVICE void ep_read_targets(const ep_u64 (&targets)[32], int c0, int fanout, ep_u64 (&dst)[EP_DEST_GROUP]) {
#pragma unroll
    for (int c = 0; c < EP_DEST_GROUP; ++c) dst[c] = c0 + c < fanout ? targets[c0 + c] : 0ull;
}

// Vectors v, v + 32, ... (EP_UNROLL of them, those below `last`) of `values` to each destination
// in `targets` (its first FANOUT entries; null: none).
template <int FANOUT>
EP_DEVICE void ep_store_unrolled(const ep_u64 (&targets)[32], const ep_vec (&values)[EP_UNROLL], int v, int last) {
#pragma unroll
    for (int c0 = 0; c0 < FANOUT; c0 += EP_DEST_GROUP) {
        ep_u64 dst[EP_DEST_GROUP];
        ep_read_targets(targets, c0, FANOUT, dst);
#pragma unroll
        for (int c = 0; c < EP_DEST_GROUP; ++c) {
            if (dst[c] == 0ull) continue;
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) {
                if (v + 32 * u < last) ep_store_vec(reinterpret_cast<ep_u8*>(dst[c]) + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES, values[u]);
            }
        }
    }
}

// Dispatch's copy of one row piece, vectors [first, last) of `src`, to each destination the
// warp published in `targets` (its first FANOUT entries; null: none): each vector is loaded
// once, EP_UNROLL per lane in flight, and stored to every destination. Call from every lane.
template <int FANOUT>
EP_DEVICE void ep_copy_piece(const ep_u8* src, const ep_u64 (&targets)[32], int first, int last, int lane) {
    int v = first + lane;
    for (; v + 32 * (EP_UNROLL - 1) < last; v += 32 * EP_UNROLL) {
        ep_vec values[EP_UNROLL];
#pragma unroll
        for (int u = 0; u < EP_UNROLL; ++u) values[u] = ep_load_vec(src + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES);
        ep_store_unrolled<FANOUT>(targets, values, v, last);   // (every one below `last` here)
    }
    for (; v < last; v += 32) {
        const ep_vec value = ep_load_vec(src + static_cast<ep_u64>(v) * EP_VEC_BYTES);
#pragma unroll
        for (int c = 0; c < FANOUT; ++c) {
            ep_u8* dst = reinterpret_cast<ep_u8*>(targets[c]);
            if (dst != nullptr) ep_store_vec(dst + static_cast<ep_u64>(v) * EP_VEC_BYTES, value);
        }
    }
}

// The first EP_UNROLL vectors a lane copies of the piece [first, last) of `src` (ep_copy_piece's
// first step), loaded ahead of the piece's destinations; ep_store_unrolled(…, first + lane, last) stores them.
EP_DEVICE void ep_load_ahead(const ep_u8* src, ep_vec (&ahead)[EP_UNROLL], int first, int last, int lane) {
#pragma unroll
    for (int u = 0; u < EP_UNROLL; ++u) {
        const int v = first + lane + 32 * u;
        if (v < last) ahead[u] = ep_load_vec(src + static_cast<ep_u64>(v) * EP_VEC_BYTES);
    }
}

// Turns per-warp counts into exclusive prefixes over the warps, in place, and returns the
// total of column i.
template <int WARPS>
EP_DEVICE int ep_warp_prefix(int (&counts)[WARPS][EP_E + EP_R], int i) {
    int running = 0;
    for (int w = 0; w < WARPS; ++w) {
        const int here = counts[w][i];
        counts[w][i] = running;
        running += here;
    }
    return running;
}

#if EP_ELEM == 2
#define EP_ELEMS_PER_VEC (EP_VEC_BYTES / 4)
#else
#define EP_ELEMS_PER_VEC (EP_VEC_BYTES / 2)
#endif

EP_DEVICE float ep_element(const ep_vec& v, int i) {
    const ep_u32* words = reinterpret_cast<const ep_u32*>(&v);
#if EP_ELEM == 2
    return __uint_as_float(words[i]);
#elif EP_ELEM == 1
    return ep_f16_to_float(static_cast<ep_u16>(words[i / 2] >> (16 * (i % 2))));
#else
    return ep_bf16_to_float(static_cast<ep_u16>(words[i / 2] >> (16 * (i % 2))));
#endif
}

EP_DEVICE ep_vec ep_pack(const float* acc) {
    ep_vec v;
    ep_u32* words = reinterpret_cast<ep_u32*>(&v);
#if EP_ELEM == 2
#pragma unroll
    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) words[i] = __float_as_uint(acc[i]);
#else
#pragma unroll
    for (int i = 0; i < EP_ELEMS_PER_VEC / 2; ++i) {
#if EP_ELEM == 1
        words[i] = static_cast<ep_u32>(ep_float_to_f16(acc[2 * i])) | (static_cast<ep_u32>(ep_float_to_f16(acc[2 * i + 1])) << 16);
#else
        words[i] = static_cast<ep_u32>(ep_float_to_bf16(acc[2 * i])) | (static_cast<ep_u32>(ep_float_to_bf16(acc[2 * i + 1])) << 16);
#endif
    }
#endif
    return v;
}

