// Dispatch's send of one piece of a token's row to each of its destinations, as the row moves
// on the wire (EP_FP8 in ep_step.cuh):
// - 0: the caller's element row, copied (ep_copy_piece);
// - 1: the caller's bf16/f16/f32 row, quantised here to e4m3 with one scale per block of
//      EP_FP8_BLOCK elements (ep_fp8.cuh, docs/fp8.md): each piece is quantised once, by the
//      warp that sends it, and its codes and scale words are stored to every destination;
// - 2: the caller's e4m3 row, copied, and its scale words (args.rank[].scales) beside it.
// A row is cut into EP_WIRE_UNITS units, and a piece is a range of them: vectors of the wire
// row, or (quantising) chunks of EP_FP8_CHUNK elements, 16 a lane.

#if EP_FP8 == 1
#define EP_FP8_LANE 16                      // elements a lane quantises per chunk: one 16-byte e4m3 vector
#define EP_FP8_CHUNK (32 * EP_FP8_LANE)     // elements a warp quantises at once (4 blocks of 128, 16 of 32)
#define EP_WIRE_UNITS ((EP_HIDDEN + EP_FP8_CHUNK - 1) / EP_FP8_CHUNK)
#ifndef EP_FP8_IN_FLIGHT
#define EP_FP8_IN_FLIGHT 2                  // chunks per lane loaded before the first is converted
#endif
#else
#define EP_WIRE_UNITS EP_WIRE_VECS
#endif

#if EP_FP8 == 1
// The raw element vectors of this lane's EP_FP8_LANE elements of N chunks of a row: a batch is
// loaded at once (every load in flight) and widened chunk by chunk as it is sent.
#define EP_FP8_LANE_VECS (EP_FP8_LANE / EP_ELEMS_PER_VEC)
template <int N>
struct EpFp8Batch {
    ep_vec v[N][EP_FP8_LANE_VECS];
};

// Chunks [u, min(u + N, last)) of element row `src_row`, this lane's elements; zeros past the
// row's end (hidden is a multiple of 32: a lane is wholly inside or outside).
template <int N>
EP_DEVICE void ep_fp8_load_batch(const ep_u8* src_row, int u, int last, int lane, EpFp8Batch<N>& batch) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int first = (u + i) * EP_FP8_CHUNK + lane * EP_FP8_LANE;
        const bool inside = u + i < last && first < EP_HIDDEN;
        const ep_u8* p = src_row + static_cast<ep_u64>(first) * EP_ELEM_BYTES;
#pragma unroll
        for (int j = 0; j < EP_FP8_LANE_VECS; ++j) {
            if (inside) {
                batch.v[i][j] = ep_load_vec(p + j * EP_VEC_BYTES);
            } else {
                ep_u32* words = reinterpret_cast<ep_u32*>(&batch.v[i][j]);
#pragma unroll
                for (int w = 0; w < EP_VEC_BYTES / 4; ++w) words[w] = 0u;
            }
        }
    }
}

// Quantises chunk `chunk` (this lane's elements in `x`) and stores its codes and scale words to
// every destination the warp published in `table` (its first FANOUT entries). Every lane calls
// it together (the amax and the packed exponent bytes travel by shuffles).
template <int FANOUT>
EP_DEVICE void ep_fp8_send_chunk(const EpWarpRows& table, int warp, int chunk, int lane, const float (&x)[EP_FP8_LANE]) {
    const int first = chunk * EP_FP8_CHUNK + lane * EP_FP8_LANE;
    const bool inside = first < EP_HIDDEN;
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < EP_FP8_LANE; ++i) amax = ep_fp8_lane_amax(amax, x[i]);
    amax = ep_fp8_group_amax(amax, EP_FP8_BLOCK / EP_FP8_LANE);   // the lanes of this lane's block
    const ep_fp8_scale s = ep_fp8_block_scale(amax, EP_FP8_POW2 != 0);
    ep_u32 codes[EP_FP8_LANE / 4];
#pragma unroll
    for (int k = 0; k < EP_FP8_LANE / 4; ++k) {
        codes[k] = static_cast<ep_u32>(ep_fp8_quantize2(x[4 * k + 1], x[4 * k], s))
                 | (static_cast<ep_u32>(ep_fp8_quantize2(x[4 * k + 3], x[4 * k + 2], s)) << 16);
    }
#if EP_FP8_POW2
    // Four blocks' exponent bytes to a word, gathered at the first lane of the word's first block;
    // blocks past the row's end give zero bytes.
    constexpr int lanes_per_block = EP_FP8_BLOCK / EP_FP8_LANE;
    const ep_u32 byte = inside ? s.exponent_byte : 0u;
    ep_u32 word = byte;
#pragma unroll
    for (int j = 1; j < 4; ++j) word |= __shfl_sync(0xffffffffu, byte, (lane + j * lanes_per_block) & 31) << (8 * j);
    const bool writes_word = first % (4 * EP_FP8_BLOCK) == 0;
    const int word_index = first / (4 * EP_FP8_BLOCK);
#else
    const ep_u32 word = __float_as_uint(s.scale);
    const bool writes_word = first % EP_FP8_BLOCK == 0;
    const int word_index = first / EP_FP8_BLOCK;
#endif
    if (!inside) return;
    ep_vec out[EP_FP8_LANE / EP_VEC_BYTES];
#pragma unroll
    for (int k = 0; k < EP_FP8_LANE / 4; ++k) reinterpret_cast<ep_u32*>(out)[k] = codes[k];
#pragma unroll
    for (int c0 = 0; c0 < FANOUT; c0 += EP_DEST_GROUP) {
        ep_u64 dst[EP_DEST_GROUP], scales[EP_DEST_GROUP];
        ep_read_targets(table.address[warp], c0, FANOUT, dst);
        ep_read_targets(table.scales[warp], c0, writes_word ? FANOUT : 0, scales);
#pragma unroll
        for (int c = 0; c < EP_DEST_GROUP; ++c) {
            if (dst[c] == 0ull) continue;
#pragma unroll
            for (int j = 0; j < EP_FP8_LANE / EP_VEC_BYTES; ++j) ep_store_vec(reinterpret_cast<ep_u8*>(dst[c]) + first + j * EP_VEC_BYTES, out[j]);
            if (writes_word) reinterpret_cast<ep_u32*>(scales[c])[word_index] = word;
        }
    }
}

// Quantises and sends the chunks of `batch` (ep_fp8_load_batch(src, u, last, ...)) to every
// destination in `table`. Call from every lane (u + i < last is warp-uniform).
template <int FANOUT, int N>
EP_DEVICE void ep_fp8_send_batch(const EpWarpRows& table, int warp, int u, int last, int lane, const EpFp8Batch<N>& batch) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (u + i >= last) break;
        float x[EP_FP8_LANE];
#pragma unroll
        for (int j = 0; j < EP_FP8_LANE_VECS; ++j) {
#pragma unroll
            for (int e = 0; e < EP_ELEMS_PER_VEC; ++e) x[j * EP_ELEMS_PER_VEC + e] = ep_element(batch.v[i][j], e);
        }
        ep_fp8_send_chunk<FANOUT>(table, warp, u + i, lane, x);
    }
}
#endif

// Passed-through FP8 rows (EP_FP8 == 2): token t's scale words to each destination the warp
// published in `table.scales` (once per token: with its first piece). Nothing otherwise.
template <int FANOUT>
EP_DEVICE void ep_send_scales(const EpArgs& args, int rank, int t, const EpWarpRows& table, int warp, int lane) {
#if EP_FP8 == 2
    const ep_u32* from = reinterpret_cast<const ep_u32*>(args.rank[rank].scales) + static_cast<ep_u64>(t) * EP_SCALE_WORDS;
    for (int w = lane; w < EP_SCALE_WORDS; w += 32) {
        const ep_u32 value = from[w];
#pragma unroll
        for (int c = 0; c < FANOUT; ++c) {
            ep_u32* dst = reinterpret_cast<ep_u32*>(table.scales[warp][c]);
            if (dst != nullptr) dst[w] = value;
        }
    }
#else
    (void)args; (void)rank; (void)t; (void)table; (void)warp; (void)lane;
#endif
}

// Sends units [first, last) of token t's row (piece `piece` of it) of rank `rank` to each
// destination the warp published in `table` (rows in `address`, FP8 scale words in `scales`).
// Call from every lane.
template <int FANOUT>
EP_DEVICE void ep_send_piece(const EpArgs& args, int rank, int t, const EpWarpRows& table, int warp, int first, int last, int piece, int lane) {
    const ep_u8* x = reinterpret_cast<const ep_u8*>(args.rank[rank].x);
    (void)piece;
#if EP_FP8 == 1
    const ep_u8* src = x + static_cast<ep_u64>(t) * EP_ROW_BYTES;
    for (int u = first; u < last; u += EP_FP8_IN_FLIGHT) {
        EpFp8Batch<EP_FP8_IN_FLIGHT> batch;
        ep_fp8_load_batch(src, u, last, lane, batch);
        ep_fp8_send_batch<FANOUT>(table, warp, u, last, lane, batch);
    }
#else
    ep_copy_piece<FANOUT>(x + static_cast<ep_u64>(t) * EP_WIRE_BYTES, table.address[warp], first, last, lane);
    if (piece == 0) ep_send_scales<FANOUT>(args, rank, t, table, warp, lane);
#endif
}

// A piece's first units (vectors of the wire row, or chunks the kernel quantises), loaded before
// the piece's rows are looked up, so that the source row's loads travel with the lookups' (one
// round trip before the first store instead of two); ep_send_piece_ahead stores them to every
// destination, then sends the rest of the piece. Not for f32 rows quantised here: their first
// chunks take 32 registers, which spill when held across the lookups (EP_AHEAD_FITS).
#define EP_AHEAD_FITS (EP_FP8 != 1 || EP_ELEM != 2)
#if EP_FP8 == 1
#ifndef EP_FP8_AHEAD
#define EP_FP8_AHEAD EP_FP8_IN_FLIGHT   // chunks loaded ahead (the host sets it: a piece's chunks, 2 to 4)
#endif
#define EP_AHEAD_UNITS EP_FP8_AHEAD
struct EpAhead {
    EpFp8Batch<EP_FP8_AHEAD> batch;
};
#else
#define EP_AHEAD_UNITS (32 * EP_UNROLL)
struct EpAhead {
    ep_vec v[EP_UNROLL];
};
#endif

#ifndef EP_PREFETCH_PIECE
#define EP_PREFETCH_PIECE 1   // the rest of a piece is fetched into L2 with its first units (below)
#endif

EP_DEVICE void ep_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }

// Loads the piece's first units, and (EP_PREFETCH_PIECE) asks L2 for the rest of this lane's
// bytes of it: the piece's later loads then wait on L2 rather than on memory. A warp of the
// standard LL cases has one item, so every later load of its piece was a memory round trip
// after the stores of the units before it.
EP_DEVICE void ep_load_piece_ahead(const EpArgs& args, int rank, int t, int first, int last, int lane, EpAhead& ahead) {
    const ep_u8* x = reinterpret_cast<const ep_u8*>(args.rank[rank].x);
#if EP_FP8 == 1
    const ep_u8* src = x + static_cast<ep_u64>(t) * EP_ROW_BYTES;
    ep_fp8_load_batch(src, first, last, lane, ahead.batch);
#if EP_PREFETCH_PIECE
    for (int u = first + EP_FP8_AHEAD; u < last; ++u) {
        const int element = u * EP_FP8_CHUNK + lane * EP_FP8_LANE;
        if (element >= EP_HIDDEN) break;
#pragma unroll
        for (int b = 0; b < EP_FP8_LANE * EP_ELEM_BYTES; b += 32) ep_prefetch_l2(src + static_cast<ep_u64>(element) * EP_ELEM_BYTES + b);
    }
#endif
#else
    const ep_u8* src = x + static_cast<ep_u64>(t) * EP_WIRE_BYTES;
    ep_load_ahead(src, ahead.v, first, last, lane);
#if EP_PREFETCH_PIECE
    for (int v = first + EP_AHEAD_UNITS + lane; v < last; v += 32) ep_prefetch_l2(src + static_cast<ep_u64>(v) * EP_VEC_BYTES);
#endif
#endif
}

template <int FANOUT>
EP_DEVICE void ep_send_piece_ahead(const EpArgs& args, int rank, int t, const EpWarpRows& table, int warp, int first, int last, int piece,
                                   int lane, const EpAhead& ahead) {
#if EP_FP8 == 1
    ep_fp8_send_batch<FANOUT>(table, warp, first, last, lane, ahead.batch);
#else
    ep_store_unrolled<FANOUT>(table.address[warp], ahead.v, first + lane, last);
#endif
    ep_send_piece<FANOUT>(args, rank, t, table, warp, min(last, first + EP_AHEAD_UNITS), last, piece, lane);
}

// Where the warp's lane publishes its destination's scale words (FP8; nothing otherwise).
EP_DEVICE void ep_publish_scales_target(const EpArgs& args, EpWarpRows& table, int warp, int lane, int d, int row) {
#if EP_FP8
    table.scales[warp][lane] = row >= 0 ? reinterpret_cast<ep_u64>(ep_put_scales_target(args, d, static_cast<ep_u64>(row))) : 0ull;
#endif
}

// A padding row of an expert-major HT zone on this rank: zero codes (or elements) and, with
// FP8, zero scale words. One warp.
EP_DEVICE void ep_zero_wire_row(const EpArgs& args, int rank, int row, int lane) {
    ep_u8* target = ep_put_row_target(args, rank, static_cast<ep_u64>(row));
    ep_vec zero;
    ep_u32* words = reinterpret_cast<ep_u32*>(&zero);
    for (int i = 0; i < EP_VEC_BYTES / 4; ++i) words[i] = 0;
    for (int v = lane; v < EP_WIRE_VECS; v += 32) ep_store_vec(target + static_cast<ep_u64>(v) * EP_VEC_BYTES, zero);
#if EP_FP8
    ep_u32* scales = ep_put_scales_target(args, rank, static_cast<ep_u64>(row));
    for (int w = lane; w < EP_SCALE_WORDS; w += 32) scales[w] = 0u;
#endif
}
