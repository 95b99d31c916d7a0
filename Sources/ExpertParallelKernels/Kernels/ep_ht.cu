// High-throughput (HT) update, dispatch and combine, for the flat and the padded expert-major
// layouts (docs/architecture.md, "Vocabulary"). Same shape as the LL kernels: one launch
// covers every rank of a virtual group, each rank's blocks reach the others only through the
// peer table and flags, and every slot follows the CPU oracle (RoutingPlan) exactly.

#ifndef EP_EXPERT_MAJOR
#define EP_EXPERT_MAJOR 0   // 0 flat [N, H]; 1 expert-major zones padded to EP_ALIGN rows
#endif
#ifndef EP_ALIGN
#define EP_ALIGN 1
#endif
#ifndef EP_DROP
#define EP_DROP 0           // overflow policy: 0 fail (report, write nothing), 1 drop (keep a prefix)
#endif
#ifndef EP_CAPACITY
#define EP_CAPACITY (EP_R * EP_BMAX)   // N: rows of each rank's receive buffer
#endif
#define EP_HT_UPDATE_WARPS 16
#ifndef EP_HT_CHUNKS
#define EP_HT_CHUNKS 1      // update: blocks per rank, each counting a chunk of the tokens (the host's choice)
#endif
#define EP_HT_AT_ONCE 8                                          // update: entries a thread reads before it writes
#define EP_HT_CHUNK_SHIFT 24                                     // a stored place: its chunk from this bit on (ep_ht_offset_row)
#define EP_HT_PLACE_MASK ((1 << EP_HT_CHUNK_SHIFT) - 1)
#define EP_HT_ROWS_AT_ONCE (EP_K >= 16 ? 1 : 16 / EP_K)          // update: token rows a thread reads before it writes
#define EP_FANOUT (EP_K > EP_R ? EP_K : EP_R)   // rows one token reduces at most

// Update: what the blocks read again from shared memory instead of global (EP_HT_STAGE, default 1),
// where it fits beside the update's own arrays: a chunk block's routing (validated and masked, for
// its two in-order passes) and the last block's all-gathered count table (zones, offsets, layout).
#ifndef EP_HT_STAGE
#define EP_HT_STAGE 1
#endif
#define EP_HT_CHUNK_MAX ((EP_BMAX + EP_HT_CHUNKS - 1) / EP_HT_CHUNKS)   // a chunk's tokens at most
#define EP_HT_SHARED_BASE (4 * ((EP_HT_UPDATE_WARPS + 4) * (EP_E + EP_R) + 2 * EP_E + 2 * EP_R))   // the update's own, bounded above
#define EP_HT_TABLE_BYTES (4 * EP_R * (EP_E + EP_R))
#define EP_HT_STAGE_TABLE (EP_HT_STAGE && EP_HT_SHARED_BASE + EP_HT_TABLE_BYTES <= 46 * 1024)
#define EP_HT_STAGE_ROUTING \
    (EP_HT_STAGE && EP_HT_SHARED_BASE + (EP_HT_STAGE_TABLE ? EP_HT_TABLE_BYTES : 0) + 4 * EP_HT_CHUNK_MAX * (EP_K + 1) <= 46 * 1024)

// HT workspace words after the shared ones, and a step's handle (StepWorkspace.swift mirrors both).
#define WS_KEPT (WS_COUNTS + 2 * EP_R * (EP_E + EP_R))      // [2][R][E + R] kept counts (drop)
#define WS_WORDS (WS_KEPT + 2 * EP_R * (EP_E + EP_R))
#define H_ROUTING H_COMMON                                  // [BMAX][K] expert after masking, or -1
#define H_DEST (H_ROUTING + EP_BMAX * EP_K)                 // [BMAX] bit d: the token goes to rank d
#define H_SEL_ROW (H_DEST + EP_BMAX)                        // [BMAX][K] slot of each selection (expert-major), less its offset
#define H_PAIR_ROW (H_SEL_ROW + EP_BMAX * EP_K)             // [BMAX][R] row of each (token, rank) less its offset, or -1
#define H_CHUNK (H_PAIR_ROW + EP_BMAX * EP_R)               // [CHUNKS][E + R] each chunk's counts, then its offsets (ep_ht_pair_row)
#define H_ARRIVED (H_CHUNK + EP_HT_CHUNKS * (EP_E + EP_R))  // update: chunk blocks done; upper half: those with a bad row (reset by the last)
#define H_LAYOUT (H_ARRIVED + 1)                            // [L], [R], [L][R], total, dropped, [L] offsets
#define H_ORIGIN (H_LAYOUT + EP_L + EP_R + EP_L * EP_R + 2 + EP_L)   // staged: [N] origin of each received row
EP_CHECK_ALGORITHM_CONTRACT("HT", EP_HT_UPDATE_WARPS, EP_CAPACITY)

EP_DEVICE int ep_round_up(int value) { return (value + EP_ALIGN - 1) / EP_ALIGN * EP_ALIGN; }

// Zone starts of every rank's experts (expert-major) and the rows each rank would receive,
// from an all-gathered count table. Threads < R work, one destination each.
EP_DEVICE void ep_ht_zones(const ep_u32* table, ep_u64 gathered, int* zone_start, int* required) {
    if (threadIdx.x >= EP_R) return;
    const int d = threadIdx.x;
    int running = 0;
#if EP_EXPERT_MAJOR
    for (int l = 0; l < EP_L; ++l) {
        int count = 0;
        for (int s = 0; s < EP_R; ++s) {
            if (ep_active(gathered, s)) count += static_cast<int>(table[s * (EP_E + EP_R) + d * EP_L + l]);
        }
        zone_start[d * EP_L + l] = running;
        running += ep_round_up(count);
    }
#else
    for (int s = 0; s < EP_R; ++s) {
        if (ep_active(gathered, s)) running += static_cast<int>(table[s * (EP_E + EP_R) + EP_E + d]);
    }
#endif
    required[d] = ep_active(gathered, d) ? running : 0;
}

// Rows destination d would hold with the full counts of sources [0, upto).
EP_DEVICE int ep_ht_rows_before(const ep_u32* full, ep_u64 gathered, int upto, int d) {
    int rows = 0;
#if EP_EXPERT_MAJOR
    for (int l = 0; l < EP_L; ++l) {
        int count = 0;
        for (int s = 0; s < upto; ++s) {
            if (ep_active(gathered, s)) count += static_cast<int>(full[s * (EP_E + EP_R) + d * EP_L + l]);
        }
        rows += ep_round_up(count);
    }
#else
    for (int s = 0; s < upto; ++s) {
        if (ep_active(gathered, s)) rows += static_cast<int>(full[s * (EP_E + EP_R) + EP_E + d]);
    }
#endif
    return rows;
}

// How many of this rank's tokens bound for d fit (a prefix in token order), or -1 when this
// rank holds the boundary of an expert-major destination and must walk its tokens.
EP_DEVICE int ep_ht_kept_tokens(const ep_u32* full, ep_u64 gathered, int rank, int d) {
    const int mine = static_cast<int>(full[rank * (EP_E + EP_R) + EP_E + d]);
    if (!ep_active(gathered, d)) return mine;
    if (ep_ht_rows_before(full, gathered, rank + 1, d) <= EP_CAPACITY) return mine;
    const int before = ep_ht_rows_before(full, gathered, rank, d);
    if (before > EP_CAPACITY) return 0;
#if EP_EXPERT_MAJOR
    return -1;
#else
    return min(mine, EP_CAPACITY - before);
#endif
}

// Expert-major boundary (one warp): walks this rank's tokens bound for d in order, adding their
// selections to the zones of the sources before it, while the padded zones fit.
EP_DEVICE void ep_ht_walk_boundary(const ep_u32* full, ep_u64 gathered, int rank, int d, int tokens, const int* routing,
                                   const ep_u32* destinations, int* zone_count, int* kept_tokens) {
    const int lane = threadIdx.x % 32;
    for (int l = lane; l < EP_L; l += 32) {
        int count = 0;
        for (int s = 0; s < rank; ++s) {
            if (ep_active(gathered, s)) count += static_cast<int>(full[s * (EP_E + EP_R) + d * EP_L + l]);
        }
        zone_count[l] = count;
    }
    __syncwarp();
    int taken = 0;
    for (int t = 0; t < tokens; ++t) {
        if (!((destinations[t] >> d) & 1u)) continue;
        const int e = lane < EP_K ? routing[t * EP_K + lane] : -1;
        const bool here = e >= 0 && e / EP_L == d;
        if (here) zone_count[e % EP_L] += 1;   // distinct experts per token: no two lanes collide
        __syncwarp();
        int rows = 0;
        for (int l = lane; l < EP_L; l += 32) rows += ep_round_up(zone_count[l]);
        for (int offset = 16; offset > 0; offset /= 2) rows += __shfl_xor_sync(0xffffffffu, rows, offset);
        if (rows > EP_CAPACITY) break;
        ++taken;
        __syncwarp();
    }
    if (lane == 0) kept_tokens[d] = taken;
    __syncwarp();
}

// The routing of tokens [t0, t0 + 32) ∩ [t0, end): lane c gets column c of each token in
// `experts` (-1 past the end or for lanes ≥ K), and the destination bits of token t0 + lane.
// `routing` and `destinations` start at token `origin` (0: the step's; a chunk's first: staged).
EP_DEVICE void ep_ht_load_batch(const int* routing, const ep_u32* destinations, int origin, int t0, int end,
                                int (&experts)[32], ep_u32& bits_of_lane_token) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) experts[j] = lane < EP_K && t0 + j < end ? routing[(t0 + j - origin) * EP_K + lane] : -1;
    bits_of_lane_token = t0 + lane < end ? destinations[t0 + lane - origin] : 0u;
}

// Token t's row of ids, validated (-1 or [0, E), no expert twice: else a status and `bad`), its
// experts on inactive ranks masked to -1, written to the step's routing with its destination bits
// (and to `staged_row` / `staged_bits` too, unless null).
EP_DEVICE void ep_ht_take_row(ep_u32* ws, ep_u64 mask, int t, const long long (&ids)[EP_K], int* routing, ep_u32* destinations,
                              int& bad, int* staged_row = nullptr, ep_u32* staged_bits = nullptr) {
    int row[EP_K];
#pragma unroll
    for (int c = 0; c < EP_K; ++c) {
        const long long e = ids[c];
        if (e < -1 || e >= EP_E) {
            ep_set_status(ws, EP_STATUS_INDEX_RANGE, t, c, static_cast<ep_u32>(e));
            bad = 1;
        }
        row[c] = e >= 0 && e < EP_E ? static_cast<int>(e) : -1;
    }
#pragma unroll
    for (int c = 0; c < EP_K; ++c) {
#pragma unroll
        for (int p = 0; p < c; ++p) {
            if (row[c] >= 0 && row[p] == row[c]) {
                ep_set_status(ws, EP_STATUS_REPEATED, t, (static_cast<ep_u32>(p) << 16) | c, static_cast<ep_u32>(row[c]));
                bad = 1;
            }
        }
    }
    ep_u32 bits = 0;
#pragma unroll
    for (int c = 0; c < EP_K; ++c) {
        const int e = row[c] >= 0 && ep_active(mask, row[c] / EP_L) ? row[c] : -1;
        routing[t * EP_K + c] = e;
        if (staged_row != nullptr) staged_row[c] = e;
        if (e >= 0) bits |= 1u << (e / EP_L);
    }
    destinations[t] = bits;
    if (staged_bits != nullptr) *staged_bits = bits;
}

// The prefetched batch becomes the current one (registers: both arrays are indexed by constants).
EP_DEVICE void ep_ht_next_batch(int (&experts)[32], ep_u32& bits, const int (&next_experts)[32], ep_u32 next_bits) {
#pragma unroll
    for (int j = 0; j < 32; ++j) experts[j] = next_experts[j];
    bits = next_bits;
}

// values[i] = rewrite(i, values[i], with[i]) for i in [0, n) (`with` may be null: 0), written only
// where it changes. A thread reads EP_HT_AT_ONCE entries before it writes one: the arrays share
// the handle, so the compiler keeps a plain loop's next reads behind this one's write (a round
// trip each; 64 of them a loop at 4096 tokens).
template <typename Rewrite>
EP_DEVICE void ep_ht_rewrite(int* values, const int* with, int n, Rewrite rewrite) {
    for (int base = threadIdx.x; base < n; base += EP_HT_AT_ONCE * blockDim.x) {
        int value[EP_HT_AT_ONCE], other[EP_HT_AT_ONCE];
#pragma unroll
        for (int j = 0; j < EP_HT_AT_ONCE; ++j) {
            const int i = base + j * blockDim.x;
            value[j] = i < n ? values[i] : 0;
            other[j] = i < n && with != nullptr ? with[i] : 0;
        }
#pragma unroll
        for (int j = 0; j < EP_HT_AT_ONCE; ++j) {
            const int i = base + j * blockDim.x;
            if (i >= n) break;
            const int v = rewrite(i, value[j], other[j]);
            if (v != value[j]) values[i] = v;
        }
    }
}

// ------------------------------------------------------------------------------------------
// Update: EP_HT_CHUNKS blocks per rank, each over a contiguous chunk of the rank's tokens: it
// validates and masks its rows and counts per expert and per destination rank in token order,
// giving each selection and pair its position within the chunk. The rank's last block to finish
// turns the chunks' counts into prefixes, all-gathers the rank's counts, checks every
// destination's capacity and fixes every row: pairs (flat) and selections (expert-major) in
// (source rank, token) order. Only that block waits for peers; the others never wait.

// Tokens of each chunk (at least 1, so token t is in chunk t / size).
EP_DEVICE int ep_ht_chunk_size(int tokens) { return max(1, (tokens + EP_HT_CHUNKS - 1) / EP_HT_CHUNKS); }

// Dispatch and combine read rows through these. The update stores a pair's or selection's place
// within its token's chunk, with the chunk in bits EP_HT_CHUNK_SHIFT and up (-1: none), and
// leaves each chunk's offsets in H_CHUNK: per column (E + destination for pairs, the expert for
// selections), the rows before the chunk's first. With one chunk the offset's read does not wait
// for the stored place's (the latency of small steps); with more it does: finding the chunk from
// t instead takes a division whose registers the HT combine does not have.
EP_DEVICE int ep_ht_offset_row(const int* offsets, int column, int stored) {
    const int chunk = EP_HT_CHUNKS == 1 ? 0 : max(stored, 0) >> EP_HT_CHUNK_SHIFT;
    const int offset = offsets[chunk * (EP_E + EP_R) + column];
    return stored < 0 ? stored : (stored & EP_HT_PLACE_MASK) + offset;
}

// Row of token t at destination d (flat), or -1. `pair_rows`: hs + H_PAIR_ROW.
EP_DEVICE int ep_ht_pair_row(const int* pair_rows, int t, int d) {
    return ep_ht_offset_row(pair_rows + (H_CHUNK - H_PAIR_ROW), EP_E + d, pair_rows[t * EP_R + d]);
}

// Slot of token t's selection c, of expert e (expert-major), or -1 (always for e = -1, whose
// offset is then read from column 0, inside the table). `selection_rows`: hs + H_SEL_ROW.
EP_DEVICE int ep_ht_selection_slot(const int* selection_rows, int t, int c, int e) {
    return ep_ht_offset_row(selection_rows + (H_CHUNK - H_SEL_ROW), max(e, 0), selection_rows[t * EP_K + c]);
}

// Chunk `index`, tokens [first, last) of the rank's (empty past the last token), by one block:
// validate and mask the rows, count per warp in token order, write the chunk's totals to its row
// of H_CHUNK and each selection's and pair's position within the chunk (-1 for none). `counts`
// is zero on entry.
EP_DEVICE void ep_ht_count_chunk(const EpArgs& args, int rank, ep_u64 mask, int index, int first, int last,
                                 int (&counts)[EP_HT_UPDATE_WARPS][EP_E + EP_R], int& bad) {
    ep_u32* ws = ep_ws(args, rank);
    ep_u32* hs = ep_hs(args, rank);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int* routing = reinterpret_cast<int*>(hs + H_ROUTING);
    ep_u32* destinations = hs + H_DEST;
    int* selection_rows = reinterpret_cast<int*>(hs + H_SEL_ROW);
    int* pair_rows = reinterpret_cast<int*>(hs + H_PAIR_ROW);
#if EP_HT_STAGE_ROUTING
    // The passes below read the chunk's routing from here, not back from global memory.
    __shared__ int staged_routing[EP_HT_CHUNK_MAX * EP_K];
    __shared__ ep_u32 staged_destinations[EP_HT_CHUNK_MAX];
    const int* walk_routing = staged_routing;
    const ep_u32* walk_destinations = staged_destinations;
    const int origin = first;
#else
    int* const staged_routing = nullptr;   // (nothing staged: ep_ht_take_row writes the step's routing only)
    ep_u32* const staged_destinations = nullptr;
    const int* walk_routing = routing;
    const ep_u32* walk_destinations = destinations;
    const int origin = 0;
#endif

    // A thread per token: validate its row (-1 or [0, E), no expert twice), mask the experts of
    // inactive ranks, and note its destination ranks. (When any row is invalid the step is void
    // and nothing is written, so the routing kept here no longer matters.) A thread reads the ids
    // of EP_HT_ROWS_AT_ONCE tokens before it writes any.
    for (int t0 = first + static_cast<int>(threadIdx.x); t0 < last; t0 += EP_HT_ROWS_AT_ONCE * blockDim.x) {
        long long ids[EP_HT_ROWS_AT_ONCE][EP_K];
#pragma unroll
        for (int u = 0; u < EP_HT_ROWS_AT_ONCE; ++u) {
            const int t = t0 + u * blockDim.x;
#pragma unroll
            for (int c = 0; c < EP_K; ++c) ids[u][c] = t < last ? ep_read_index(args, rank, t * EP_K + c) : -1;
        }
#pragma unroll
        for (int u = 0; u < EP_HT_ROWS_AT_ONCE; ++u) {
            const int t = t0 + u * blockDim.x;
            if (t < last) {
                ep_ht_take_row(ws, mask, t, ids[u], routing, destinations, bad,
                               EP_HT_STAGE_ROUTING ? staged_routing + (t - first) * EP_K : nullptr,
                               EP_HT_STAGE_ROUTING ? staged_destinations + (t - first) : nullptr);
            }
        }
    }
    __syncthreads();

    // Pass 1: per-warp counts over a contiguous part of the chunk, in token order. The routing of
    // 32 tokens is loaded at once (32 loads in flight per lane) before the in-order walk over them,
    // and the next 32 tokens' while it walks.
    const int part = (last - first + EP_HT_UPDATE_WARPS - 1) / EP_HT_UPDATE_WARPS;
    const int begin = min(last, first + warp * part), end = min(last, begin + part);
    int experts[32], next_experts[32];
    ep_u32 bits_of_lane_token = 0, next_bits = 0;
    ep_ht_load_batch(walk_routing, walk_destinations, origin, begin, end, experts, bits_of_lane_token);
    for (int t0 = begin; t0 < end; t0 += 32) {
        ep_ht_load_batch(walk_routing, walk_destinations, origin, t0 + 32, end, next_experts, next_bits);   // in flight meanwhile
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            if (t0 + j >= end) break;
            const ep_u32 bits = __shfl_sync(0xffffffffu, bits_of_lane_token, j);
            if (experts[j] >= 0) counts[warp][experts[j]] += 1;   // distinct experts per token: no two lanes collide
            if (lane < EP_R && ((bits >> lane) & 1u)) counts[warp][EP_E + lane] += 1;
            __syncwarp();
        }
        ep_ht_next_batch(experts, bits_of_lane_token, next_experts, next_bits);
    }
    __syncthreads();
    // Exclusive prefix over warps; the chunk's totals go to its row of H_CHUNK.
    ep_u32* chunk_row = hs + H_CHUNK + index * (EP_E + EP_R);
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) chunk_row[i] = static_cast<ep_u32>(ep_warp_prefix(counts, i));
    __syncthreads();

    // Pass 2: each selection's (expert-major: flat sends and reduces by pair, never reading the
    // selection rows) and pair's position within the chunk, in token order, with the chunk's
    // index above it (ep_ht_offset_row).
    static_assert(EP_BMAX <= EP_HT_PLACE_MASK && EP_HT_CHUNKS <= 64, "a stored place and its chunk fit an int");
    const int chunk_bits = index << EP_HT_CHUNK_SHIFT;
    ep_ht_load_batch(walk_routing, walk_destinations, origin, begin, end, experts, bits_of_lane_token);
    for (int t0 = begin; t0 < end; t0 += 32) {
        ep_ht_load_batch(walk_routing, walk_destinations, origin, t0 + 32, end, next_experts, next_bits);
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            if (t0 + j >= end) break;
            const int t = t0 + j;
            const ep_u32 bits = __shfl_sync(0xffffffffu, bits_of_lane_token, j);
            if (EP_EXPERT_MAJOR && lane < EP_K) selection_rows[t * EP_K + lane] = experts[j] >= 0 ? chunk_bits + counts[warp][experts[j]]++ : -1;
            if (lane < EP_R) pair_rows[t * EP_R + lane] = ((bits >> lane) & 1u) ? chunk_bits + counts[warp][EP_E + lane]++ : -1;
            __syncwarp();
        }
        ep_ht_next_batch(experts, bits_of_lane_token, next_experts, next_bits);
    }
}

#if EP_HT_STAGE_TABLE
// The last block's copy of the all-gathered count table `table` in `staged` (shared memory), its
// loads in flight with thread 0's load of the mask: one round trip for both, and every later read
// of the table (zones, offsets, layout) a shared one. Returns the mask, one value for the block
// (as ep_block_mask). Call from every thread, once every rank's counts have arrived.
EP_DEVICE ep_u64 ep_ht_stage_table(const EpArgs& args, const ep_u32* table, ep_u32* staged) {
    constexpr int words = EP_R * (EP_E + EP_R), threads = EP_HT_UPDATE_WARPS * 32, per = (words + threads - 1) / threads;
    __shared__ ep_u64 value;
    ep_u32 v[per];
#pragma unroll
    for (int j = 0; j < per; ++j) {
        const int i = static_cast<int>(threadIdx.x) + j * threads;
        v[j] = i < words ? table[i] : 0u;
    }
    const ep_u64 mask = threadIdx.x == 0 ? ep_load_mask(args) : 0ull;
    __syncthreads();   // every thread has read an earlier call's `value`
#pragma unroll
    for (int j = 0; j < per; ++j) {
        const int i = static_cast<int>(threadIdx.x) + j * threads;
        if (i < words) staged[i] = v[j];
    }
    if (threadIdx.x == 0) value = mask;
    __syncthreads();
    return value;
}
#endif

extern "C" __global__ void __launch_bounds__(EP_HT_UPDATE_WARPS * 32, 1)
ep_ht_update(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    ep_u32* hs = ep_hs(args, rank);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    // Every block reads the sequence before any block can advance it (the last block does, once
    // every block has arrived).
    const ep_u32 seq = ws[WS_SEQ] + 1;
    const int parity = seq & 1;

    __shared__ int counts[EP_HT_UPDATE_WARPS][EP_E + EP_R];
    __shared__ int zone_start[EP_E];   // expert-major: first slot of each expert's zone on its rank
    __shared__ int required[EP_R];
    __shared__ int bad;
#if EP_HT_CHUNKS > 1
    __shared__ int last_block;
#endif
    if (threadIdx.x == 0) {
        bad = 0;
        hs[H_STEP_OK] = 0;   // before this block arrives: the last block's final word comes after
    }
    for (int i = threadIdx.x; i < EP_HT_UPDATE_WARPS * (EP_E + EP_R); i += blockDim.x) (&counts[0][0])[i] = 0;
    // One mask for the block. A block that finds its rank inactive skips its chunk; the mask only
    // loses ranks during a launch, so the last block then finds it inactive too.
    const ep_u64 chunk_mask = ep_block_mask(args);
    const int size = ep_ht_chunk_size(tokens);
    const int first = min(tokens, static_cast<int>(blockIdx.x) * size), last = min(tokens, first + size);
    if (ep_active(chunk_mask, rank) && blockIdx.x < EP_HT_CHUNKS) {
        ep_ht_count_chunk(args, rank, chunk_mask, static_cast<int>(blockIdx.x), first, last, counts, bad);
    }
#if EP_HT_CHUNKS > 1
    static_assert(EP_HT_CHUNKS < (1 << 16), "arrivals and bad chunks each fit half of H_ARRIVED");
    // Arrive, as a grid barrier does: the barrier orders the block's writes before thread 0's
    // fence and count; the last block's reads come after its fence and the next barrier.
    __syncthreads();
    if (threadIdx.x == 0) {
        // A block that found a bad row says so in the count's upper half: one atomic, and the
        // last block learns it from the value it replaces, with no load after.
        __threadfence();
        const ep_u32 arrived = atomicAdd(hs + H_ARRIVED, bad ? (1u << 16) + 1u : 1u);
        const bool last = (arrived & 0xffffu) == gridDim.x - 1;
        if (last) {
            __threadfence();   // the other blocks' words are read only after their arrival was seen
            if (arrived >> 16) bad = 1;
            hs[H_ARRIVED] = 0;   // every block has arrived: ready for the next launch (graph replays)
        }
        last_block = last;
    }
    __syncthreads();
    if (!last_block) return;
#endif
    if (threadIdx.x == 0) hs[H_SEQ] = seq;
    // (Its first barrier also ends every warp's pass 2 before `counts` is reused below, which one
    // chunk, without the hand-off's barriers, relies on.)
    const ep_u64 mask = ep_block_mask(args);
    if (!ep_active(mask, rank)) {
        if (threadIdx.x == 0) ws[WS_SEQ] = seq;
        return;
    }

    // The chunks' counts become exclusive prefixes over the chunks, in `counts` (one row a chunk;
    // this block's own counts are done with); the rank's totals, in `before` until the final rows
    // need it, go to every active rank's table.
    static_assert(EP_HT_CHUNKS <= EP_HT_UPDATE_WARPS, "a chunk's prefix row per row of counts");
    __shared__ int before[EP_E + EP_R];   // the totals, then rows of lower source ranks per expert, then per rank
    const ep_u32* chunk = hs + H_CHUNK;
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) {
        int running = 0;
        for (int c = 0; c < EP_HT_CHUNKS; ++c) {
            const int here = static_cast<int>(chunk[c * (EP_E + EP_R) + i]);
            counts[c][i] = running;
            running += here;
        }
        before[i] = running;
    }
    __syncthreads();
    ep_publish_row(args, rank, mask, WS_COUNTS + parity * EP_R * (EP_E + EP_R), seq * 4 + (bad ? 1 : 0),
                   [&](int i) { return before[i]; });   // (ends with a barrier: `before` is free after)

    // Wait for every active rank's counts (bounded); a late or bad rank voids the step. Every
    // rank computes every destination's zones and checks its capacity, so all agree.
    const ep_u32* full = ws + WS_COUNTS + parity * EP_R * (EP_E + EP_R);
#if EP_HT_STAGE_TABLE
    // The table is copied once the counts have arrived, and the peers' bad-row words are read
    // from the copy: ep_counts_arrived in its three parts, the copy between the last two.
    __shared__ int any_bad;
    __shared__ ep_u32 staged_full[EP_R * (EP_E + EP_R)];
    if (threadIdx.x == 0) any_bad = bad ? -2 : -1;
    __syncthreads();
    ep_counts_wait(args, ws, mask, seq * 4, &any_bad);
    __syncthreads();
    const ep_u64 gathered = ep_ht_stage_table(args, full, staged_full) & mask;   // one value: every thread lays out the same zones
    full = staged_full;
    ep_counts_check_bad_rows(mask, full, &any_bad);
    __syncthreads();
    if (!ep_counts_verdict(ws, hs, seq, any_bad)) return;
#else
    if (!ep_counts_arrived(args, ws, hs, mask, seq * 4, bad, seq, full)) return;
    const ep_u64 gathered = ep_block_mask(args) & mask;   // one value: every thread lays out the same zones
#endif
#if EP_DROP
    // Drop policy: per destination, (source rank, token) pairs are kept in order while the
    // receive buffer still fits them; this rank works out its kept prefix, then the ranks
    // all-gather what they kept and lay out the zones from that. Positions are the rank's first:
    // a selection's (column < E: its expert) or pair's (E + destination) among the rank's, from
    // its chunk's and its place within it (chunk 0's offsets then serve every row).
    const auto in_rank = [&](int column, int position) {
        return position < 0 ? position : counts[position >> EP_HT_CHUNK_SHIFT][column] + (position & EP_HT_PLACE_MASK);
    };
    int* routing = reinterpret_cast<int*>(hs + H_ROUTING);
    ep_u32* destinations = hs + H_DEST;
    int* selection_rows = reinterpret_cast<int*>(hs + H_SEL_ROW);
    int* pair_rows = reinterpret_cast<int*>(hs + H_PAIR_ROW);
    if (EP_EXPERT_MAJOR) ep_ht_rewrite(selection_rows, routing, tokens * EP_K, [&](int, int position, int e) { return in_rank(e, position); });
    ep_ht_rewrite(pair_rows, nullptr, tokens * EP_R, [&](int i, int position, int) { return in_rank(EP_E + i % EP_R, position); });
    __syncthreads();
    __shared__ int kept_tokens[EP_R];
    __shared__ int kept_counts[EP_E + EP_R];
    __shared__ int zone_count[EP_L];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x < EP_R) kept_tokens[threadIdx.x] = ep_ht_kept_tokens(full, gathered, rank, threadIdx.x);
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) kept_counts[i] = 0;
    __syncthreads();
    if (warp == 0) {
        for (int d = 0; d < EP_R; ++d) {
            if (kept_tokens[d] == -1) ep_ht_walk_boundary(full, gathered, rank, d, tokens, routing, destinations, zone_count, kept_tokens);
        }
    }
    __syncthreads();
    // Selections of dropped pairs go first (their pair's position decides), then the pairs.
    // (Reads ahead as the final rows below do.)
    for (int base = threadIdx.x; base < tokens * EP_K; base += EP_HT_AT_ONCE * blockDim.x) {
        int expert[EP_HT_AT_ONCE], pair[EP_HT_AT_ONCE];
#pragma unroll
        for (int j = 0; j < EP_HT_AT_ONCE; ++j) {
            const int i = base + j * blockDim.x;
            expert[j] = i < tokens * EP_K ? routing[i] : -1;
        }
#pragma unroll
        for (int j = 0; j < EP_HT_AT_ONCE; ++j) {
            const int i = base + j * blockDim.x;
            pair[j] = expert[j] >= 0 ? pair_rows[(i / EP_K) * EP_R + expert[j] / EP_L] : 0;
        }
#pragma unroll
        for (int j = 0; j < EP_HT_AT_ONCE; ++j) {
            const int e = expert[j];
            if (e < 0) continue;
            if (pair[j] < kept_tokens[e / EP_L]) atomicAdd(&kept_counts[e], 1);
            else if (EP_EXPERT_MAJOR) selection_rows[base + j * blockDim.x] = -1;
        }
    }
    if (threadIdx.x < EP_R) kept_counts[EP_E + threadIdx.x] = min(kept_tokens[threadIdx.x], static_cast<int>(full[rank * (EP_E + EP_R) + EP_E + threadIdx.x]));
    __syncthreads();
    ep_ht_rewrite(pair_rows, nullptr, tokens * EP_R, [&](int i, int position, int) { return position >= kept_tokens[i % EP_R] ? -1 : position; });
    ep_publish_row(args, rank, mask, WS_KEPT + parity * EP_R * (EP_E + EP_R), seq * 4 + 2,
                   [&](int i) { return kept_counts[i]; });
    __shared__ int kept_timeout;
    if (threadIdx.x == 0) kept_timeout = 0;
    __syncthreads();
    if (threadIdx.x < EP_R && ep_active(gathered, threadIdx.x)) {
        if (!ep_wait(args, ws, WS_COUNT_FLAG + threadIdx.x, seq * 4 + 2)) {
            ep_timeout(args, ws, threadIdx.x);
            kept_timeout = 1;
        }
    }
    __syncthreads();
    if (kept_timeout) {
        // A peer's kept counts never came: its table row is stale, so no row is trustworthy.
        if (threadIdx.x == 0) {
            hs[H_STEP_OK] = 0;
            ws[WS_SEQ] = seq;
        }
        return;
    }
    const ep_u32* table = ws + WS_KEPT + parity * EP_R * (EP_E + EP_R);
    ep_ht_zones(table, gathered, zone_start, required);
    __syncthreads();
    const bool chunk_positions = false;   // already the rank's (above)
#else
    const ep_u32* table = full;
    ep_ht_zones(full, gathered, zone_start, required);
    __syncthreads();
    __shared__ int overflow_rank;
    if (threadIdx.x == 0) {
        overflow_rank = -1;
        for (int d = 0; d < EP_R; ++d) {
            if (required[d] > EP_CAPACITY) {
                overflow_rank = d;
                ep_set_status(ws, EP_STATUS_OVERFLOW, d, required[d], EP_CAPACITY);
                break;
            }
        }
    }
    __syncthreads();
    if (overflow_rank >= 0) {
        if (threadIdx.x == 0) {
            hs[H_STEP_OK] = 0;
            ws[WS_SEQ] = seq;
        }
        return;
    }
    const bool chunk_positions = true;   // still within their chunk: the final rows add the prefix
#endif

    // Final rows: the stored places stay as they are (within their chunk, or the rank's with the
    // drop policy); each chunk's offsets go to H_CHUNK, and dispatch and combine add them
    // (ep_ht_pair_row, ep_ht_selection_slot). An offset is the rows of lower source ranks, the
    // zone start (expert-major selections) and the chunk's prefix within the rank. Rewriting
    // every place here instead took this one block ~16 µs at ht-std R = 8 (32,768 pair rows).
    for (int i = threadIdx.x; i < EP_E + EP_R; i += blockDim.x) {
        int sum = EP_EXPERT_MAJOR && i < EP_E ? zone_start[i] : 0;
        for (int source = 0; source < rank; ++source) {
            if (ep_active(gathered, source)) sum += static_cast<int>(table[source * (EP_E + EP_R) + i]);
        }
        before[i] = sum;
    }
    __syncthreads();
    ep_u32* offsets = hs + H_CHUNK;
    for (int i = threadIdx.x; i < EP_HT_CHUNKS * (EP_E + EP_R); i += blockDim.x) {
        const int c = i / (EP_E + EP_R), column = i % (EP_E + EP_R);
        offsets[i] = static_cast<ep_u32>(before[column] + (chunk_positions ? counts[c][column] : 0));
    }
    // What this rank receives.
    ep_u32* layout = hs + H_LAYOUT;
    for (int i = threadIdx.x; i < EP_L * EP_R; i += blockDim.x) {
        const int l = i / EP_R, s = i % EP_R;
        layout[EP_L + EP_R + i] = ep_active(gathered, s) ? table[s * (EP_E + EP_R) + rank * EP_L + l] : 0u;
    }
#if !EP_HT_STAGE_TABLE
    __syncthreads();
#endif
    for (int l = threadIdx.x; l < EP_L; l += blockDim.x) {   // L may exceed the block
        ep_u32 sum = 0;
#if EP_HT_STAGE_TABLE
        for (int s = 0; s < EP_R; ++s) sum += ep_active(gathered, s) ? table[s * (EP_E + EP_R) + rank * EP_L + l] : 0u;   // (the staged copy; the drop policy: its kept table)
#else
        for (int s = 0; s < EP_R; ++s) sum += layout[EP_L + EP_R + l * EP_R + s];
#endif
        layout[l] = sum;
        layout[EP_L + EP_R + EP_L * EP_R + 2 + l] = EP_EXPERT_MAJOR ? zone_start[rank * EP_L + l] : 0;
    }
    if (threadIdx.x < EP_R) {
        layout[EP_L + threadIdx.x] = ep_active(gathered, threadIdx.x) ? table[threadIdx.x * (EP_E + EP_R) + EP_E + rank] : 0u;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        layout[EP_L + EP_R + EP_L * EP_R] = required[rank];   // rows in use, padding included
        int offered = 0, kept = 0;
        for (int source = 0; source < EP_R; ++source) {
            if (!ep_active(gathered, source)) continue;
            offered += static_cast<int>(full[source * (EP_E + EP_R) + EP_E + rank]);
            kept += static_cast<int>(table[source * (EP_E + EP_R) + EP_E + rank]);
        }
        layout[EP_L + EP_R + EP_L * EP_R + 1] = offered - kept;   // pairs dropped here (drop policy)
        hs[H_STEP_OK] = 1;
        ws[WS_SEQ] = seq;
    }
}

// ------------------------------------------------------------------------------------------
// Dispatch: a warp per (token, piece of its row): the row is read once and written to each of
// its rows (flat: one per destination rank) or slots (expert-major: one per selection).

EP_DEVICE void ep_ht_write_routing(const EpArgs& args, int rank, int t, int d, int row, const int* routing) {
    // Flat: the received row's local ids (-1 for experts elsewhere) and weights (0 there).
    const int lane = threadIdx.x % 32;
    if (lane >= EP_K) return;
    const int e = routing[t * EP_K + lane];
    const bool here = e >= 0 && e / EP_L == d;
    const float w = here ? reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane] : 0.0f;
    ep_put_received(args, d, static_cast<ep_u64>(row) * EP_K + lane, here ? e % EP_L : -1, w);
    if (lane == 0) ep_put_origin(args, d, H_ORIGIN, static_cast<ep_u64>(row), rank, t);
}

#define EP_HT_BULK_ON (EP_BULK_CAN && EP_HT_BULK)   // ep_transport_bulk.cuh

EP_DEVICE void ep_ht_store_slot(const EpArgs& args, int d, int slot, int local, float weight) {
    ep_put_received(args, d, static_cast<ep_u64>(slot), local, weight);
}

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ht_dispatch(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    const ep_u32* hs = ep_hs(args, rank);
    // Step and call-number loads issued first; the mask is one value for the whole block, so a
    // peer masking this rank between two threads' loads cannot split the block's branches.
    const ep_u32 step_ok = hs[H_STEP_OK];
    const ep_u32 seq = ep_call_number(ws, WS_DISP_CALLS, args.sync);
    const ep_u64 mask = ep_block_mask(args);
    const bool signal = args.sync & EP_SYNC_SIGNAL;
    // A rank that takes no part still counts a call that publishes flags, so call numbers agree.
    const bool moving = ep_active(mask, rank) && step_ok != 0;
    ep_write_counts(args, rank, hs + H_LAYOUT, moving);
    if (!moving && !signal) return;
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    const int global_warp = blockIdx.x * warps + warp, all_warps = gridDim.x * warps;
    const int* routing = reinterpret_cast<const int*>(hs + H_ROUTING);
    const int* selection_rows = reinterpret_cast<const int*>(hs + H_SEL_ROW);
    const int* pair_rows = reinterpret_cast<const int*>(hs + H_PAIR_ROW);
    __shared__ EpWarpRows table;
    const bool move_data = moving && !(args.sync & EP_SYNC_NO_DATA);

#if EP_EXPERT_MAJOR
    // This rank's padding rows: zero, local expert -1, weight 0.
    if (move_data) {
        const ep_u32* layout = hs + H_LAYOUT;
        for (int l = 0; l < EP_L; ++l) {
            const int start = static_cast<int>(layout[EP_L + EP_R + EP_L * EP_R + 2 + l]);
            const int count = static_cast<int>(layout[l]);
            for (int row = start + count + global_warp; row < start + ep_round_up(count); row += all_warps) {
                ep_zero_wire_row(args, rank, row, lane);
                if (lane == 0) {
                    ep_ht_store_slot(args, rank, row, -1, 0.0f);
                    ep_put_origin(args, rank, H_ORIGIN, static_cast<ep_u64>(row), -1, 0);
                }
            }
        }
    }
#endif

    const int slices = static_cast<int>(args.slices);
    const int per_slice = (EP_WIRE_UNITS + slices - 1) / slices;
    const int items = move_data ? tokens * slices : 0;
#if EP_HT_BULK_ON
    __shared__ EpBulkStages<EP_HT_BULK_BYTES> bulk;
    const int chunks = (per_slice * EP_VEC_BYTES + EP_HT_BULK_BYTES - 1) / EP_HT_BULK_BYTES;
    const EpBulkStream<EP_HT_BULK_BYTES> stream = {reinterpret_cast<const ep_u8*>(args.rank[rank].x), global_warp, all_warps, items, slices, per_slice, chunks};
    if (global_warp < items) ep_bulk_begin(bulk, warp, stream, lane);
#endif
    for (int item = global_warp, k = 0; item < items; item += all_warps, ++k) {
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_WIRE_UNITS, first + per_slice);
        ep_u8* target = nullptr;
        int row = -1, destination = 0;   // this lane's destination row and rank, for the FP8 scale words
#if EP_EXPERT_MAJOR
        if (lane < EP_K) {
            const int e = routing[t * EP_K + lane];
            const int slot = ep_ht_selection_slot(selection_rows, t, lane, e);
            if (slot >= 0) {
                row = slot;
                destination = e / EP_L;
                target = ep_put_row_target(args, e / EP_L, static_cast<ep_u64>(slot));
                if (piece == 0) {
                    ep_ht_store_slot(args, e / EP_L, slot, e % EP_L,
                                     reinterpret_cast<const float*>(args.rank[rank].topk_weights)[t * EP_K + lane]);
                    ep_put_origin(args, e / EP_L, H_ORIGIN, static_cast<ep_u64>(slot), rank, t * EP_K + lane);
                }
            }
        }
        const int fanout = EP_K;
#else
        if (lane < EP_R) {
            row = ep_ht_pair_row(pair_rows, t, lane);
            destination = lane;
            if (row >= 0) target = ep_put_row_target(args, lane, static_cast<ep_u64>(row));
        }
        if (piece == 0) {
            for (int d = 0; d < EP_R; ++d) {
                const int drow = __shfl_sync(0xffffffffu, row, d);
                if (drow >= 0) ep_ht_write_routing(args, rank, t, d, drow, routing);
            }
        }
        const int fanout = EP_R;
#endif
        table.address[warp][lane] = reinterpret_cast<ep_u64>(target);
        ep_publish_scales_target(args, table, warp, lane, destination, row);
        __syncwarp();
#if EP_HT_BULK_ON
        (void)first; (void)last;
        ep_bulk_send_item(bulk, warp, stream, k, target, lane);
        if (piece == 0) ep_send_scales<fanout>(args, rank, t, table, warp, lane);
#else
        (void)k;
        ep_send_piece<fanout>(args, rank, t, table, warp, first, last, piece, lane);
#endif
        __syncwarp();   // every lane is done with this item's table before the next overwrites it
    }
#if EP_HT_BULK_ON
    if (global_warp < items) ep_bulk_end();
#endif
    ep_arrive_and_wait(args, rank, mask, WS_DISP_BLOCKS, WS_DISP_CALLS, WS_DISP_DONE, seq, signal, signal, moving,
                       moving && (args.sync & EP_SYNC_WAIT));
}

// ------------------------------------------------------------------------------------------
// Combine: a warp per (token, piece) pulls the token's rows and reduces them in the order of
// docs/architecture.md, "Order and arithmetic": per destination rank ascending, the token's rows
// there in ascending local expert (expert-major: each weighted by its slot's weight in the forward
// pass), that partial sum rounded to the element type as if the destination had sent it, then
// summed into float32; one rounding at the end. The backward pass also returns the weight gradients.

#ifndef EP_SOLO_VECS
#define EP_SOLO_VECS 4   // combine of a token with a single row: vectors per lane loaded before use
#endif
// Combine: vectors of each row a lane loads before their first use (v, v + 32, ...), and rows per
// batch, so that EP_CHUNK loads are in flight. 1 (an H200 at ht-std R = 8, flat: 753 µs with
// 1 vector × 8 rows, 779 with 2 × 4; expert-major spills with 2); a switch for trying others
// (EP_KERNEL_DEFINES=EP_COMBINE_SPAN=2, docs/performance.md).
#ifndef EP_COMBINE_SPAN
#define EP_COMBINE_SPAN 1
#endif
// Flat tokens of at most EP_COMBINE_FEW_ROWS rows (0: none) sum with EP_COMBINE_FEW_SPAN vectors of
// each row a lane instead: with few rows, EP_COMBINE_SPAN leaves few loads in flight. An H200,
// ht-std R = 8, µs (% of floor), 2 beside 0: --skew 1 combine 254.2 (89 %) / 280.8 (81 %), --skew 0.5
// 284.8 / 304.1, uniform 723.5 / 725.4 (few such tokens; no cost). 3 and more rows, or a span of 4,
// spill at R = 8 (24 to 412 bytes).
#ifndef EP_COMBINE_FEW_ROWS
#define EP_COMBINE_FEW_ROWS 2
#endif
#ifndef EP_COMBINE_FEW_SPAN
#define EP_COMBINE_FEW_SPAN 2
#endif

EP_DEVICE float ep_round_trip(float value) {
#if EP_ELEM == 0
    return ep_bf16_to_float(ep_float_to_bf16(value));
#elif EP_ELEM == 1
    return ep_f16_to_float(ep_float_to_f16(value));
#else
    return value;
#endif
}

// One flat row's term of the sum. Flat rows are final (weighted on the expert side) and come one
// per destination rank, so the order's term for a row x, fma(1, x, 0) rounded to the element type
// and added in float32, is x itself added: x came from the element type, so the rounding is
// exact, and only a zero's sign can differ, which a sum that starts at +0 never shows (it is -0
// only when both its operands are). Two instructions an element instead of five.
EP_DEVICE float ep_flat_term(float sum, float x) { return __fadd_rn(sum, x); }

#ifndef EP_COMBINE_ADAPTIVE
#define EP_COMBINE_ADAPTIVE 0   // 1: flat tokens with few rows load more vectors of each (below)
#endif

// Zeros for vectors [first, last) of a token's output row: the sum of no rows.
EP_DEVICE void ep_store_zero_piece(ep_u8* row_out, int first, int last, int lane) {
    float zeros[EP_ELEMS_PER_VEC];
#pragma unroll
    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) zeros[i] = 0.0f;
    const ep_vec zero = ep_pack(zeros);
    for (int v = first + lane; v < last; v += 32) ep_store_vec(row_out + static_cast<ep_u64>(v) * EP_VEC_BYTES, zero);
}

// One token's piece [first, last) of the combine's sum over its `count` rows in table order
// (the warp's `table` and `table_rank`): SPAN vectors of each row a lane (v, v + 32, ...), ROWS
// rows a batch, so that EP_CHUNK loads are in flight. Flat rows come one per destination rank,
// each its own partial sum: ep_flat_term. Any SPAN adds the same terms in the same order.
template <int SPAN>
EP_DEVICE void ep_ht_combine_sum(const EpWarpRows& table, const int (*table_rank)[32], int warp, int count, int first, int last, int lane,
                                 ep_u8* row_out) {
    constexpr int ROWS = EP_CHUNK >= 2 * SPAN ? EP_CHUNK / SPAN : 1;
    for (int v = first + lane; v < last; v += 32 * SPAN) {
        float acc[SPAN][EP_ELEMS_PER_VEC];
#if EP_EXPERT_MAJOR
        float partial[SPAN][EP_ELEMS_PER_VEC];
        int current = count > 0 ? table_rank[warp][0] : 0;
#endif
#pragma unroll
        for (int u = 0; u < SPAN; ++u) {
#pragma unroll
            for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) {
                acc[u][i] = 0.0f;
#if EP_EXPERT_MAJOR
                partial[u][i] = 0.0f;
#endif
            }
        }
#pragma unroll
        for (int c0 = 0; c0 < EP_FANOUT; c0 += ROWS) {
            if (c0 >= count) break;
            ep_vec rows[ROWS][SPAN];
#pragma unroll
            for (int j = 0; j < ROWS; ++j) {
                if (c0 + j < count) {
                    const ep_u8* src = reinterpret_cast<const ep_u8*>(table.address[warp][c0 + j]);
#pragma unroll
                    for (int u = 0; u < SPAN; ++u) {
                        if (u == 0 || v + 32 * u < last) rows[j][u] = ep_load_vec_peer(src + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < ROWS; ++j) {
                if (c0 + j >= count) break;
#if EP_EXPERT_MAJOR
                const float w = table.weight[warp][c0 + j];
                const int owner = table_rank[warp][c0 + j];
                if (owner != current) {
#pragma unroll
                    for (int u = 0; u < SPAN; ++u) {
#pragma unroll
                        for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) {
                            acc[u][i] = ep_fma(1.0f, ep_round_trip(partial[u][i]), acc[u][i]);
                            partial[u][i] = 0.0f;
                        }
                    }
                    current = owner;
                }
#pragma unroll
                for (int u = 0; u < SPAN; ++u) {
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) partial[u][i] = ep_fma(w, ep_element(rows[j][u], i), partial[u][i]);
                }
#else
#pragma unroll
                for (int u = 0; u < SPAN; ++u) {
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[u][i] = ep_flat_term(acc[u][i], ep_element(rows[j][u], i));
                }
#endif
            }
        }
#pragma unroll
        for (int u = 0; u < SPAN; ++u) {
            if (u > 0 && v + 32 * u >= last) break;
#if EP_EXPERT_MAJOR
            if (count > 0) {
#pragma unroll
                for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[u][i] = ep_fma(1.0f, ep_round_trip(partial[u][i]), acc[u][i]);
            }
#endif
            ep_store_vec(row_out + static_cast<ep_u64>(v + 32 * u) * EP_VEC_BYTES, ep_pack(acc[u]));
        }
    }
}

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ht_combine(const EpArgs args) {
    ep_grid_dependency();
#if EP_ELEM != 3
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    ep_u32* ws = ep_ws(args, rank);
    const ep_u32* hs = ep_hs(args, rank);
    const ep_u32 step_ok = hs[H_STEP_OK];
    const ep_u32 seq = ep_call_number(ws, WS_COMB_CALLS, args.sync);
    const ep_u64 mask = ep_block_mask(args);   // one value: ep_combine_begin's branches hold barriers
    if (!ep_combine_begin(args, rank, ws, mask, step_ok, seq)) return;
    const ep_u64 live = ep_load_mask(args);
    const int tokens = static_cast<int>(args.rank[rank].tokens);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    ep_u8* out = reinterpret_cast<ep_u8*>(args.rank[rank].out);
    const int* routing = reinterpret_cast<const int*>(hs + H_ROUTING);
    const int* selection_rows = reinterpret_cast<const int*>(hs + H_SEL_ROW);
    const int* pair_rows = reinterpret_cast<const int*>(hs + H_PAIR_ROW);
    __shared__ EpWarpRows table;
    __shared__ int table_rank[EP_WARPS][32];
#if EP_COMBINE_ADAPTIVE && !EP_EXPERT_MAJOR && EP_R <= 8
    __shared__ ep_u64 slot_base[EP_WARPS][8];   // where slot k's vectors start (row j, offset u)
    __shared__ int slot_u[EP_WARPS][8];
#endif
    const int slices = static_cast<int>(args.slices);
    const int per_slice = (EP_ROW_VECS + slices - 1) / slices;

    for (int item = blockIdx.x * warps + warp; item < tokens * slices; item += gridDim.x * warps) {
        const int t = item / slices, piece = item % slices;
        const int first = piece * per_slice, last = min(EP_ROW_VECS, first + per_slice);
        // This lane's row (if any), its sort key and its destination rank.
        bool valid = false;
        int key = 0, d = 0;
        ep_u64 address = 0;
        float weight = 1.0f;
#if EP_EXPERT_MAJOR
        if (lane < EP_K) {
            const int e = routing[t * EP_K + lane];
            const int slot = ep_ht_selection_slot(selection_rows, t, lane, e);
            if (slot >= 0 && ep_active(live, e / EP_L)) {
                valid = true;
                key = e;
                d = e / EP_L;
                address = ep_expert_row(args, rank, d, static_cast<ep_u64>(slot), static_cast<ep_u64>(t) * EP_K + lane);
                if (args.weighted) weight = ep_expert_slot_weight(args, rank, d, static_cast<ep_u64>(slot), static_cast<ep_u64>(t) * EP_K + lane);
            }
        }
#else
        if (lane < EP_R && ep_active(live, lane)) {
            const int row = ep_ht_pair_row(pair_rows, t, lane);
            if (row >= 0) {
                valid = true;
                key = lane;
                d = lane;
                address = ep_expert_row(args, rank, d, static_cast<ep_u64>(row), static_cast<ep_u64>(t) * EP_R + lane);
            }
        }
#endif
        // Position in the reduction order: valid lanes with a smaller key come first.
        const ep_u32 ballot = __ballot_sync(0xffffffffu, valid);
        const int count = __popc(ballot);
        int position = 0;
        for (int j = 0; j < 32; ++j) {
            const int other = __shfl_sync(0xffffffffu, key, j);
            if (((ballot >> j) & 1u) && other < key) ++position;
        }
        if (valid) {
            table.address[warp][position] = address;
            table.weight[warp][position] = weight;
            table_rank[warp][position] = d;
        }
        __syncwarp();

        // Backward: the gradient of each of the token's weights, from the row or slot that
        // received the selection; 0 where nothing was received.
        if (piece == 0 && args.rank[rank].weight_grads_out != 0 && lane < EP_K) {
            const int e = routing[t * EP_K + lane];
            float gradient = 0.0f;
            if (e >= 0) {
                const int owner = e / EP_L;
#if EP_EXPERT_MAJOR
                const int slot = ep_ht_selection_slot(selection_rows, t, lane, e);
                if (slot >= 0) gradient = ep_expert_gradient(args, rank, owner, static_cast<ep_u64>(slot), static_cast<ep_u64>(t) * EP_K + lane);
#else
                const int row = ep_ht_pair_row(pair_rows, t, owner);
                if (row >= 0) {
                    gradient = ep_expert_gradient(args, rank, owner, static_cast<ep_u64>(row) * EP_K + lane,
                                                  (static_cast<ep_u64>(t) * EP_R + owner) * EP_K + lane);
                }
#endif
            }
            reinterpret_cast<float*>(args.rank[rank].weight_grads_out)[t * EP_K + lane] = gradient;
        }

        ep_u8* row_out = out + static_cast<ep_u64>(t) * EP_ROW_BYTES;
#if EP_R == 1 && !EP_EXPERT_MAJOR
        if (count == 1) {
            // One row (every token at R = 1, flat): EP_SOLO_VECS vectors per lane in flight instead
            // of one; the same arithmetic as the general loop below with a single term. Compiled
            // for R = 1 flat only: its registers make the general loop spill (428 bytes at R = 8, where
            // ht-std combine then took 2.7 ms instead of 1.1).
            const ep_u8* src = reinterpret_cast<const ep_u8*>(table.address[warp][0]);
            for (int v0 = first + lane; v0 < last; v0 += 32 * EP_SOLO_VECS) {
                ep_vec rows[EP_SOLO_VECS];
#pragma unroll
                for (int u = 0; u < EP_SOLO_VECS; ++u) {
                    if (v0 + 32 * u < last) rows[u] = ep_load_vec_peer(src + static_cast<ep_u64>(v0 + 32 * u) * EP_VEC_BYTES);
                }
#pragma unroll
                for (int u = 0; u < EP_SOLO_VECS; ++u) {
                    if (v0 + 32 * u >= last) break;
                    float acc[EP_ELEMS_PER_VEC];
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = ep_flat_term(0.0f, ep_element(rows[u], i));
                    ep_store_vec(row_out + static_cast<ep_u64>(v0 + 32 * u) * EP_VEC_BYTES, ep_pack(acc));
                }
            }
            __syncwarp();
            continue;
        }
        // Otherwise nothing was received (count 0, the only other case at R = 1): zeros, as the
        // general loop's empty sum packs them, without its registers.
        ep_store_zero_piece(row_out, first, last, lane);
        __syncwarp();
        continue;
#endif
#if EP_COMBINE_ADAPTIVE && !EP_EXPERT_MAJOR && EP_R <= 8
        // Flat, at most 8 rows a token (one a rank): 8 loads in flight whatever the count. A
        // token with c rows loads `span` = 8 / c vectors of each (skewed routing: ~1.7 rows a
        // token at ht-std --skew 1). Slot k = u × c + j holds row j's vector v + 32u, so a vector's
        // rows are added in table order, as the general loop adds them, and stored after its last.
        if (count == 0) {
            ep_store_zero_piece(row_out, first, last, lane);
            __syncwarp();
            continue;
        }
        const int span = 8 / count, used = count * span;
        if (lane < used) {
            const int j = lane % count, u = lane / count;
            slot_base[warp][lane] = table.address[warp][j] + static_cast<ep_u64>(u) * 32 * EP_VEC_BYTES;
            slot_u[warp][lane] = (u << 1) | (j == count - 1 ? 1 : 0);   // vector offset, last row of it
        }
        __syncwarp();
        for (int v = first + lane; v < last; v += 32 * span) {
            ep_vec x[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                if (k < used && v + 32 * (slot_u[warp][k] >> 1) < last) {
                    x[k] = ep_load_vec_peer(reinterpret_cast<const ep_u8*>(slot_base[warp][k]) + static_cast<ep_u64>(v) * EP_VEC_BYTES);
                }
            }
            float acc[EP_ELEMS_PER_VEC];
#pragma unroll
            for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                if (k >= used) break;
                const int info = slot_u[warp][k], at = v + 32 * (info >> 1);
                if (at < last) {
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = ep_flat_term(acc[i], ep_element(x[k], i));
                }
                if (info & 1) {
                    if (at < last) ep_store_vec(row_out + static_cast<ep_u64>(at) * EP_VEC_BYTES, ep_pack(acc));
#pragma unroll
                    for (int i = 0; i < EP_ELEMS_PER_VEC; ++i) acc[i] = 0.0f;
                }
            }
        }
        __syncwarp();   // every lane is done with this item's slots before the next overwrites them
        continue;
#endif
#if EP_COMBINE_FEW_ROWS && !EP_EXPERT_MAJOR
        // Flat tokens of few rows (skewed routing: ~1.7 rows a token at ht-std --skew 1) load
        // EP_COMBINE_FEW_SPAN vectors of each row at once instead of EP_COMBINE_SPAN.
        if (count <= EP_COMBINE_FEW_ROWS) ep_ht_combine_sum<EP_COMBINE_FEW_SPAN>(table, table_rank, warp, count, first, last, lane, row_out);
        else
#endif
        ep_ht_combine_sum<EP_COMBINE_SPAN>(table, table_rank, warp, count, first, last, lane, row_out);
        __syncwarp();   // every lane is done with this item's table before the next overwrites it
    }
    const bool done = args.sync & EP_SYNC_DONE;
    // The start mask, not `live`: a peer masked for missing the ready wait may only be slow and
    // still be reading our rows; waiting (bounded) for it keeps the next step from overwriting them.
    // The call number is read again rather than kept through the loop (registers): only this
    // launch's last block advances it, after every block has passed this point.
    ep_arrive_and_wait(args, rank, mask, WS_COMB_BLOCKS, WS_COMB_CALLS, WS_COMB_DONE, ep_call_number(ep_ws(args, rank), WS_COMB_CALLS, args.sync),
                       done, args.sync & EP_SYNC_SIGNAL, true, done);
#endif
}

// ------------------------------------------------------------------------------------------
// The staged transport's halves (ep_transport.cuh), as in ep_ll.cu: the destination drains its
// staging area into its receive buffers (every row in use, padding included); combine's expert
// side puts each row back into its source's staging at (token × K + k) expert-major, (token × R
// + this rank) flat, with the slot weight (expert-major forward) and the weight gradients
// (backward) beside it.

#if EP_TRANSPORT == 1
extern "C" __global__ void __launch_bounds__(512, 2)
ep_ht_drain(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    const ep_u32* hs = ep_hs(args, rank);
    if (!ep_active(ep_load_mask(args), rank) || hs[H_STEP_OK] == 0) return;
    const int rows = static_cast<int>(hs[H_LAYOUT + EP_L + EP_R + EP_L * EP_R]);   // in use, padding included
    const EpStage& stage = ep_stage(args, rank);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        ep_drain_row(args, rank, stage, row, EP_EXPERT_MAJOR ? 1 : EP_K, lane);   // one id per slot, or K per row
    }
}

extern "C" __global__ void __launch_bounds__(512, 2)
ep_ht_combine_send(const EpArgs args) {
    ep_grid_dependency();
    const int rank = static_cast<int>(blockIdx.y + args.first_rank);
    const ep_u32* hs = ep_hs(args, rank);
    const ep_u64 mask = ep_load_mask(args);
    if (!ep_active(mask, rank) || hs[H_STEP_OK] == 0) return;
    const int rows = static_cast<int>(hs[H_LAYOUT + EP_L + EP_R + EP_L * EP_R]);
    const ep_u32* origin = hs + H_ORIGIN;
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const ep_u32 from = origin[row];
        const int source = static_cast<int>(from >> EP_ORIGIN_INDEX_BITS);
        if (from == EP_ORIGIN_NONE || !ep_active(mask, source)) continue;   // padding, or a masked source
        const ep_u64 token_index = from & ((1u << EP_ORIGIN_INDEX_BITS) - 1);
#if EP_EXPERT_MAJOR
        const ep_u64 index = token_index;
#else
        const ep_u64 index = token_index * EP_R + rank;
#endif
        ep_put_back_row(args, rank, source, row, index, lane);
        const EpStage& back = ep_stage(args, source);
#if EP_EXPERT_MAJOR
        if (lane == 0 && args.weighted) {
            reinterpret_cast<float*>(back.comb_weights)[index] = reinterpret_cast<const float*>(args.rank[rank].topk_weights)[row];
        }
        if (lane == 0 && args.rank[rank].weight_grads_in != 0) {
            reinterpret_cast<float*>(back.comb_grads)[index] = reinterpret_cast<const float*>(args.rank[rank].weight_grads_in)[row];
        }
#else
        if (lane < EP_K && args.rank[rank].weight_grads_in != 0) {
            reinterpret_cast<float*>(back.comb_grads)[index * EP_K + lane] =
                reinterpret_cast<const float*>(args.rank[rank].weight_grads_in)[static_cast<ep_u64>(row) * EP_K + lane];
        }
#endif
    }
}
#endif

// ------------------------------------------------------------------------------------------
// An NCCL rank's combine from the caller's expert outputs: the rows in use (padding included)
// copied into the buffer its peers read (ep_copy_received).
extern "C" __global__ void __launch_bounds__(512, 2)
ep_ht_copy_received(const EpArgs args) {
    ep_grid_dependency();
    ep_copy_received(args, 1, [](int) { return 0; },
                     [](const ep_u32* hs, int) { return static_cast<int>(min(hs[H_LAYOUT + EP_L + EP_R + EP_L * EP_R], static_cast<ep_u32>(EP_CAPACITY))); });
}
