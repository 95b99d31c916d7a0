// The transport seam: every access a rank makes to another rank's memory goes through the
// functions of this file (put a row piece, put a word, signal, wait, and combine's reads of the
// expert side), so one kernel serves every transport. Two are compiled (EP_TRANSPORT):
//
// 0, direct: loads and stores through peer pointers (virtual ranks on one GPU; NCCL ranks over
//    NVLink): dispatch stores rows straight into their final slots, combine reads the peers'
//    expert outputs where they are.
// 1, staged: the shape of NCCL's GPU-initiated networking (put + signal, no loads from a peer):
//    dispatch puts rows, ids and weights into the destination's staging area (EpStage) and each
//    row's origin into the destination's handle (a step's own words, as steps may interleave),
//    and the destination drains the staging area into its receive buffers (the *_drain kernels);
//    combine's expert side puts each row it holds back into its source's staging area (the
//    *_combine_send kernels, using the origins), and the source reduces from there. This is
//    where a GIN transport plugs in (docs/architecture.md).

#ifndef EP_TRANSPORT
#define EP_TRANSPORT 0
#endif
#ifndef EP_ONE_DEVICE
#define EP_ONE_DEVICE 0   // 1: every rank of the group is on this GPU (virtual ranks): flags need gpu scope, not sys
#endif

// A rank's staging area (staged transport), in device memory; args.rank[r].stage points to it.
struct EpStage {
    ep_u64 rows;          // mirror of the receive rows: dispatch puts land here, the drain copies them out
    ep_u64 idx;           // mirror of the received ids (layouts that have them)
    ep_u64 weights;       // mirror of the received weights
    ep_u64 comb_rows;     // combine: [BMAX * fan] rows the expert ranks put back, by (token, k) or (token, rank)
    ep_u64 comb_weights;  // HT expert-major forward: the slot weight of each row put back
    ep_u64 comb_grads;    // HT backward: the weight gradients of each row put back (flat: K per row)
    ep_u64 scales;        // FP8 dispatch: mirror of the received scale words
};

#define EP_ORIGIN_NONE 0xffffffffu
#define EP_ORIGIN_INDEX_BITS 26
#ifdef EP_HOST_ORIGIN_INDEX_BITS   // the host's bound on a source's row indices (StepStaging.check)
static_assert(EP_ORIGIN_INDEX_BITS == EP_HOST_ORIGIN_INDEX_BITS, "origin index bits differ from the host's");
#endif

EP_DEVICE const EpStage& ep_stage(const EpArgs& args, int rank) {
    return *reinterpret_cast<const EpStage*>(args.rank[rank].stage);
}

// ------------------------------------------------------------------------------------------
// Puts: dispatch's writes into rank d's receive buffers.

// Where a piece of a (wire) row bound for row `row` of rank d's receive buffer is stored.
EP_DEVICE ep_u8* ep_put_row_target(const EpArgs& args, int d, ep_u64 row) {
#if EP_TRANSPORT == 1
    return reinterpret_cast<ep_u8*>(ep_stage(args, d).rows) + row * EP_WIRE_BYTES;
#else
    return reinterpret_cast<ep_u8*>(args.rank[d].recv) + row * EP_WIRE_BYTES;
#endif
}

#if EP_FP8
// Where the scale words of the row bound for row `row` of rank d are stored.
EP_DEVICE ep_u32* ep_put_scales_target(const EpArgs& args, int d, ep_u64 row) {
#if EP_TRANSPORT == 1
    return reinterpret_cast<ep_u32*>(ep_stage(args, d).scales) + row * EP_SCALE_WORDS;
#else
    return reinterpret_cast<ep_u32*>(args.rank[d].recv_scales) + row * EP_SCALE_WORDS;
#endif
}
#endif

// A received local expert id and weight, at element `slot` of rank d's received ids / weights.
EP_DEVICE void ep_put_received(const EpArgs& args, int d, ep_u64 slot, int id, float weight) {
#if EP_TRANSPORT == 1
    const ep_u64 ids = ep_stage(args, d).idx, weights = ep_stage(args, d).weights;
#else
    const ep_u64 ids = args.rank[d].recv_idx, weights = args.rank[d].recv_weights;
#endif
#if EP_RIDX_BYTES == 8
    reinterpret_cast<long long*>(ids)[slot] = id;
#else
    reinterpret_cast<int*>(ids)[slot] = id;
#endif
    reinterpret_cast<float*>(weights)[slot] = weight;
}

// Where row `row` of rank d came from (staged: the expert side puts it back there in combine):
// `index` is (token × K + k) or the token, as the layout's combine staging counts it; a padding
// row has source -1. It goes to word `origins` + row of d's handle of the step (H_ORIGIN: a
// [capacity] array, staged only). The direct transport needs no origin: combine reads in place.
EP_DEVICE void ep_put_origin(const EpArgs& args, int d, int origins, ep_u64 row, int source, int index) {
#if EP_TRANSPORT == 1
    ep_hs(args, d)[origins + row] =
        source < 0 ? EP_ORIGIN_NONE : (static_cast<ep_u32>(source) << EP_ORIGIN_INDEX_BITS) | static_cast<ep_u32>(index);
#endif
}

// ------------------------------------------------------------------------------------------
// Words and signals between ranks' workspaces (the same for both transports: a put of a word,
// and a put with release order that the receiver waits for).

EP_DEVICE void ep_put_word(const EpArgs& args, int d, int word, ep_u32 value) { ep_ws(args, d)[word] = value; }

EP_DEVICE void ep_signal(const EpArgs& args, int d, int word, ep_u32 value) {
#if EP_ONE_DEVICE
    ep_store_release_gpu(ep_ws(args, d) + word, value);
#else
    ep_store_release_sys(ep_ws(args, d) + word, value);
#endif
}

// An acquire load of a flag a peer signals.
EP_DEVICE ep_u32 ep_load_flag(const ep_u32* flag) {
#if EP_ONE_DEVICE
    return ep_load_acquire_gpu(flag);
#else
    return ep_load_acquire_sys(flag);
#endif
}

// Bounded wait until this rank's word `word` reaches `target`; false past the timeout.
EP_DEVICE bool ep_wait(const EpArgs& args, const ep_u32* ws, int word, ep_u32 target) {
    return ep_wait_flag(ws + word, target, args.timeout_ns, ep_load_flag);
}

// ------------------------------------------------------------------------------------------
// Combine's reads of the expert side, for rank `rank`'s selection or pair held by rank d:
// direct, row `row` of d's expert outputs (and d's slot weight / gradient there); staged, entry
// `index` of this rank's own combine staging, where d put them.

EP_DEVICE ep_u64 ep_expert_row(const EpArgs& args, int rank, int d, ep_u64 row, ep_u64 index) {
#if EP_TRANSPORT == 1
    return ep_stage(args, rank).comb_rows + index * EP_ROW_BYTES;
#else
    return args.rank[d].recv + row * EP_ROW_BYTES;
#endif
}

EP_DEVICE float ep_expert_slot_weight(const EpArgs& args, int rank, int d, ep_u64 slot, ep_u64 index) {
#if EP_TRANSPORT == 1
    return reinterpret_cast<const float*>(ep_stage(args, rank).comb_weights)[index];
#else
    return reinterpret_cast<const float*>(args.rank[d].topk_weights)[slot];
#endif
}

EP_DEVICE float ep_expert_gradient(const EpArgs& args, int rank, int d, ep_u64 at, ep_u64 staged_at) {
#if EP_TRANSPORT == 1
    return reinterpret_cast<const float*>(ep_stage(args, rank).comb_grads)[staged_at];
#else
    return reinterpret_cast<const float*>(args.rank[d].weight_grads_in)[at];
#endif
}

// ------------------------------------------------------------------------------------------
// The staged transport's own moves, shared by the LL and HT drain and combine-send kernels.

// One warp copies a whole row of `vecs` vectors (every lane).
EP_DEVICE void ep_copy_row(const ep_u8* src, ep_u8* dst, int vecs, int lane) {
    for (int v = lane; v < vecs; v += 32) ep_store_vec(dst + static_cast<ep_u64>(v) * EP_VEC_BYTES, ep_load_vec(src + static_cast<ep_u64>(v) * EP_VEC_BYTES));
}

// The drain of one received row (one warp): the (wire) row with its FP8 scale words, and its
// `ids` received ids and weights (K per row, 1 per slot, or none), from this rank's staging area
// `stage` into its receive buffers.
EP_DEVICE void ep_drain_row(const EpArgs& args, int rank, const EpStage& stage, ep_u64 row, int ids, int lane) {
    ep_copy_row(reinterpret_cast<const ep_u8*>(stage.rows) + row * EP_WIRE_BYTES,
                reinterpret_cast<ep_u8*>(args.rank[rank].recv) + row * EP_WIRE_BYTES, EP_WIRE_VECS, lane);
#if EP_FP8
    for (int w = lane; w < EP_SCALE_WORDS; w += 32) {
        reinterpret_cast<ep_u32*>(args.rank[rank].recv_scales)[row * EP_SCALE_WORDS + w] =
            reinterpret_cast<const ep_u32*>(stage.scales)[row * EP_SCALE_WORDS + w];
    }
#endif
    if (lane < ids) {
        const ep_u64 slot = row * ids + lane;
#if EP_RIDX_BYTES == 8
        reinterpret_cast<long long*>(args.rank[rank].recv_idx)[slot] = reinterpret_cast<const long long*>(stage.idx)[slot];
#else
        reinterpret_cast<int*>(args.rank[rank].recv_idx)[slot] = reinterpret_cast<const int*>(stage.idx)[slot];
#endif
        reinterpret_cast<float*>(args.rank[rank].recv_weights)[slot] = reinterpret_cast<const float*>(stage.weights)[slot];
    }
}

// One warp puts row `row` of this rank's expert outputs to row `index` of rank s's combine staging.
EP_DEVICE void ep_put_back_row(const EpArgs& args, int rank, int s, ep_u64 row, ep_u64 index, int lane) {
    ep_copy_row(reinterpret_cast<const ep_u8*>(args.rank[rank].recv) + row * EP_ROW_BYTES,
                reinterpret_cast<ep_u8*>(ep_stage(args, s).comb_rows) + index * EP_ROW_BYTES, EP_ROW_VECS, lane);
}

// ------------------------------------------------------------------------------------------
// The step's protocol over those primitives: the update's all-gather of counts, combine's
// ready handshake, and the end of a launch that publishes flags.

// A row of the count table whose rank found bad routing: its first word (a count, < 2^31, else).
#define EP_BAD_ROW 0xffffffffu

// The update's half of the all-gather: puts this rank's row of E + R words, value(i), into the
// table at word `table` of every active rank, then signals this rank's WS_COUNT_FLAG there with
// `flag`. A `flag` with its low bit set (bad routing here) puts EP_BAD_ROW as the row's first
// word: the flag may move on to the rank's next update before a peer reads it, the row may not
// (the next update writes the other parity's table). Call from every thread of the block.
template <typename Value>
EP_DEVICE void ep_publish_row(const EpArgs& args, int rank, ep_u64 mask, int table, ep_u32 flag, Value value) {
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) {
        const ep_u32 word = i == 0 && (flag & 1u) ? EP_BAD_ROW : static_cast<ep_u32>(value(i));
        for (int d = 0; d < EP_R; ++d) {
            if (ep_active(mask, d)) ep_put_word(args, d, table + rank * (EP_E + EP_R) + i, word);
        }
    }
    __syncthreads();
    if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        __threadfence();
        ep_signal(args, threadIdx.x, WS_COUNT_FLAG + rank, flag);
    }
}

// Flags between ranks carry a call number per kind of call (dispatch, combine) instead of being
// reset: a launch that publishes flags (EP_SYNC_SIGNAL) is call WS_*_CALLS + 1, and its last
// block advances WS_*_CALLS; the launch that completes a send-only call (no SIGNAL) is the call
// already counted. Every rank makes the same calls in the same order, so the numbers agree
// across ranks whatever handle each call uses (steps may interleave). One launch covering every
// rank (sync = 0) publishes and counts nothing: its end is the barrier.
EP_DEVICE ep_u32 ep_call_number(const ep_u32* ws, int calls_word, ep_i64 sync) {
    // A launch that neither signals nor waits (one launch for every rank) meets no peer: no load.
    if (!(sync & (EP_SYNC_SIGNAL | EP_SYNC_WAIT | EP_SYNC_DONE))) return 0u;
    return ws[calls_word] + ((sync & EP_SYNC_SIGNAL) ? 1u : 0u);
}

// Combine's meeting point. With `signal`: this rank's expert outputs are final (a rank's
// combine, or its send-only half, runs after them on its stream): it signals every active peer.
// With `wait`: block-wide, bounded wait until every active peer has signalled this rank. Returns
// false for the send-only half, which moves no data (launched with one block per rank, which
// also counts the call). Call from every thread, after the step check.
EP_DEVICE bool ep_combine_ready(const EpArgs& args, int rank, ep_u32* ws, ep_u64 mask, ep_u32 seq) {
    if ((args.sync & EP_SYNC_SIGNAL) && blockIdx.x == 0 && threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        ep_signal(args, threadIdx.x, WS_COMB_READY + rank, seq);
    }
    if (args.sync & EP_SYNC_NO_DATA) {
        if ((args.sync & EP_SYNC_SIGNAL) && blockIdx.x == 0 && threadIdx.x == 0) ws[WS_COMB_CALLS] = seq;
        return false;
    }
    if (args.sync & EP_SYNC_WAIT) {
        if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
            if (!ep_wait(args, ws, WS_COMB_READY + threadIdx.x, seq)) ep_timeout(args, ws, threadIdx.x);
        }
        __syncthreads();
    }
    return true;
}

// The update's all-gather of counts: waits (bounded) until every active rank's WS_COUNT_FLAG
// here reaches `expected`, then reads whether that rank found bad routing from its row of the
// step's count table at `table` (EP_BAD_ROW; the flag's own low bit may already be the rank's
// next update's). Any late or bad rank (or `bad` here) voids the step for this rank: H_STEP_OK =
// 0, the status names the peer, the update's sequence number is taken, and every thread gets
// false. Call from every thread. In three parts for a caller that reads the table elsewhere
// first (the HT update's copy in shared memory): `any_bad` (shared: -1 all good, -2 this rank's
// own routing, else the highest failing peer) set, then a barrier, before ep_counts_wait; a
// barrier before ep_counts_check_bad_rows unless the table it reads is global (the waiting
// thread reads its peer's row); a barrier before ep_counts_verdict.
EP_DEVICE void ep_counts_wait(const EpArgs& args, ep_u32* ws, ep_u64 mask, ep_u32 expected, int* any_bad) {
    if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        if (!ep_wait(args, ws, WS_COUNT_FLAG + threadIdx.x, expected)) {
            ep_timeout(args, ws, threadIdx.x);
            atomicMax(any_bad, static_cast<int>(threadIdx.x));
        }
    }
}

EP_DEVICE void ep_counts_check_bad_rows(ep_u64 mask, const ep_u32* table, int* any_bad) {
    if (threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        if (*reinterpret_cast<const volatile ep_u32*>(table + threadIdx.x * (EP_E + EP_R)) == EP_BAD_ROW) {
            atomicMax(any_bad, static_cast<int>(threadIdx.x));
        }
    }
}

EP_DEVICE bool ep_counts_verdict(ep_u32* ws, ep_u32* hs, ep_u32 seq, int any_bad) {
    if (any_bad == -1) return true;
    if (threadIdx.x == 0) {
        hs[H_STEP_OK] = 0;
        if (any_bad >= 0) ep_set_status(ws, EP_STATUS_PEER_FAILED, any_bad, 0, 0);
        ws[WS_SEQ] = seq;
    }
    return false;
}

EP_DEVICE bool ep_counts_arrived(const EpArgs& args, ep_u32* ws, ep_u32* hs, ep_u64 mask, ep_u32 expected, bool bad, ep_u32 seq,
                                 const ep_u32* table) {
    __shared__ int any_bad;
    if (threadIdx.x == 0) any_bad = bad ? -2 : -1;
    __syncthreads();
    ep_counts_wait(args, ws, mask, expected, &any_bad);
    ep_counts_check_bad_rows(mask, table, &any_bad);   // (a timed-out peer's stale row changes nothing: it failed already)
    __syncthreads();
    return ep_counts_verdict(ws, hs, seq, any_bad);
}

// The end of a launch. With `count`, the last block of this rank to finish resets the block
// counter, advances the call number to `seq` when `advance` (the launch is the call's SIGNAL
// half) and, with `publish` (this rank took part: active, with a valid step), signals every
// active peer that this rank is done with it (flag = `seq`). With `wait`, block 0 waits until
// every active peer has signalled this rank: the call then ends only when its data is complete.
// Waiting is only asked where all the waiting blocks' peers are resident or already finished.
EP_DEVICE void ep_arrive_and_wait(const EpArgs& args, int rank, ep_u64 mask, int block_counter, int calls_word, int flag_offset,
                                  ep_u32 seq, bool count, bool advance, bool publish, bool wait, EpBlock block = ep_grid_block()) {
    ep_u32* ws = ep_ws(args, rank);
    if (count) {
        __shared__ int last;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last = atomicAdd(ws + block_counter, 1u) == static_cast<ep_u32>(block.count - 1);
            if (last) {
                atomicExch(ws + block_counter, 0u);
                if (advance) ws[calls_word] = seq;
            }
        }
        __syncthreads();
        if (publish && last && threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
            __threadfence();
            ep_signal(args, threadIdx.x, flag_offset + rank, seq);
        }
    }
    if (wait && block.index == 0 && threadIdx.x < EP_R && ep_active(mask, threadIdx.x)) {
        if (!ep_wait(args, ws, flag_offset + threadIdx.x, seq)) ep_timeout(args, ws, threadIdx.x);
    }
}

// Dispatch's counts for the caller, from the step's layout words (`layout`: [L] per local expert,
// [R] per source, [L][R] per expert and source): int32 rows per local expert and per (local
// expert, source rank), written by one block of each rank's sending launch (`writer`: this one;
// block 0 unless the caller says); zeros for a rank that takes no part. Written on the stream with
// the rows, so a caller needs no host synchronisation.
EP_DEVICE void ep_write_counts(const EpArgs& args, int rank, const ep_u32* layout, bool moving, bool writer = blockIdx.x == 0) {
    if (!writer || (args.sync & EP_SYNC_NO_DATA)) return;
    int* counts = reinterpret_cast<int*>(args.rank[rank].counts);
    int* sources = reinterpret_cast<int*>(args.rank[rank].source_counts);
    if (counts != nullptr) {
        for (int i = threadIdx.x; i < EP_L; i += blockDim.x) counts[i] = moving ? static_cast<int>(layout[i]) : 0;
    }
    if (sources != nullptr) {
        for (int i = threadIdx.x; i < EP_L * EP_R; i += blockDim.x) sources[i] = moving ? static_cast<int>(layout[EP_L + EP_R + i]) : 0;
    }
}

// A combine launch on a rank that takes no part (masked, or its step void) still counts a call
// that publishes flags, so that its call numbers keep agreeing with its peers'.
EP_DEVICE void ep_combine_skip(const EpArgs& args, int rank, ep_u64 mask, ep_u32 seq) {
    if (!(args.sync & EP_SYNC_SIGNAL)) return;
    if (args.sync & EP_SYNC_NO_DATA) {   // the send-only half: one block per rank
        if (blockIdx.x == 0 && threadIdx.x == 0) ep_ws(args, rank)[WS_COMB_CALLS] = seq;
        return;
    }
    ep_arrive_and_wait(args, rank, mask, WS_COMB_BLOCKS, WS_COMB_CALLS, WS_COMB_DONE, seq, true, true, false, false);
}

// The start of a combine launch, after its mask, step and call-number loads: a rank that takes
// no part (masked, or its step void) only counts the call; the others meet at the ready
// handshake. False: this launch moves no data here.
EP_DEVICE bool ep_combine_begin(const EpArgs& args, int rank, ep_u32* ws, ep_u64 mask, ep_u32 step_ok, ep_u32 seq) {
    if (!ep_active(mask, rank) || step_ok == 0) {
        ep_combine_skip(args, rank, mask, seq);
        return false;
    }
    return ep_combine_ready(args, rank, ws, mask, seq);
}
