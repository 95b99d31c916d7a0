// Low-latency (LL) dispatch and combine, for both LL layouts (docs/architecture.md,
// "Vocabulary"). One launch covers every rank of a virtual group (the rank is blockIdx.y +
// first_rank); each rank's blocks run exactly the code one NCCL rank would, and reach the
// other ranks only through the peer table (their buffer addresses) and flags.
//
// A step is three kernels: ep_ll_update (routing → slots, with the all-gather of counts),
// ep_ll_dispatch (each row written once, straight into its final slot on the destination)
// and ep_ll_combine (each source pulls its rows back and reduces them in a fixed order); or
// two, ep_ll_update_dispatch doing the first two in one launch (one block per rank updates
// while the rank's other blocks find their rows themselves, or wait for it). Slots follow the
// CPU oracle (RoutingPlan) exactly, so outputs match it bit for bit.

#ifndef EP_RANK_MAJOR
#define EP_RANK_MAJOR 0   // 0 expert-major, 1 rank-major
#endif
#ifndef EP_UPDATE_WARPS
#define EP_UPDATE_WARPS 8
#endif
#ifndef EP_LL_BITMAP
#define EP_LL_BITMAP 0    // 1: the update counts with bitmaps (the host checked that they fit)
#endif
#ifndef EP_FUSED
#define EP_FUSED 0        // 1: compile ep_ll_update_dispatch (the host checked that its shared memory fits)
#endif
#define EP_UPDATE_LOADS 4   // routing entries each update thread loads at once
// One rank (R = 1, counting with bitmaps): the update has no peer to gather counts from, so its
// own totals stay in shared memory: no table to publish, no flag to wait for, no table to read
// back (an H200, ll-1: update kernel 5.63 → 4.29 µs, with dispatch in one launch 10.75 → 9.54).
// EP_LL_SOLO_UPDATE=0 keeps the all-gather's path at R = 1 too (for comparing the two).
#ifndef EP_LL_SOLO_UPDATE
#define EP_LL_SOLO_UPDATE 1
#endif
#define EP_LL_SOLO (EP_LL_SOLO_UPDATE && EP_R == 1 && EP_LL_BITMAP)

// A selection's expert (< 1024 on the GPU) and its position among this rank's selections of it
// (< EP_BMAX, which the update's shared memory bounds below 2^14), in one non-negative int.
EP_DEVICE int ep_ll_pack(int expert, int position) { return (position << 11) | expert; }
EP_DEVICE int ep_ll_expert(int packed) { return packed & 0x7FF; }
EP_DEVICE int ep_ll_position(int packed) { return packed >> 11; }

// LL workspace: the shared words only. A step's handle (StepWorkspace.swift mirrors both):
#define WS_WORDS (WS_COUNTS + 2 * EP_R * (EP_E + EP_R))
#define H_SEL_ROW H_COMMON                                 // [BMAX][K] row of each selection
#define H_PAIR_ROW (H_SEL_ROW + EP_BMAX * EP_K)            // [BMAX][R] row of each (token, rank)
#define H_LAYOUT (H_PAIR_ROW + EP_BMAX * EP_R)             // [L] experts, [R] sources, [L][R], total
#define H_ORIGIN (H_LAYOUT + EP_L + EP_R + EP_L * EP_R + 1)  // staged: [rows] origin of each received row
#if EP_RANK_MAJOR
#define EP_LL_ROWS (EP_R * EP_BMAX)
#else
#define EP_LL_ROWS (EP_L * EP_R * EP_BMAX)
#endif
EP_CHECK_ALGORITHM_CONTRACT("LL", EP_UPDATE_WARPS, EP_LL_ROWS)

// ------------------------------------------------------------------------------------------
// Update: one block per rank. Counts this rank's selections per expert and tokens per rank,
// all-gathers them, and fixes every selection's (expert-major) or pair's (rank-major) row.
// The block may have more than EP_UPDATE_WARPS warps (the fused kernel's 16): the others take
// part in the block-wide loops only. Every thread returns at the same point.

// Reads this rank's [tokens, K] routing with EP_UPDATE_LOADS loads a thread in flight (one
// global round trip, not one per entry), handing entry i to `use(i, expert id as given)`.
template <typename Use>
EP_DEVICE void ep_ll_each_routing_entry(const EpArgs& args, int rank, int tokens, Use use) {
    for (int base = threadIdx.x; base < tokens * EP_K; base += EP_UPDATE_LOADS * blockDim.x) {
        long long loaded[EP_UPDATE_LOADS];
#pragma unroll
        for (int u = 0; u < EP_UPDATE_LOADS; ++u) {
            const int i = base + u * blockDim.x;
            loaded[u] = i < tokens * EP_K ? ep_read_index(args, rank, i) : -1;
        }
#pragma unroll
        for (int u = 0; u < EP_UPDATE_LOADS; ++u) {
            const int i = base + u * blockDim.x;
            if (i >= tokens * EP_K) break;
            use(i, loaded[u]);
        }
    }
}

// Names each expert a token selects twice (its first and second column, as the host does) and
// sets `bad`. `routing`: the experts as given (-1 for none), in shared memory.
EP_DEVICE void ep_ll_report_repeats(ep_u32* ws, const int* routing, int tokens, int& bad) {
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int t = i / EP_K, c = i % EP_K, e = routing[i];
        for (int p = 0; e >= 0 && p < c; ++p) {
            if (routing[t * EP_K + p] == e) {
                ep_set_status(ws, EP_STATUS_REPEATED, t, (static_cast<ep_u32>(p) << 16) | c, static_cast<ep_u32>(e));
                bad = 1;
            }
        }
    }
}

// The update's end, common to both ways of counting: waits for every active rank's counts
// (bounded; a late or bad rank voids the step), then turns this rank's positions into final
// rows and writes the step's layout. `routing[i]`: selection i's expert and position among
// this rank's selections of it (ep_ll_pack), or -1; `scratch`: 2E + L + R ints of shared memory;
// `own`: with EP_LL_SOLO, this rank's totals (E + R, shared memory), the whole table.
EP_DEVICE void ep_ll_update_finish(const EpArgs& args, int rank, ep_u32* ws, ep_u32* hs, ep_u64 mask, ep_u32 seq, bool bad,
                                   int tokens, const int* routing, int* scratch, const int* own) {
#if EP_LL_SOLO
    (void)mask;
    if (bad) {   // the step is void, as ep_counts_arrived makes it (the status names the routing)
        if (threadIdx.x == 0) {
            hs[H_STEP_OK] = 0;
            ws[WS_SEQ] = seq;
        }
        return;
    }
    const auto table_at = [&](int i) { return static_cast<ep_u32>(own[i]); };
#else
    (void)own;
    const ep_u32* gathered_table = ws + WS_COUNTS + (seq & 1) * EP_R * (EP_E + EP_R);
    if (!ep_counts_arrived(args, ws, hs, mask, seq * 2, bad, seq, gathered_table)) return;
    const auto table_at = [&](int i) { return gathered_table[i]; };
#endif

    // The gathered table, read once into shared memory: rows of lower source ranks per expert,
    // and what each source sends here per local expert.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const ep_u64 gathered = ep_block_mask(args) & mask;   // active at the start and not timed out
    int* before = scratch;                       // [E]
    int* received = before + EP_E;               // [L][R]
    int* per_expert = received + EP_L * EP_R;    // [L]
    int* per_source = per_expert + EP_L;         // [R]
    ep_u32* layout = hs + H_LAYOUT;
    for (int e = threadIdx.x; e < EP_E; e += blockDim.x) {
        int sum = 0;
#pragma unroll 8
        for (int s = 0; s < EP_R; ++s) {
            if (s < rank && ep_active(gathered, s)) sum += static_cast<int>(table_at(s * (EP_E + EP_R) + e));
        }
        before[e] = sum;
    }
    for (int i = threadIdx.x; i < EP_L * EP_R; i += blockDim.x) {
        const int l = i / EP_R, s = i % EP_R;
        const ep_u32 n = ep_active(gathered, s) ? table_at(s * (EP_E + EP_R) + rank * EP_L + l) : 0u;
        received[i] = static_cast<int>(n);
        layout[EP_L + EP_R + i] = n;
    }
    if (threadIdx.x < EP_R) {
        const ep_u32 n = ep_active(gathered, threadIdx.x) ? table_at(threadIdx.x * (EP_E + EP_R) + EP_E + rank) : 0u;
        per_source[threadIdx.x] = static_cast<int>(n);
        layout[EP_L + threadIdx.x] = n;
    }
    __syncthreads();
    // Final rows (expert-major: the zone base, the lower ranks' rows, then this rank's position).
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int packed = routing[i];
        int row = -1;
        if (packed >= 0) {
            const int e = ep_ll_expert(packed);
            row = (e % EP_L) * EP_R * EP_BMAX + before[e] + ep_ll_position(packed);
        }
        hs[H_SEL_ROW + i] = static_cast<ep_u32>(row);
    }
    // What this rank receives: per local expert, then the total (a warp's sum).
    for (int l = threadIdx.x; l < EP_L; l += blockDim.x) {   // L may exceed the block
        int sum = 0;
        for (int s = 0; s < EP_R; ++s) sum += received[l * EP_R + s];
        per_expert[l] = sum;
        layout[l] = static_cast<ep_u32>(sum);
    }
    __syncthreads();
    if (warp == 0) {
        int part = 0;
#if EP_RANK_MAJOR
        for (int s = lane; s < EP_R; s += 32) part += per_source[s];
#else
        for (int l = lane; l < EP_L; l += 32) part += per_expert[l];
#endif
        for (int offset = 16; offset > 0; offset >>= 1) part += __shfl_xor_sync(0xffffffffu, part, offset);
        if (lane == 0) {
            layout[EP_L + EP_R + EP_L * EP_R] = static_cast<ep_u32>(part);
            hs[H_STEP_OK] = 1;
            ws[WS_SEQ] = seq;
        }
    }
}


#if !EP_LL_BITMAP
// Counting per warp: each of EP_UPDATE_WARPS warps counts a contiguous chunk of tokens in token
// order, then the chunks' counts become exclusive prefixes (for configurations whose bitmaps
// below do not fit in shared memory).
EP_DEVICE void ep_ll_update_rank(const EpArgs& args, int rank) {
    ep_u32* ws = ep_ws(args, rank);
    ep_u32* hs = ep_hs(args, rank);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const ep_u32 seq = ws[WS_SEQ] + 1;
    const int parity = seq & 1;
    const ep_u64 mask = ep_block_mask(args);   // one value for the whole block: every thread takes the same branches

    __shared__ int counts[EP_UPDATE_WARPS][EP_E + EP_R];   // per warp: experts, then ranks
    __shared__ int bad;
    if (threadIdx.x == 0) {
        bad = 0;
        hs[H_STEP_OK] = 0;
        hs[H_SEQ] = seq;
    }
    for (int i = threadIdx.x; i < EP_UPDATE_WARPS * (EP_E + EP_R); i += blockDim.x) (&counts[0][0])[i] = 0;
    __syncthreads();
    if (!ep_active(mask, rank)) {
        if (threadIdx.x == 0) ws[WS_SEQ] = seq;
        return;
    }

    // Load the routing once (coalesced) into shared memory, validating it: every entry -1 or
    // in [0, E); no expert twice in a row. Experts on inactive ranks become -1. Each thread
    // issues EP_UPDATE_LOADS loads before it uses any of them: one global round trip, not one per entry.
    __shared__ int routing[EP_BMAX * EP_K];    // the expert; after pass 2 also its position (ep_ll_pack)
    __shared__ ep_u32 destinations[EP_BMAX];   // bit d set: the token goes to rank d
    ep_ll_each_routing_entry(args, rank, tokens, [&](int i, long long e) {
        if (e < -1 || e >= EP_E) {
            ep_set_status(ws, EP_STATUS_INDEX_RANGE, i / EP_K, i % EP_K, static_cast<ep_u32>(e));
            bad = 1;
        }
        routing[i] = e >= 0 && e < EP_E ? static_cast<int>(e) : -1;   // unmasked, for the repeat check
    });
    __syncthreads();
    ep_ll_report_repeats(ws, routing, tokens, bad);
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
    // Exclusive prefix over warps; the totals go to every active rank's table.
    ep_publish_row(args, rank, mask, WS_COUNTS + parity * EP_R * (EP_E + EP_R), seq * 2 + (bad ? 1 : 0),
                   [&](int i) { return ep_warp_prefix(counts, i); });

    // Pass 2: this rank's position of each selection / pair among its own, in token order. A
    // pair's row is final here; a selection's position waits in `routing` for the lower ranks' counts.
    for (int t = begin; t < end; ++t) {
        if (lane < EP_K) {
            const int e = expert(t, lane);
            if (e >= 0) routing[t * EP_K + lane] = ep_ll_pack(e, counts[warp][e]++);
        }
        if (lane < EP_R) {
            int row = -1;
            if (goes_to(t, lane)) row = rank * EP_BMAX + counts[warp][EP_E + lane]++;
            hs[H_PAIR_ROW + t * EP_R + lane] = static_cast<ep_u32>(row);
        }
        __syncwarp();
    }

    ep_ll_update_finish(args, rank, ws, hs, mask, seq, bad, tokens, routing, &counts[0][0], nullptr);
}
#else
// Counting with bitmaps: bit t of expert e's row says token t selects e (and of rank d's row,
// that it goes to rank d). A selection's position among this rank's selections of its expert,
// in token order, is the number of bits below t in its row: every selection at once, no pass
// over the tokens in order. The rows fit in shared memory for E × ceil(Bmax / 32) small
// enough (the host checks, EP_LL_BITMAP).
#define EP_WORDS ((EP_BMAX + 31) / 32)
#define EP_LL_SCRATCH (2 * EP_E * EP_WORDS > 2 * EP_E + EP_L + EP_R ? 2 * EP_E * EP_WORDS : 2 * EP_E + EP_L + EP_R)

// Marks selection (token t, expert e in [0, E)) in a rank's bitmaps: bit t of expert e's words
// (`experts`: E rows of EP_WORDS) and, where e's rank is active, of that destination's words
// (`ranks`: R rows). True where the expert's bit was set already: the token names e twice. The
// update and the own-rows dispatch blocks (below) mark the same bits.
EP_DEVICE bool ep_ll_mark_selection(ep_u32* experts, ep_u32* ranks, ep_u64 mask, int t, int e) {
    const ep_u32 bit = 1u << (t % 32);
    const bool repeat = atomicOr(&experts[e * EP_WORDS + t / 32], bit) & bit;
    if (ep_active(mask, e / EP_L)) atomicOr(&ranks[(e / EP_L) * EP_WORDS + t / 32], bit);
    return repeat;
}
EP_DEVICE void ep_ll_update_rank(const EpArgs& args, int rank) {
    ep_u32* ws = ep_ws(args, rank);
    ep_u32* hs = ep_hs(args, rank);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const ep_u32 seq = ws[WS_SEQ] + 1;
    const int parity = seq & 1;
    const ep_u64 mask = ep_block_mask(args);   // one value for the whole block: every thread takes the same branches

    __shared__ int scratch[EP_LL_SCRATCH];        // [E][words] bits, then [E][words] prefixes; later ep_ll_update_finish's
    __shared__ ep_u32 ranks_bits[2][EP_R][EP_WORDS];   // [0] bit t: token t goes to rank d; [1] prefixes
    __shared__ int routing[EP_BMAX * EP_K];       // the expert, then ep_ll_pack(expert, position)
    __shared__ int totals[EP_E + EP_R];           // this rank's counts, as published
    __shared__ int bad, repeated;
    ep_u32* bits = reinterpret_cast<ep_u32*>(scratch);
    int* prefix = scratch + EP_E * EP_WORDS;
    if (threadIdx.x == 0) {
        bad = 0;
        repeated = 0;
        hs[H_STEP_OK] = 0;
        hs[H_SEQ] = seq;
    }
    for (int i = threadIdx.x; i < EP_E * EP_WORDS; i += blockDim.x) bits[i] = 0u;
    for (int i = threadIdx.x; i < EP_R * EP_WORDS; i += blockDim.x) (&ranks_bits[0][0][0])[i] = 0u;
    __syncthreads();
    if (!ep_active(mask, rank)) {
        if (threadIdx.x == 0) ws[WS_SEQ] = seq;
        return;
    }

    // Load the routing (coalesced, EP_UPDATE_LOADS entries a thread in flight), validate it and
    // set the bits. A bit already set means the token names an expert twice (found exactly below).
    ep_ll_each_routing_entry(args, rank, tokens, [&](int i, long long e) {
        const int t = i / EP_K;
        int kept = -1;
        if (e < -1 || e >= EP_E) {
            ep_set_status(ws, EP_STATUS_INDEX_RANGE, t, i % EP_K, static_cast<ep_u32>(e));
            bad = 1;
        } else if (e >= 0) {
            kept = static_cast<int>(e);
            if (ep_ll_mark_selection(bits, &ranks_bits[0][0][0], mask, t, kept)) repeated = 1;
        }
        routing[i] = kept;
    });
    __syncthreads();
    if (repeated) {   // the error path: name the first repeat of each token as the host does
        ep_ll_report_repeats(ws, routing, tokens, bad);
        __syncthreads();
    }

    // Counts and per-word exclusive prefixes: a row per expert, then per rank.
    for (int row = threadIdx.x; row < EP_E + EP_R; row += blockDim.x) {
        const ep_u32* words = row < EP_E ? bits + row * EP_WORDS : ranks_bits[0][row - EP_E];
        int* out = row < EP_E ? prefix + row * EP_WORDS : reinterpret_cast<int*>(ranks_bits[1][row - EP_E]);
        int running = 0;
#pragma unroll 4
        for (int w = 0; w < EP_WORDS; ++w) {
            out[w] = running;
            running += __popc(words[w]);
        }
        // Experts on inactive ranks count nothing (their bits are only for the repeat check).
        totals[row] = bad || (row < EP_E && !ep_active(mask, row / EP_L)) ? 0 : running;
    }
    __syncthreads();
#if EP_LL_SOLO
    (void)parity;
#else
    ep_publish_row(args, rank, mask, WS_COUNTS + parity * EP_R * (EP_E + EP_R), seq * 2 + (bad ? 1 : 0),
                   [&](int i) { return totals[i]; });
#endif

    // Positions while the peers' counts travel: each selection's among this rank's selections of
    // its expert, and each (token, rank) pair's final row (rank-major: this rank's zone there).
    for (int i = threadIdx.x; i < tokens * EP_K; i += blockDim.x) {
        const int e = routing[i], t = i / EP_K;
        int packed = -1;
        if (!bad && e >= 0 && ep_active(mask, e / EP_L)) {
            const ep_u32 below = bits[e * EP_WORDS + t / 32] & ((1u << (t % 32)) - 1u);
            packed = ep_ll_pack(e, prefix[e * EP_WORDS + t / 32] + __popc(below));
        }
        routing[i] = packed;
    }
    for (int i = threadIdx.x; i < tokens * EP_R; i += blockDim.x) {
        const int t = i / EP_R, d = i % EP_R;
        const ep_u32 word = ranks_bits[0][d][t / 32], bit = 1u << (t % 32);
        int row = -1;
        if (!bad && (word & bit)) row = rank * EP_BMAX + static_cast<int>(ranks_bits[1][d][t / 32]) + __popc(word & (bit - 1u));
        hs[H_PAIR_ROW + i] = static_cast<ep_u32>(row);
    }
    __syncthreads();   // the bits and prefixes are done with: the scratch is ep_ll_update_finish's
    ep_ll_update_finish(args, rank, ws, hs, mask, seq, bad, tokens, routing, scratch, totals);
}
#endif

extern "C" __global__ void __launch_bounds__(EP_UPDATE_WARPS * 32, 1)
ep_ll_update(const EpArgs args) {
    ep_grid_dependency();
    ep_ll_update_rank(args, static_cast<int>(blockIdx.y + args.first_rank));
}

// ------------------------------------------------------------------------------------------
// Dispatch: a warp per token; the row is read once and written to each of its slots.

// Dispatch loads a piece's first units with its row lookups (ep_load_piece_ahead, EP_LL_AHEAD): an
// H200, one rank: ll-1 dispatch 7.4 → 6.6-7.2 µs, ll-std upd+disp 15.1 → 14.6; FP8 quantised here,
// ll-std dispatch 25.3 → 24.7 (R = 8) and 9.4 → 8.7 (R = 1).
#ifndef EP_LL_AHEAD
#define EP_LL_AHEAD 1
#endif
#define EP_LL_LOADS_AHEAD (EP_LL_AHEAD && EP_AHEAD_FITS)

// Update and dispatch in one launch (EP_LL_OWN): the dispatch blocks find their selections' rows
// themselves instead of waiting for the update block's ready flag, which comes after the update's
// all-gather and final rows. Each reads the routing into its own shared memory: this rank's as the
// update's bitmaps (bit t of expert e's words: token t selects e; of destination d's: token t
// sends a row there), the lower active ranks' as counts per expert (a row is the expert's zone
// start, the lower ranks' rows of the expert, then this rank's tokens below t that select it, as
// the update computes it). It checks every active rank's routing as the update does (ids in
// [-1, E), no expert twice in a token) and moves nothing where one fails, as the update voids the
// step and names the entry. The update block still writes the handle (rows, layout, step word)
// for combine, and the counts; it takes the rank's last share of the items, which the host leaves
// empty where the grid has room (one block more than the items need), so that a launch of few
// tokens moves its rows without waiting for it. Other ranks' tokens are read a thread per token, its K ids at
// once (EP_K ≤ 8 where R > 1), so every rank must be in this launch (virtual ranks, EP_ONE_DEVICE) or
// there is none but this one: an NCCL rank of several waits (the host says so with EP_LL_OWN_FITS=0
// too). EP_LL_OWN_ROWS=0 keeps the wait (for comparing the two).
#ifndef EP_LL_OWN_ROWS
#define EP_LL_OWN_ROWS 1
#endif
#ifndef EP_LL_OWN_FITS
#define EP_LL_OWN_FITS 0   // the host's word that EpOwnRows fits beside the update's arrays (GroupConfig.llOwnRowsFit)
#endif
#define EP_LL_OWN (EP_LL_OWN_ROWS && EP_LL_OWN_FITS && EP_LL_BITMAP && EP_FUSED && EP_TRANSPORT == 0 && (EP_R == 1 || (EP_K <= 8 && EP_ONE_DEVICE)))
#if EP_LL_OWN
struct EpOwnRows {
    ep_u32 words[(EP_E + EP_R) * EP_WORDS];   // this rank's tokens: per expert, then per destination rank
    int before[EP_E];                         // rows of the lower active ranks, per expert (EP_OWN_NO_ROW: on an inactive rank)
    int bad;
};
__shared__ EpOwnRows ep_own_rows;   // a block's, only in the fused kernel's dispatch blocks
#define EP_OWN_NO_ROW (-(1 << 30))   // makes any row of the expert negative: none

// Builds ep_own_rows for rank `rank` (every rank of the group is in this launch: ranks 0..R-1).
// Call from every thread of the block.
EP_DEVICE void ep_ll_own_rows(const EpArgs& args, int rank) {
    EpOwnRows& own = ep_own_rows;
    const ep_u64 mask = ep_block_mask(args);
    for (int i = threadIdx.x; i < (EP_E + EP_R) * EP_WORDS; i += blockDim.x) own.words[i] = 0u;
    for (int i = threadIdx.x; i < EP_E; i += blockDim.x) own.before[i] = ep_active(mask, i / EP_L) ? 0 : EP_OWN_NO_ROW;
    if (threadIdx.x == 0) own.bad = 0;
    __syncthreads();
    // This rank: bits, and a bit already set is an expert named twice in a token.
    ep_ll_each_routing_entry(args, rank, static_cast<int>(args.rank[rank].tokens), [&](int i, long long e) {
        if (e < -1 || e >= EP_E) {
            own.bad = 1;
        } else if (e >= 0 && ep_ll_mark_selection(own.words, own.words + EP_E * EP_WORDS, mask, i / EP_K, static_cast<int>(e))) {
            own.bad = 1;
        }
    });
#if EP_R > 1
    // The other active ranks: a thread per token, its ids checked against each other; the lower
    // ranks' selections of experts on active ranks counted.
    for (int i = threadIdx.x; i < EP_R * EP_BMAX; i += blockDim.x) {
        const int source = i / EP_BMAX, t = i % EP_BMAX;
        if (source == rank || !ep_active(mask, source) || t >= static_cast<int>(args.rank[source].tokens)) continue;
        long long ids[EP_K];
#pragma unroll
        for (int c = 0; c < EP_K; ++c) ids[c] = ep_read_index(args, source, t * EP_K + c);
        bool wrong = false;
#pragma unroll
        for (int c = 0; c < EP_K; ++c) {
            const long long e = ids[c];
            if (e < -1 || e >= EP_E) wrong = true;
#pragma unroll
            for (int p = 0; p < c; ++p) wrong |= e >= 0 && ids[p] == e;
            if (source < rank && e >= 0 && e < EP_E && ep_active(mask, static_cast<int>(e) / EP_L)) atomicAdd(&own.before[e], 1);
        }
        if (wrong) own.bad = 1;
    }
#endif
    __syncthreads();
}

// Bits below token t in a row of ep_own_rows's words.
EP_DEVICE int ep_ll_own_below(const ep_u32* words, int t) {
    int n = __popc(words[t / 32] & ((1u << (t % 32)) - 1u));
#pragma unroll 4
    for (int w = 0; w < EP_WORDS; ++w) n += w < t / 32 ? __popc(words[w]) : 0;
    return n;
}
#endif

// One block's share of rank `rank`'s dispatch (`block`: which of the rank's blocks it is).
// OWN (the fused kernel with EP_LL_OWN): `block` counts the rank's update block last, and every
// other block's rows come from its ep_own_rows, not the handle; the update block writes the
// rank's counts. Otherwise block 0 writes them.
template <bool OWN>
EP_DEVICE void ep_ll_dispatch_rank(const EpArgs& args, int rank, EpBlock block) {
    const bool updated_here = OWN && block.index == block.count - 1;
    const bool own = OWN && !updated_here;
    const bool counts = OWN ? updated_here : block.index == 0;
    ep_u32* ws = ep_ws(args, rank);
    const ep_u32* hs = ep_hs(args, rank);
    // The step word and call number load while the block agrees on one mask (a peer may mask a
    // rank at any time: every thread must take the same branches).
#if EP_LL_OWN
    const ep_u32 step_ok = own ? (ep_own_rows.bad ? 0u : 1u) : hs[H_STEP_OK];
    const ep_u32* own_words = ep_own_rows.words;
#else
    const ep_u32 step_ok = hs[H_STEP_OK];
#endif
    const ep_u32 seq = ep_call_number(ws, WS_DISP_CALLS, args.sync);
    const ep_u64 mask = ep_block_mask(args);
    const bool signal = args.sync & EP_SYNC_SIGNAL;
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32;
    const int slices = static_cast<int>(args.slices);
    const int per_slice = (EP_WIRE_UNITS + slices - 1) / slices;
    // A rank that takes no part still counts a call that publishes flags, so call numbers agree.
    const bool moving = ep_active(mask, rank) && step_ok != 0;
    ep_write_counts(args, rank, hs + H_LAYOUT, moving, counts);
    if (!moving && !signal) return;
    __shared__ EpWarpRows table;

    const int items = (args.sync & EP_SYNC_NO_DATA) || !moving ? 0 : tokens * slices;
    for (int item = block.index * warps + warp; item < items; item += block.count * warps) {
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_WIRE_UNITS, first + per_slice);
#if EP_LL_LOADS_AHEAD
        EpAhead ahead;
        ep_load_piece_ahead(args, rank, t, first, last, lane, ahead);
#endif
#if EP_RANK_MAJOR
        // One row per destination rank, plus its local idx and weights (written with piece 0).
        ep_u8* target = nullptr;
        int row = -1;
        // The token's expert ids and weights, loaded with its rows (written with piece 0).
        const bool routing_lane = piece == 0 && lane < EP_K;
        const long long e = routing_lane ? ep_read_index(args, rank, t * EP_K + lane) : -1;
        const float weight = routing_lane ? reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane] : 0.0f;
        if (lane < EP_R) {
#if EP_LL_OWN
            if (own) {
                const ep_u32* sends = own_words + (EP_E + lane) * EP_WORDS;
                row = (sends[t / 32] >> (t % 32)) & 1u ? rank * EP_BMAX + ep_ll_own_below(sends, t) : -1;
            } else
#endif
            row = static_cast<int>(hs[H_PAIR_ROW + t * EP_R + lane]);
            if (row >= 0) target = ep_put_row_target(args, lane, static_cast<ep_u64>(row));
        }
        table.address[warp][lane] = reinterpret_cast<ep_u64>(target);
        ep_publish_scales_target(args, table, warp, lane, lane, row);
        __syncwarp();
        for (int d = 0; d < EP_R; ++d) {
            const int drow = __shfl_sync(0xffffffffu, row, d);
            if (drow < 0 || piece != 0) continue;
            if (lane == 0) ep_put_origin(args, d, H_ORIGIN, static_cast<ep_u64>(drow), rank, t);
            if (lane < EP_K) {
                const bool here = e >= 0 && e / EP_L == d && ep_active(mask, d);
                ep_put_received(args, d, static_cast<ep_u64>(drow) * EP_K + lane, here ? static_cast<int>(e % EP_L) : -1, here ? weight : 0.0f);
            }
        }
        const int fanout = EP_R;
#else
        ep_u8* target = nullptr;
        int row = -1, destination = 0;
        if (lane < EP_K) {
            const int e = static_cast<int>(ep_read_index(args, rank, t * EP_K + lane));   // loads with the row
#if EP_LL_OWN
            if (own) {
                row = e >= 0 ? (e % EP_L) * EP_R * EP_BMAX + ep_own_rows.before[e] + ep_ll_own_below(own_words + e * EP_WORDS, t) : -1;
            } else
#endif
            row = static_cast<int>(hs[H_SEL_ROW + t * EP_K + lane]);
            if (row >= 0) {
                destination = e / EP_L;
                target = ep_put_row_target(args, destination, static_cast<ep_u64>(row));
                if (piece == 0) ep_put_origin(args, destination, H_ORIGIN, static_cast<ep_u64>(row), rank, t * EP_K + lane);
            }
        }
        table.address[warp][lane] = reinterpret_cast<ep_u64>(target);
        ep_publish_scales_target(args, table, warp, lane, destination, row);
        __syncwarp();
        const int fanout = EP_K;
#endif
#if EP_LL_LOADS_AHEAD
        ep_send_piece_ahead<fanout>(args, rank, t, table, warp, first, last, piece, lane, ahead);
#else
        ep_send_piece<fanout>(args, rank, t, table, warp, first, last, piece, lane);
#endif
        __syncwarp();   // every lane is done with this item's table before the next overwrites it
    }
    ep_arrive_and_wait(args, rank, mask, WS_DISP_BLOCKS, WS_DISP_CALLS, WS_DISP_DONE, seq, signal, signal, moving,
                       moving && (args.sync & EP_SYNC_WAIT), block);
}

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_dispatch(const EpArgs args) {
    ep_grid_dependency();
    ep_ll_dispatch_rank<false>(args, static_cast<int>(blockIdx.y + args.first_rank), ep_grid_block());
}

#if EP_TRANSPORT == 0 && EP_FUSED
// Update and dispatch in one launch covering every local rank (gridDim.y ranks of gridDim.x
// blocks each). Blocks take their place by arrival, not by blockIdx: the first gridDim.y blocks
// to start are the ranks' update blocks, so a waiting block never waits for a block that has not
// started (the update blocks, which wait for each other's counts, are all running; an NCCL rank's
// launch has one, which waits for its peers' update blocks in their own launches). The rank's
// other blocks find their rows themselves (EP_LL_OWN, above) or wait for its update block, then
// every block dispatches its share. The last block past that point resets the launch's words for
// the next launch (which the stream orders after).
extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_update_dispatch(const EpArgs args) {
    ep_grid_dependency();
    __shared__ int place;
    ep_u32* launch = ep_hs(args, static_cast<int>(args.first_rank));
    const int ranks = static_cast<int>(gridDim.y);
    if (threadIdx.x == 0) {
        place = static_cast<int>(atomicAdd(launch + H_TICKET, 1u));
    }
    __syncthreads();
    const int rank = static_cast<int>(args.first_rank) + place % ranks;
    const EpBlock block = {place / ranks, static_cast<int>(gridDim.x)};
    ep_u32* hs = ep_hs(args, rank);
#if EP_LL_OWN
    if (block.index != 0) ep_ll_own_rows(args, rank);
#endif
    const bool updates = block.index == 0;
    if (updates) {
        ep_ll_update_rank(args, rank);
#if !EP_LL_OWN   // with EP_LL_OWN no block waits for the ready flag
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            ep_store_release_gpu(hs + H_READY, 1u);
        }
#endif
    } else if (threadIdx.x == 0 && !EP_LL_OWN) {
        // The update block is running; its own waits end within the timeout. Past twice that it
        // is stuck for good: the step is void here (the dispatch below then moves nothing, and
        // counts its call as a rank without a step does).
        if (!ep_wait_flag_gpu(hs + H_READY, 1u, 2 * args.timeout_ns + 1000000000ull)) {
            ep_set_status(ep_ws(args, rank), EP_STATUS_TIMEOUT, static_cast<ep_u32>(rank), 0, 0);
            hs[H_STEP_OK] = 0u;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // Every ready flag of this launch is written before its block counts itself passed (the
        // fence orders the release store before the add), and the resets come after the last add.
        __threadfence();
        if (atomicAdd(launch + H_PASSED, 1u) == gridDim.x * gridDim.y - 1) {
            __threadfence();
            if (!EP_LL_OWN) for (int r = 0; r < ranks; ++r) ep_hs(args, static_cast<int>(args.first_rank) + r)[H_READY] = 0u;
            launch[H_TICKET] = 0u;
            launch[H_PASSED] = 0u;
        }
    }
    // With EP_LL_OWN the update block takes the last share of the items (empty where the host
    // gave the launch one block more than they need).
    ep_ll_dispatch_rank<EP_LL_OWN>(args, rank, {EP_LL_OWN ? (block.index + block.count - 1) % block.count : block.index, block.count});
}
#endif

// ------------------------------------------------------------------------------------------
// Combine: a warp per token pulls the rows of its selections (expert-major) or of its
// destination ranks (rank-major) and reduces them: float32, one fused multiply-add per term,
// in ascending k (expert-major) or ascending rank (rank-major), one rounding at the end.

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_combine(const EpArgs args) {
    ep_grid_dependency();
#if EP_ELEM != 3
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    const ep_u32* hs = ep_hs(args, rank);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32;
    const int slices = static_cast<int>(args.slices);
    const int items = tokens * slices;
    const int stride = gridDim.x * warps;
    // This lane's routing of one item: its row and (expert-major) expert and weight. Loaded
    // together (no load waits for another), and for the first item together with the mask and
    // step words below, so a warp's first data load waits for one round trip, not five. Before
    // the step check the values may be stale; they are used only after it.
    struct Routing { int row; int expert; float weight; };
    auto fetch = [&](int item) -> Routing {
        Routing r = {-1, -1, 1.0f};
        if (item >= items) return r;
        const int t = item / slices;
#if EP_RANK_MAJOR
        if (lane < EP_R) r.row = static_cast<int>(hs[H_PAIR_ROW + t * EP_R + lane]);
#else
        if (lane < EP_K) {
            r.row = static_cast<int>(hs[H_SEL_ROW + t * EP_K + lane]);
            r.expert = static_cast<int>(ep_read_index(args, rank, t * EP_K + lane));
            if (args.weighted) r.weight = reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane];
        }
#endif
        return r;
    };
    int item = blockIdx.x * warps + warp;
    Routing next = fetch(item);
    const ep_u32 step_ok = hs[H_STEP_OK];
    const ep_u32 seq = ep_call_number(ws, WS_COMB_CALLS, args.sync);
    const ep_u64 mask = ep_block_mask(args);   // one value: ep_combine_begin's branches hold barriers
    if (!ep_combine_begin(args, rank, ws, mask, step_ok, seq)) return;
    // The start mask waits in shared memory for the end of the call, not in a register.
    __shared__ ep_u64 start_mask;
    if (threadIdx.x == 0) start_mask = mask;
    // Only a wait can have masked a peer since the mask was read.
    const ep_u64 live = (args.sync & EP_SYNC_WAIT) ? ep_load_mask(args) : mask;
    ep_u8* out = reinterpret_cast<ep_u8*>(args.rank[rank].out);
    __shared__ EpWarpRows table;
    const int per_slice = (EP_ROW_VECS + slices - 1) / slices;

    for (; item < items; item += stride) {
        const Routing mine = next;
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_ROW_VECS, first + per_slice);
#if EP_RANK_MAJOR
        const ep_u8* source = nullptr;
        if (lane < EP_R && ep_active(live, lane) && mine.row >= 0) {
            source = reinterpret_cast<const ep_u8*>(ep_expert_row(args, rank, lane, static_cast<ep_u64>(mine.row), static_cast<ep_u64>(t) * EP_R + lane));
        }
        const float weight = 1.0f;
        const int fanout = EP_R;
#else
        const ep_u8* source = nullptr;
        float weight = 0.0f;
        if (lane < EP_K && mine.row >= 0 && ep_active(live, mine.expert / EP_L)) {
            source = reinterpret_cast<const ep_u8*>(ep_expert_row(args, rank, mine.expert / EP_L, static_cast<ep_u64>(mine.row),
                                                                  static_cast<ep_u64>(t) * EP_K + lane));
            weight = mine.weight;
        }
        const int fanout = EP_K;
#endif
        next = fetch(item + stride);   // in flight while this item's rows stream
        table.address[warp][lane] = reinterpret_cast<ep_u64>(source);
        table.weight[warp][lane] = weight;
        __syncwarp();
        // One vector per lane per step; EP_CHUNK rows' loads in flight before their first use,
        // then the fused multiply-adds in ascending order. (Measured on an H100: two vectors per
        // lane, as 1 KB runs per warp, or as two 512 B runs, were both slower.)
        ep_u8* row_out = out + static_cast<ep_u64>(t) * EP_ROW_BYTES;
        // Last vectors first: dispatch wrote each piece front to back, so its ends are the lines
        // most likely still in L2 when combine starts.
        for (int k = lane; k < last - first; k += 32) {
            const int v = last - 1 - k;
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
    if (!done) return;
    __syncthreads();
    // The start mask, not `live`: a peer masked for missing the ready wait may only be slow and
    // still be reading our rows; waiting (bounded) for it keeps the next step from overwriting them.
    // The call number is read again rather than kept through the loop (registers): only this
    // launch's last block advances it, after every block has passed this point.
    ep_arrive_and_wait(args, rank, start_mask, WS_COMB_BLOCKS, WS_COMB_CALLS, WS_COMB_DONE, ep_call_number(ep_ws(args, rank), WS_COMB_CALLS, args.sync),
                       done, args.sync & EP_SYNC_SIGNAL, true, done);
#endif
}

// ------------------------------------------------------------------------------------------
// The staged transport's halves (ep_transport.cuh): dispatch's rows wait in the destination's
// staging area until it drains them, and combine's expert side puts its rows back into their
// sources' staging areas before they reduce. One warp per row; every rank's blocks as above.

#if EP_TRANSPORT == 1
// Whether row `row` of this rank's receive buffer holds a row of this step (the layout's zones).
EP_DEVICE bool ep_ll_row_used(const ep_u32* layout, int row) {
#if EP_RANK_MAJOR
    return row % EP_BMAX < static_cast<int>(layout[EP_L + row / EP_BMAX]);
#else
    return row % (EP_R * EP_BMAX) < static_cast<int>(layout[row / (EP_R * EP_BMAX)]);
#endif
}

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_drain(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    const ep_u32* hs = ep_hs(args, rank);
    if (!ep_active(ep_load_mask(args), rank) || hs[H_STEP_OK] == 0) return;
    const ep_u32* layout = hs + H_LAYOUT;
    const EpStage& stage = ep_stage(args, rank);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < EP_LL_ROWS; row += gridDim.x * warps) {
        if (ep_ll_row_used(layout, row)) ep_drain_row(args, rank, stage, row, EP_RANK_MAJOR ? EP_K : 0, lane);   // rank-major rows carry ids
    }
}

// Combine's expert side: each row of this rank's expert outputs goes back to its source's
// staging, at (token × K + k) expert-major, (token × R + this rank) rank-major.
extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_combine_send(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    const ep_u32* hs = ep_hs(args, rank);
    const ep_u64 mask = ep_load_mask(args);
    if (!ep_active(mask, rank) || hs[H_STEP_OK] == 0) return;
    const ep_u32* layout = hs + H_LAYOUT;
    const ep_u32* origin = hs + H_ORIGIN;
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < EP_LL_ROWS; row += gridDim.x * warps) {
        if (!ep_ll_row_used(layout, row)) continue;
        const ep_u32 from = origin[row];
        const int source = static_cast<int>(from >> EP_ORIGIN_INDEX_BITS);
        if (from == EP_ORIGIN_NONE || !ep_active(mask, source)) continue;
        const ep_u64 index = from & ((1u << EP_ORIGIN_INDEX_BITS) - 1);
#if EP_RANK_MAJOR
        ep_put_back_row(args, rank, source, row, index * EP_R + rank, lane);
#else
        ep_put_back_row(args, rank, source, row, index, lane);
#endif
    }
}
#endif

// ------------------------------------------------------------------------------------------
// An NCCL rank's combine from the caller's expert outputs: the step's received rows (per local
// expert from row l·R·BMAX expert-major, per source rank from row s·BMAX rank-major) copied into
// the buffer its peers read (ep_copy_received).
extern "C" __global__ void __launch_bounds__(512, 2)
ep_ll_copy_received(const EpArgs args) {
    ep_grid_dependency();
#if EP_RANK_MAJOR
    ep_copy_received(args, EP_R, [](int s) { return s * EP_BMAX; },
                     [](const ep_u32* hs, int s) { return static_cast<int>(min(hs[H_LAYOUT + EP_L + s], static_cast<ep_u32>(EP_BMAX))); });
#else
    ep_copy_received(args, EP_L, [](int l) { return l * EP_R * EP_BMAX; },
                     [](const ep_u32* hs, int l) { return static_cast<int>(min(hs[H_LAYOUT + l], static_cast<ep_u32>(EP_R * EP_BMAX))); });
#endif
}
