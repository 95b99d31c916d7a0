// Low-latency (LL) dispatch and combine, for both LL layouts (DESIGN.md, "Two algorithms,
// four layouts"). One launch covers every rank of a virtual group (the rank is blockIdx.y +
// first_rank); each rank's blocks run exactly the code one NCCL rank would, and reach the
// other ranks only through the peer table (their buffer addresses) and flags.
//
// A step is three kernels: ep_ll_update (routing → slots, with the all-gather of counts),
// ep_ll_dispatch (each row written once, straight into its final slot on the destination)
// and ep_ll_combine (each source pulls its rows back and reduces them in a fixed order).
// Slots follow the CPU oracle (RoutingPlan) exactly, so outputs match it bit for bit.

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
#define EP_RIDX_BYTES 4   // rank-major received idx output: int32 or int64
#endif
#ifndef EP_RANK_MAJOR
#define EP_RANK_MAJOR 0   // 0 expert-major, 1 rank-major
#endif
#ifndef EP_VEC_BYTES
#define EP_VEC_BYTES 16   // 16 when every row address is 16-byte aligned, else 8
#endif
#ifndef EP_UPDATE_WARPS
#define EP_UPDATE_WARPS 8
#endif

#define EP_E (EP_R * EP_L)

// Workspace of one rank, in 32-bit words. The host mirrors this layout (LLWorkspace.swift).
#define WS_SEQ 0                          // steps begun by ep_ll_update on this rank
#define WS_STATUS 1                       // [4] code, a, b, c: first error of the last step
#define WS_STEP_OK 5                      // 1 when every rank's routing of the step was valid
#define WS_COMB_READY 6                   // seq once this rank's expert outputs may be read
#define WS_DISP_BLOCKS 7                  // this rank's dispatch blocks finished (reset by the last)
#define WS_COMB_BLOCKS 8                  // this rank's combine blocks finished (reset by the last)
#define WS_COUNT_FLAG 10                  // [R] seq*2 + bad, written by source s after its counts
#define WS_DISP_DONE (WS_COUNT_FLAG + EP_R)   // [R] seq once source s finished writing here
#define WS_COMB_DONE (WS_DISP_DONE + EP_R)    // [R] seq once source s finished reading here
#define WS_COUNTS (WS_COMB_DONE + EP_R)       // [2][R][E + R] counts all-gathered, by step parity
#define WS_SEL_ROW (WS_COUNTS + 2 * EP_R * (EP_E + EP_R))  // [BMAX][K] row of each selection
#define WS_PAIR_ROW (WS_SEL_ROW + EP_BMAX * EP_K)          // [BMAX][R] row of each (token, rank)
#define WS_LAYOUT (WS_PAIR_ROW + EP_BMAX * EP_R)           // [L] experts, [R] sources, [L][R], total
#define WS_WORDS (WS_LAYOUT + EP_L + EP_R + EP_L * EP_R + 1)

// What a launch does besides moving data. One launch covering every rank needs none of it
// (the launch's end is the barrier); separate launches per rank and split calls (send-only,
// then complete) meet through these flags.
#define EP_SYNC_SIGNAL 1   // dispatch: announce arrival to each destination; combine: announce ready
#define EP_SYNC_WAIT 2     // dispatch: wait for every source's arrival; combine: wait until peers are ready
#define EP_SYNC_NO_DATA 4  // only the flags: the send-only half of combine, the complete half of dispatch
#define EP_SYNC_DONE 8     // combine: tell each peer its rows were read, and wait until ours were

#define EP_STATUS_INDEX_RANGE 1   // a = token, b = column, c = value (low 32 bits)
#define EP_STATUS_REPEATED 2      // a = token, b = first column, c = second column
#define EP_STATUS_TIMEOUT 3       // a = missing peer
#define EP_STATUS_PEER_FAILED 4   // a = peer whose routing was invalid

struct EpRankArgs {
    ep_u64 x;                // dispatch: [B, H] rows
    ep_u64 topk_idx;         // [B, K]
    ep_u64 topk_weights;     // [B, K] f32 (dispatch rank-major, combine expert-major forward)
    ep_u64 recv;             // dispatch output / combine input (expert outputs)
    ep_u64 recv_idx;         // rank-major [R, BMAX, K]
    ep_u64 recv_weights;     // rank-major [R, BMAX, K] f32
    ep_u64 out;              // combine output [B, H]
    ep_u64 workspace;        // WS_WORDS words
    ep_i64 tokens;           // B of this rank in this step
    ep_i64 reserved;
};

struct EpArgs {
    EpRankArgs rank[EP_R];
    ep_u64 mask;             // the group's active-rank mask (u64 in device memory)
    ep_u64 timeout_ns;
    ep_i64 first_rank;       // rank of blockIdx.y == 0
    ep_i64 sync;             // EP_SYNC_* bits: which flags this launch publishes and waits for
    ep_i64 weighted;         // combine: apply topk_weights (forward, expert-major)
    ep_i64 slices;           // pieces each row is cut into; a warp moves one piece
};

EP_DEVICE ep_u32* ep_ws(const EpArgs& args, int rank) {
    return reinterpret_cast<ep_u32*>(args.rank[rank].workspace);
}

EP_DEVICE bool ep_active(ep_u64 mask, int rank) { return (mask >> rank) & 1ull; }

EP_DEVICE ep_u64 ep_load_mask(const EpArgs& args) {
    return *reinterpret_cast<volatile ep_u64*>(args.mask);
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
// Update: one block per rank. Counts this rank's selections per expert and tokens per rank,
// all-gathers them, and fixes every selection's (expert-major) or pair's (rank-major) row.

extern "C" __global__ void __launch_bounds__(EP_UPDATE_WARPS * 32, 1)
ep_ll_update(const EpArgs args) {
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const ep_u32 seq = ws[WS_SEQ] + 1;
    const int parity = seq & 1;
    const ep_u64 mask = ep_load_mask(args);

    __shared__ int counts[EP_UPDATE_WARPS][EP_E + EP_R];   // per warp: experts, then ranks
    __shared__ int bad;
    if (threadIdx.x == 0) {
        bad = 0;
        ws[WS_STATUS] = 0;
    }
    for (int i = threadIdx.x; i < EP_UPDATE_WARPS * (EP_E + EP_R); i += blockDim.x) (&counts[0][0])[i] = 0;
    __syncthreads();
    if (!ep_active(mask, rank)) {
        if (threadIdx.x == 0) ws[WS_SEQ] = seq;
        return;
    }

    // Load the routing once (coalesced) into shared memory, validating it: every entry -1 or
    // in [0, E); no expert twice in a row. Experts on inactive ranks become -1.
    __shared__ int routing[EP_BMAX * EP_K];
    __shared__ ep_u32 destinations[EP_BMAX];   // bit d set: the token goes to rank d
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const long long e = ep_read_index(args, rank, i);
        if (e < -1 || e >= EP_E) {
            ep_set_status(ws, EP_STATUS_INDEX_RANGE, i / EP_K, i % EP_K, static_cast<ep_u32>(e));
            bad = 1;
        }
        routing[i] = e >= 0 && e < EP_E ? static_cast<int>(e) : -1;   // unmasked, for the repeat check
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int t = i / EP_K, c = i % EP_K, e = routing[i];
        for (int p = 0; e >= 0 && p < c; ++p) {
            if (routing[t * EP_K + p] == e) {
                ep_set_status(ws, EP_STATUS_REPEATED, t, p, c);
                bad = 1;
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int e = routing[i];
        if (bad || (e >= 0 && !ep_active(mask, e / EP_L))) routing[i] = -1;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < tokens; t += blockDim.x) {
        ep_u32 bits = 0;
        for (int c = 0; c < EP_K; ++c) {
            const int e = routing[t * EP_K + c];
            if (e >= 0) bits |= 1u << (e / EP_L);
        }
        destinations[t] = bits;
    }
    __syncthreads();

    // The expert of (t, c) after masking, or -1.
    auto expert = [&](int t, int c) -> int { return routing[t * EP_K + c]; };
    auto goes_to = [&](int t, int d) -> bool { return (destinations[t] >> d) & 1u; };

    // Pass 1: per-warp counts over a contiguous chunk of tokens, in token order.
    const int chunk = (tokens + EP_UPDATE_WARPS - 1) / EP_UPDATE_WARPS;
    const int begin = min(tokens, warp * chunk), end = min(tokens, begin + chunk);
    for (int t = begin; t < end; ++t) {
        if (lane < EP_K) {
            const int e = expert(t, lane);
            if (e >= 0) counts[warp][e] += 1;  // distinct experts per token: no two lanes collide
        }
        if (lane < EP_R && goes_to(t, lane)) counts[warp][EP_E + lane] += 1;
        __syncwarp();
    }
    __syncthreads();
    // Exclusive prefix over warps; totals go to the all-gather.
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) {
        int running = 0;
        for (int w = 0; w < EP_UPDATE_WARPS; ++w) {
            const int here = counts[w][i];
            counts[w][i] = running;
            running += here;
        }
        for (int d = 0; d < EP_R; ++d) {
            if (ep_active(mask, d)) {
                ep_u32* peer = ep_ws(args, d) + WS_COUNTS + parity * EP_R * (EP_E + EP_R) + rank * (EP_E + EP_R);
                peer[i] = static_cast<ep_u32>(running);
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        __threadfence();
        ep_store_release_sys(ep_ws(args, threadIdx.x) + WS_COUNT_FLAG + rank, seq * 2 + (bad ? 1 : 0));
    }

    // Pass 2: this rank's position of each selection / pair among its own, in token order.
    for (int t = begin; t < end; ++t) {
        if (lane < EP_K) {
            const int e = expert(t, lane);
            int position = -1;
            if (e >= 0) position = counts[warp][e]++;
            ws[WS_SEL_ROW + t * EP_K + lane] = static_cast<ep_u32>(position);
        }
        if (lane < EP_R) {
            int position = -1;
            if (goes_to(t, lane)) position = counts[warp][EP_E + lane]++;
            ws[WS_PAIR_ROW + t * EP_R + lane] = static_cast<ep_u32>(position);
        }
        __syncwarp();
    }

    // Wait for every active rank's counts (bounded).
    __shared__ int any_bad;
    if (threadIdx.x == 0) any_bad = bad ? -2 : -1;
    __syncthreads();
    if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        const ep_u32* flag = ws + WS_COUNT_FLAG + threadIdx.x;
        if (!ep_wait_flag_sys(flag, seq * 2, args.timeout_ns)) {
            ep_timeout(args, ws, threadIdx.x);
            atomicMax(&any_bad, static_cast<int>(threadIdx.x));
        } else if (ep_load_acquire_sys(flag) & 1u) {
            atomicMax(&any_bad, static_cast<int>(threadIdx.x));
        }
    }
    __syncthreads();
    if (any_bad != -1) {
        if (threadIdx.x == 0) {
            ws[WS_STEP_OK] = 0;
            if (any_bad >= 0) ep_set_status(ws, EP_STATUS_PEER_FAILED, any_bad, 0, 0);
            ws[WS_SEQ] = seq;
        }
        return;
    }

    // Final rows: add the counts of lower source ranks (expert-major: also the zone base).
    const ep_u32* table = ws + WS_COUNTS + parity * EP_R * (EP_E + EP_R);
    const ep_u64 gathered = ep_load_mask(args) & mask;   // active at the start and not timed out
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int position = static_cast<int>(ws[WS_SEL_ROW + i]);
        if (position < 0) continue;
        const int e = routing[i];
        int before = 0;
        for (int s = 0; s < rank; ++s) {
            if (ep_active(gathered, s)) before += static_cast<int>(table[s * (EP_E + EP_R) + e]);
        }
        ws[WS_SEL_ROW + i] = static_cast<ep_u32>((e % EP_L) * EP_R * EP_BMAX + before + position);
    }
    for (int i = threadIdx.x; i < tokens * EP_R; i += blockDim.x) {
        const int position = static_cast<int>(ws[WS_PAIR_ROW + i]);
        if (position >= 0) ws[WS_PAIR_ROW + i] = static_cast<ep_u32>(rank * EP_BMAX + position);
    }
    // What this rank receives.
    ep_u32* layout = ws + WS_LAYOUT;
    for (int i = threadIdx.x; i < EP_L * EP_R; i += blockDim.x) {
        const int l = i / EP_R, s = i % EP_R;
        layout[EP_L + EP_R + i] = ep_active(gathered, s) ? table[s * (EP_E + EP_R) + rank * EP_L + l] : 0u;
    }
    __syncthreads();
    if (threadIdx.x < EP_L) {
        ep_u32 sum = 0;
        for (int s = 0; s < EP_R; ++s) sum += layout[EP_L + EP_R + threadIdx.x * EP_R + s];
        layout[threadIdx.x] = sum;
    }
    if (threadIdx.x < EP_R) {
        layout[EP_L + threadIdx.x] = ep_active(gathered, threadIdx.x) ? table[threadIdx.x * (EP_E + EP_R) + EP_E + rank] : 0u;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ep_u32 total = 0;
#if EP_RANK_MAJOR
        for (int s = 0; s < EP_R; ++s) total += layout[EP_L + s];
#else
        for (int l = 0; l < EP_L; ++l) total += layout[l];
#endif
        layout[EP_L + EP_R + EP_L * EP_R] = total;
        ws[WS_STEP_OK] = 1;
        ws[WS_SEQ] = seq;
    }
}

// ------------------------------------------------------------------------------------------
// Vectors of a row.

#if EP_VEC_BYTES == 16
typedef ep_vec16 ep_vec;
EP_DEVICE ep_vec ep_load_vec(const void* p) { return ep_load16_nc(p); }
// Expert outputs are final before combine starts (kernel boundary, or the peer's ready flag
// in separate launches), so the read-only path is safe; it bypasses L1, so nothing goes stale.
EP_DEVICE ep_vec ep_load_vec_peer(const void* p) { return ep_load16_nc(p); }
EP_DEVICE void ep_store_vec(void* p, ep_vec v) { ep_store16_na(p, v); }
#else
struct __align__(8) ep_vec8 { ep_u32 x, y; };
typedef ep_vec8 ep_vec;
EP_DEVICE ep_vec ep_load_vec(const void* p) { return *static_cast<const ep_vec8*>(p); }
EP_DEVICE ep_vec ep_load_vec_peer(const void* p) { return *static_cast<const ep_vec8*>(p); }
EP_DEVICE void ep_store_vec(void* p, ep_vec v) { *static_cast<ep_vec8*>(p) = v; }
#endif
#define EP_ROW_VECS (EP_ROW_BYTES / EP_VEC_BYTES)
#define EP_UNROLL 4
#define EP_WARPS 16       // warps per dispatch/combine block (512 threads)
#define EP_CHUNK 8        // combine: rows loaded before the first use

// Each lane of a warp publishes one row address (and weight) for its warp to read back by
// index: the table lives in shared memory, not in K registers per lane, so large top-k does
// not spill and two 512-thread blocks fit on an SM.
struct EpWarpRows {
    ep_u64 address[EP_WARPS][32];
    float weight[EP_WARPS][32];
};

// With `signal`, the last block of this rank to finish tells every destination that this rank
// is done with it (flag = the step's sequence number). With `wait`, block 0 waits until every
// active peer has said so for this rank: the call then ends only when its data is complete.
// Waiting is only asked where all the waiting blocks' peers are resident or already finished.
EP_DEVICE void ep_arrive_and_wait(const EpArgs& args, int rank, ep_u64 mask, int block_counter, int flag_offset,
                                  ep_u32 seq, bool signal, bool wait) {
    ep_u32* ws = ep_ws(args, rank);
    if (signal) {
        __shared__ int last;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last = atomicAdd(ws + block_counter, 1u) == gridDim.x - 1;
            if (last) atomicExch(ws + block_counter, 0u);
        }
        __syncthreads();
        if (last && threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
            __threadfence();
            ep_store_release_sys(ep_ws(args, threadIdx.x) + flag_offset + rank, seq);
        }
    }
    if (wait && blockIdx.x == 0 && threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        if (!ep_wait_flag_sys(ws + flag_offset + threadIdx.x, seq, args.timeout_ns)) ep_timeout(args, ws, threadIdx.x);
    }
}

// ------------------------------------------------------------------------------------------
// Dispatch: a warp per token; the row is read once and written to each of its slots.

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_dispatch(const EpArgs args) {
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    // Three independent loads issued together, before the first branch uses any of them.
    const ep_u64 mask = ep_load_mask(args);
    const ep_u32 step_ok = ws[WS_STEP_OK];
    const ep_u32 seq = ws[WS_SEQ];
    if (!ep_active(mask, rank) || step_ok == 0) return;
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const ep_u8* x = reinterpret_cast<const ep_u8*>(args.rank[rank].x);
    const int warp = threadIdx.x / 32;
    __shared__ EpWarpRows table;

    const int slices = static_cast<int>(args.slices);
    const int per_slice = (EP_ROW_VECS + slices - 1) / slices;
    const int items = (args.sync & EP_SYNC_NO_DATA) ? 0 : tokens * slices;
    for (int item = blockIdx.x * warps + threadIdx.x / 32; item < items; item += gridDim.x * warps) {
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_ROW_VECS, first + per_slice);
#if EP_RANK_MAJOR
        // One row per destination rank, plus its local idx and weights (written with piece 0).
        ep_u8* target = nullptr;
        int row = -1;
        if (lane < EP_R) {
            row = static_cast<int>(ws[WS_PAIR_ROW + t * EP_R + lane]);
            if (row >= 0) target = reinterpret_cast<ep_u8*>(args.rank[lane].recv) + static_cast<ep_u64>(row) * EP_ROW_BYTES;
        }
        table.address[warp][lane] = reinterpret_cast<ep_u64>(target);
        __syncwarp();
        for (int d = 0; d < EP_R; ++d) {
            const int drow = __shfl_sync(0xffffffffu, row, d);
            if (drow < 0 || piece != 0) continue;
            if (lane < EP_K) {
                const long long e = ep_read_index(args, rank, t * EP_K + lane);
                const bool here = e >= 0 && e / EP_L == d && ep_active(mask, d);
                const float w = here ? reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane] : 0.0f;
                const ep_u64 slot = static_cast<ep_u64>(drow) * EP_K + lane;
#if EP_RIDX_BYTES == 8
                reinterpret_cast<long long*>(args.rank[d].recv_idx)[slot] = here ? e % EP_L : -1;
#else
                reinterpret_cast<int*>(args.rank[d].recv_idx)[slot] = here ? static_cast<int>(e % EP_L) : -1;
#endif
                reinterpret_cast<float*>(args.rank[d].recv_weights)[slot] = w;
            }
        }
        const int fanout = EP_R;
#else
        ep_u8* target = nullptr;
        if (lane < EP_K) {
            const int row = static_cast<int>(ws[WS_SEL_ROW + t * EP_K + lane]);
            if (row >= 0) {
                const int e = static_cast<int>(ep_read_index(args, rank, t * EP_K + lane));
                target = reinterpret_cast<ep_u8*>(args.rank[e / EP_L].recv) + static_cast<ep_u64>(row) * EP_ROW_BYTES;
            }
        }
        table.address[warp][lane] = reinterpret_cast<ep_u64>(target);
        __syncwarp();
        const int fanout = EP_K;
#endif
        const ep_u8* src = x + static_cast<ep_u64>(t) * EP_ROW_BYTES;
        int v = first + lane;
        for (; v + 32 * (EP_UNROLL - 1) < last; v += 32 * EP_UNROLL) {
            ep_vec values[EP_UNROLL];
#pragma unroll
            for (int u = 0; u < EP_UNROLL; ++u) values[u] = ep_load_vec(src + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES);
#pragma unroll
            for (int c = 0; c < fanout; ++c) {
                ep_u8* dst = reinterpret_cast<ep_u8*>(table.address[warp][c]);
                if (dst == nullptr) continue;
#pragma unroll
                for (int u = 0; u < EP_UNROLL; ++u) ep_store_vec(dst + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES, values[u]);
            }
        }
        for (; v < last; v += 32) {
            const ep_vec value = ep_load_vec(src + static_cast<ep_u64>(v) * EP_VEC_BYTES);
#pragma unroll
            for (int c = 0; c < fanout; ++c) {
                ep_u8* dst = reinterpret_cast<ep_u8*>(table.address[warp][c]);
                if (dst != nullptr) ep_store_vec(dst + static_cast<ep_u64>(v) * EP_VEC_BYTES, value);
            }
        }
        __syncwarp();   // every lane is done with this item's table before the next overwrites it
    }
    ep_arrive_and_wait(args, rank, mask, WS_DISP_BLOCKS, WS_DISP_DONE, seq, args.sync & EP_SYNC_SIGNAL, args.sync & EP_SYNC_WAIT);
}

// ------------------------------------------------------------------------------------------
// Combine: a warp per token pulls the rows of its selections (expert-major) or of its
// destination ranks (rank-major) and reduces them: float32, one fused multiply-add per term,
// in ascending k (expert-major) or ascending rank (rank-major), one rounding at the end.

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

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_combine(const EpArgs args) {
#if EP_ELEM != 3
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    // Three independent loads issued together, before the first branch uses any of them.
    const ep_u64 mask = ep_load_mask(args);
    const ep_u32 step_ok = ws[WS_STEP_OK];
    const ep_u32 seq = ws[WS_SEQ];
    if (!ep_active(mask, rank) || step_ok == 0) return;
    // Expert outputs are final when a rank's combine (or its send-only half) runs on its stream.
    if ((args.sync & EP_SYNC_SIGNAL) && blockIdx.x == 0 && threadIdx.x == 0) ep_store_release_sys(ws + WS_COMB_READY, seq);
    if (args.sync & EP_SYNC_NO_DATA) return;
    if (args.sync & EP_SYNC_WAIT) {
        if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
            if (!ep_wait_flag_sys(ep_ws(args, threadIdx.x) + WS_COMB_READY, seq, args.timeout_ns)) ep_timeout(args, ws, threadIdx.x);
        }
        __syncthreads();
    }
    const ep_u64 live = ep_load_mask(args);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    ep_u8* out = reinterpret_cast<ep_u8*>(args.rank[rank].out);
    const int warp = threadIdx.x / 32;
    __shared__ EpWarpRows table;
    const int slices = static_cast<int>(args.slices);
    const int per_slice = (EP_ROW_VECS + slices - 1) / slices;

    for (int item = blockIdx.x * warps + threadIdx.x / 32; item < tokens * slices; item += gridDim.x * warps) {
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_ROW_VECS, first + per_slice);
#if EP_RANK_MAJOR
        const ep_u8* source = nullptr;
        if (lane < EP_R && ep_active(live, lane)) {
            const int row = static_cast<int>(ws[WS_PAIR_ROW + t * EP_R + lane]);
            if (row >= 0) source = reinterpret_cast<const ep_u8*>(args.rank[lane].recv) + static_cast<ep_u64>(row) * EP_ROW_BYTES;
        }
        const float weight = 1.0f;
        const int fanout = EP_R;
#else
        const ep_u8* source = nullptr;
        float weight = 0.0f;
        if (lane < EP_K) {
            const int row = static_cast<int>(ws[WS_SEL_ROW + t * EP_K + lane]);
            if (row >= 0) {
                const int e = static_cast<int>(ep_read_index(args, rank, t * EP_K + lane));
                if (ep_active(live, e / EP_L)) {
                    source = reinterpret_cast<const ep_u8*>(args.rank[e / EP_L].recv) + static_cast<ep_u64>(row) * EP_ROW_BYTES;
                    weight = args.weighted ? reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane] : 1.0f;
                }
            }
        }
        const int fanout = EP_K;
#endif
        table.address[warp][lane] = reinterpret_cast<ep_u64>(source);
        table.weight[warp][lane] = weight;
        __syncwarp();
        // One vector per lane per step; EP_CHUNK rows' loads in flight before their first use,
        // then the fused multiply-adds in ascending order. (Measured on an H100: two vectors per
        // lane, as 1 KB runs per warp, or as two 512 B runs, were both slower.)
        ep_u8* row_out = out + static_cast<ep_u64>(t) * EP_ROW_BYTES;
        for (int v = first + lane; v < last; v += 32) {
            float acc[EP_ELEMS_PER_VEC];
#pragma unroll
            for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = 0.0f;
#pragma unroll
            for (int c0 = 0; c0 < fanout; c0 += EP_CHUNK) {
                ep_vec rows[EP_CHUNK];
#pragma unroll
                for (int j = 0; j < EP_CHUNK; ++j) {
                    const ep_u8* src = c0 + j < fanout ? reinterpret_cast<const ep_u8*>(table.address[warp][c0 + j]) : nullptr;
                    if (src != nullptr) rows[j] = ep_load_vec_peer(src + static_cast<ep_u64>(v) * EP_VEC_BYTES);
                }
#pragma unroll
                for (int j = 0; j < EP_CHUNK; ++j) {
                    if (c0 + j >= fanout || table.address[warp][c0 + j] == 0) continue;
                    const float w = table.weight[warp][c0 + j];
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = ep_fma(w, ep_element(rows[j], i), acc[i]);
                }
            }
            ep_store_vec(row_out + static_cast<ep_u64>(v) * EP_VEC_BYTES, ep_pack(acc));
        }
        __syncwarp();   // every lane is done with this item's table before the next overwrites it
    }
    const bool done = args.sync & EP_SYNC_DONE;
    ep_arrive_and_wait(args, rank, mask, WS_COMB_BLOCKS, WS_COMB_DONE, seq, done, done);
#endif
}
