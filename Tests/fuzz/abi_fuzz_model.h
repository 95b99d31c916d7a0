/*
 * The model of abi_fuzz.c (included by it once, after State): where every row of a step lands,
 * worked out from the routing alone as the header and docs/architecture.md describe it, and the
 * checks of what an accepted call delivered:
 *   - plan_build: per destination, the (source rank, token) pairs in order, a selection's row in
 *     its expert's zone (LL: [L, R*Bmax]; HT expert-major: zones padded to the alignment) or a
 *     pair's row (rank-major: [R, Bmax]; flat: in pair order); with the drop policy the strict
 *     prefix of pairs that fits the capacity; with the fail policy whether the update overflows;
 *   - check_dispatch: the layout info, every received row (FP8: the codes and scales of docs/fp8.md,
 *     quantised here independently), the received routing, padding rows, and every other row
 *     left as it was;
 *   - check_combine: each combined row recomputed in the documented order (float32 fused
 *     multiply-adds, HT partial sums rounded to the element type), bit for bit, and the
 *     backward HT weight gradients.
 */

#include <math.h>

/* ---------------------------------------------------------------------------------------- */
/* Elements                                                                                  */

static float load_element(const uint8_t* row, int64_t i, int type) {
    switch (type) {
    case epBFloat16: { uint16_t b; memcpy(&b, row + 2 * i, 2); uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
    case epFloat16: { _Float16 h; memcpy(&h, row + 2 * i, 2); return (float)h; }
    default: { float f; memcpy(&f, row + 4 * i, 4); return f; }
    }
}

/* `value` rounded once to `type` (round to nearest even), as bits in the low bytes. */
static uint32_t store_bits(float value, int type) {
    uint32_t u;
    memcpy(&u, &value, 4);
    switch (type) {
    case epBFloat16: return isnan(value) ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1)) >> 16;
    case epFloat16: { _Float16 h = (_Float16)value; uint16_t b; memcpy(&b, &h, 2); return b; }
    default: return u;
    }
}

static float round_trip(float value, int type) {
    uint32_t b = store_bits(value, type);
    if (type == epFloat32) return value;
    uint8_t bytes[2] = {(uint8_t)b, (uint8_t)(b >> 8)};
    return load_element(bytes, 0, type);
}

static int is_nan_bits(uint32_t b, int type) {
    if (type == epFloat32) return (b & 0x7F800000u) == 0x7F800000u && (b & 0x7FFFFFu);
    if (type == epBFloat16) return (b & 0x7F80u) == 0x7F80u && (b & 0x7Fu);
    return (b & 0x7C00u) == 0x7C00u && (b & 0x3FFu);
}

/* ---------------------------------------------------------------------------------------- */
/* FP8 (docs/fp8.md, "Converting a float to e4m3" and "Quantising a block")                  */

static uint8_t e4m3_encode(float f) {
    if (isnan(f)) return 0x7F;
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7E;
    if (a < 0x1p-6f) return sign | (uint8_t)rintf(a * 512.0f); /* subnormal step 2^-9; 8 is 2^-6 */
    int e;
    frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1): the exponent of a is e - 1 */
    e -= 1;
    float q = rintf(ldexpf(a, 3 - e)); /* 8 ... 16 */
    if (q == 16.0f) { q = 8.0f; e += 1; }
    int code = ((e + 7) << 3) | ((int)q - 8);
    return sign | (uint8_t)(code > 0x7E ? 0x7E : code);
}

static int fp8_block(int mode) { return mode == epFP8E8M0Block32 ? 32 : 128; }
static int64_t fp8_scale_words(int mode, int64_t hidden) {
    int64_t blocks = hidden / fp8_block(mode);
    return mode == epFP8Float32Block128 ? blocks : (blocks + 3) / 4;
}

/* One row of `hidden` elements of `type` into e4m3 codes and scale words. */
static void fp8_quantize_row(int mode, int type, int64_t hidden, const uint8_t* row, uint8_t* codes, uint32_t* words) {
    int64_t block = fp8_block(mode), words_n = fp8_scale_words(mode, hidden);
    memset(words, 0, (size_t)words_n * 4);
    for (int64_t j = 0; j * block < hidden; j++) {
        float amax = 0;
        for (int64_t i = j * block; i < (j + 1) * block; i++) {
            float v = fabsf(load_element(row, i, type));
            if (v > amax) amax = v; /* NaN never compares greater */
        }
        if (amax < 1e-4f) amax = 1e-4f;
        if (amax > 3.40282347e38f) amax = 3.40282347e38f;
        float multiplier;
        if (mode == epFP8Float32Block128) {
            float scale = amax / 448.0f;
            multiplier = 448.0f / amax;
            memcpy(&words[j], &scale, 4);
        } else {
            float quotient = amax / 448.0f;
            uint32_t u;
            memcpy(&u, &quotient, 4);
            int e = (int)((u >> 23) & 0xFF) - 127 + ((u & 0x7FFFFF) ? 1 : 0);
            multiplier = ldexpf(1.0f, -e);
            words[j / 4] |= (uint32_t)(e + 127) << (8 * (j % 4));
        }
        for (int64_t i = j * block; i < (j + 1) * block; i++) {
            volatile float product = load_element(row, i, type) * multiplier; /* rounded to float32 once */
            codes[i] = e4m3_encode(product);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The plan of a step                                                                        */

typedef struct {
    int64_t* selRow[MAX_R];   /* [B*K] of each source: the row on the expert's rank, or -1 */
    int64_t* pairRow[MAX_R];  /* [B*R] of each source: the row on rank d, or -1 */
    int64_t* expert;          /* [R*L]: rows per (destination, local expert) */
    int64_t* esc;             /* [R*L*R]: per (destination, local expert, source) */
    int64_t* offsets;         /* [R*L] */
    int64_t source[MAX_R][MAX_R]; /* [destination][source]: pairs kept */
    int64_t offered[MAX_R], total[MAX_R];
    int overflow;             /* fail policy: some destination overflows (the update must fail) */
} Plan;

static void plan_free(Plan* p) {
    for (int r = 0; r < MAX_R; r++) { free(p->selRow[r]); free(p->pairRow[r]); }
    free(p->expert); free(p->esc); free(p->offsets);
    memset(p, 0, sizeof *p);
}

static int expert_of(const State* s, const StepModel* m, int src, int t, int c) {
    int64_t e = m->idx[src][t * s->K + c];
    if (e < 0) return -1;
    if (!(m->mask >> src & 1) || !(m->mask >> (e / s->L) & 1)) return -1;
    return (int)e;
}

static int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }
static int ht(const State* s) { return s->algorithm == epAlgorithmHighThroughput; }
static int expert_major(const State* s) { return s->layout == epLayoutExpertMajor || s->layout == epLayoutExpertMajorPadded; }

/* Rows a destination's buffer needs for the pairs counted so far (HT): pairs, or padded zones. */
static int64_t occupied(const State* s, const int64_t* zones, int64_t pairs) {
    if (s->layout != epLayoutExpertMajorPadded) return pairs;
    int64_t rows = 0;
    for (int l = 0; l < s->L; l++) rows += round_up(zones[l], s->alignment);
    return rows;
}

static void plan_build(const State* s, const StepModel* m, Plan* p) {
    const int R = s->R, L = s->L, K = s->K;
    memset(p, 0, sizeof *p);
    p->expert = calloc((size_t)R * L, 8);
    p->offsets = calloc((size_t)R * L, 8);
    p->esc = calloc((size_t)R * L * R, 8);
    int64_t* zones = calloc((size_t)L, 8);
    for (int src = 0; src < R; src++) {
        p->selRow[src] = malloc((size_t)(m->tokens[src] * K + 1) * 8);
        p->pairRow[src] = malloc((size_t)(m->tokens[src] * R + 1) * 8);
        for (int i = 0; i < m->tokens[src] * K; i++) p->selRow[src][i] = -1;
        for (int i = 0; i < m->tokens[src] * R; i++) p->pairRow[src][i] = -1;
    }
    int drop = ht(s) && s->overflow == epOverflowDrop;
    for (int d = 0; d < R; d++) {
        /* Pass 1: which pairs are kept (a strict prefix in (source, token) order with drop). */
        memset(zones, 0, (size_t)L * 8);
        int64_t pairs = 0, full = 0;
        int stopped = 0;
        for (int src = 0; src < R; src++)
            for (int t = 0; t < m->tokens[src]; t++) {
                int any = 0;
                for (int c = 0; c < K; c++) { int e = expert_of(s, m, src, t, c); if (e >= 0 && e / L == d) any = 1; }
                if (!any) continue;
                p->offered[d]++;
                if (stopped) continue;
                for (int c = 0; c < K; c++) { int e = expert_of(s, m, src, t, c); if (e >= 0 && e / L == d) zones[e % L]++; }
                if (ht(s) && occupied(s, zones, pairs + 1) > s->capacity) {
                    if (!drop) { full = 1; pairs++; continue; } /* counted to find the overflow */
                    for (int c = 0; c < K; c++) { int e = expert_of(s, m, src, t, c); if (e >= 0 && e / L == d) zones[e % L]--; }
                    stopped = 1;
                    continue;
                }
                pairs++;
                p->source[d][src]++;
                p->pairRow[src][t * R + d] = 0; /* kept: its row comes in pass 2 */
                for (int c = 0; c < K; c++) {
                    int e = expert_of(s, m, src, t, c);
                    if (e >= 0 && e / L == d) { p->expert[d * L + e % L]++; p->esc[((int64_t)d * L + e % L) * R + src]++; }
                }
            }
        if (full) p->overflow = 1;
        /* Zone starts and the total. */
        int64_t total = 0;
        for (int l = 0; l < L; l++) {
            int64_t n = p->expert[d * L + l];
            if (s->layout == epLayoutExpertMajor) { p->offsets[d * L + l] = (int64_t)l * R * s->Bmax; total += n; }
            else if (s->layout == epLayoutExpertMajorPadded) { p->offsets[d * L + l] = total; total += round_up(n, s->alignment); }
        }
        if (!expert_major(s)) for (int src = 0; src < R; src++) total += p->source[d][src];
        p->total[d] = total;
        /* Pass 2: rows, in (source, token) order. */
        int64_t* lfill = calloc((size_t)L, 8);
        int64_t flat = 0;
        for (int src = 0; src < R; src++) {
            int64_t perSource = 0;
            for (int t = 0; t < m->tokens[src]; t++) {
                if (p->pairRow[src][t * R + d] < 0) continue;
                p->pairRow[src][t * R + d] = s->layout == epLayoutRankMajor ? src * s->Bmax + perSource++ : flat++;
                for (int c = 0; c < K; c++) {
                    int e = expert_of(s, m, src, t, c);
                    if (e < 0 || e / L != d || !expert_major(s)) continue;
                    p->selRow[src][t * K + c] = p->offsets[d * L + e % L] + lfill[e % L]++;
                }
            }
        }
        free(lfill);
    }
    free(zones);
}

/* ---------------------------------------------------------------------------------------- */
/* Dispatch                                                                                  */

/* What one rank's dispatch got: its outputs after the call, and the same bytes before it. */
typedef struct {
    const epLayoutInfo_t* info;    /* NULL: not asked for (or a struct of another size) */
    const uint8_t *recv, *recvBefore, *idx, *idxBefore, *w, *wBefore, *scales, *scalesBefore;
    int idxDtype;
} Received;

static int64_t load_index(const uint8_t* p, int dtype, int64_t i) {
    if (dtype == epInt64) { int64_t v; memcpy(&v, p + 8 * i, 8); return v; }
    int32_t v; memcpy(&v, p + 4 * i, 4); return v;
}

static float load_f32(const uint8_t* p, int64_t i) { float f; memcpy(&f, p + 4 * i, 4); return f; }

static int same_f32(float a, float b) { return memcmp(&a, &b, 4) == 0; }

/* The info of destination d against the plan. */
static void check_info(const State* s, const Plan* p, int d, const epLayoutInfo_t* info) {
    const int L = s->L, R = s->R;
    int64_t kept = 0;
    for (int l = 0; l < L; l++) {
        if (info->expertCounters[l] != p->expert[d * L + l]) FAIL("rank %d: expertCounters[%d] = %lld, model %lld", d, l, (long long)info->expertCounters[l], (long long)p->expert[d * L + l]);
        int64_t off = expert_major(s) ? p->offsets[d * L + l] : 0;
        if (info->expertOffsets[l] != off) FAIL("rank %d: expertOffsets[%d] = %lld, model %lld", d, l, (long long)info->expertOffsets[l], (long long)off);
        for (int src = 0; src < R; src++)
            if (info->expertSourceCounters[l * R + src] != p->esc[((int64_t)d * L + l) * R + src])
                FAIL("rank %d: expertSourceCounters[%d][%d] = %lld, model %lld", d, l, src, (long long)info->expertSourceCounters[l * R + src], (long long)p->esc[((int64_t)d * L + l) * R + src]);
    }
    for (int src = 0; src < R; src++) {
        if (info->sourceRankCounters[src] != p->source[d][src]) FAIL("rank %d: sourceRankCounters[%d] = %lld, model %lld", d, src, (long long)info->sourceRankCounters[src], (long long)p->source[d][src]);
        kept += p->source[d][src];
    }
    if (info->receivedTotal != p->total[d]) FAIL("rank %d: receivedTotal %lld, model %lld", d, (long long)info->receivedTotal, (long long)p->total[d]);
    if (info->droppedTokens != p->offered[d] - kept) FAIL("rank %d: droppedTokens %lld, model %lld", d, (long long)info->droppedTokens, (long long)(p->offered[d] - kept));
    if (ht(s) && p->total[d] > s->capacity) FAIL("rank %d: model total %lld > capacity %lld", d, (long long)p->total[d], (long long)s->capacity);
}

/* The bytes a row of source `src`, token t must arrive as: the row itself, or (FP8 quantise) its
 * codes; `scales` gets its scale words (FP8). */
static const uint8_t* wire_row(const State* s, int src, int t, uint8_t* codes, uint32_t* scales) {
    const uint8_t* x = s->x[src].data;
    if (!s->fp8) return x + (int64_t)t * s->H * s->esize;
    if (s->fp8Source == epFP8PassThrough) {
        memcpy(scales, s->scalesIn[src].data + (int64_t)t * s->scaleWords * 4, (size_t)s->scaleWords * 4);
        return x + (int64_t)t * s->H;
    }
    fp8_quantize_row(s->fp8, s->elementType, s->H, x + (int64_t)t * s->H * s->esize, codes, scales);
    return codes;
}

/* Destination d after an accepted dispatch of the step `m`: info (when given), and, when `got->recv`
 * is set (every argument the model's own), every row of every output. */
static void check_dispatch(const State* s, const StepModel* m, const Plan* p, int d, const Received* got) {
    const int L = s->L, R = s->R, K = s->K;
    if (!(m->mask >> d & 1)) return;
    if (got->info) check_info(s, p, d, got->info);
    if (!got->recv) return;
    const int64_t rowBytes = s->H * s->wsize, rows = s->capacity;
    const int64_t scaleBytes = s->scaleWords * 4;
    uint8_t* seen = calloc((size_t)rows + 1, 1); /* 1: a received row, 2: padding */
    uint8_t* codes = malloc((size_t)s->H + 1);
    uint32_t* scales = malloc((size_t)scaleBytes + 4);
    for (int src = 0; src < R; src++)
        for (int t = 0; t < m->tokens[src]; t++) {
            if (p->pairRow[src][t * R + d] < 0) continue;
            const uint8_t* want = wire_row(s, src, t, codes, scales);
            int64_t rowsOf[64];
            int n = 0;
            if (expert_major(s)) {
                for (int c = 0; c < K; c++) {
                    int e = expert_of(s, m, src, t, c);
                    if (e < 0 || e / L != d) continue;
                    int64_t row = p->selRow[src][t * K + c];
                    rowsOf[n++] = row;
                    if (s->layout == epLayoutExpertMajorPadded) {
                        int64_t id = load_index(got->idx, got->idxDtype, row);
                        if (id != e % L) FAIL("rank %d: received topkIdx[%lld] = %lld, model %d", d, (long long)row, (long long)id, e % L);
                        float w = load_f32(got->w, row), wantW = load_f32(s->w[src].data, (int64_t)t * K + c);
                        if (!same_f32(w, wantW)) FAIL("rank %d: received topkWeights[%lld] = %g, model %g (token %d of rank %d)", d, (long long)row, w, wantW, t, src);
                    }
                }
            } else {
                int64_t row = p->pairRow[src][t * R + d];
                rowsOf[n++] = row;
                for (int c = 0; c < K; c++) {
                    int e = expert_of(s, m, src, t, c);
                    int here = e >= 0 && e / L == d;
                    int64_t id = load_index(got->idx, got->idxDtype, row * K + c);
                    if (id != (here ? e % L : -1)) FAIL("rank %d: received topkIdx[%lld][%d] = %lld, model %d", d, (long long)row, c, (long long)id, here ? e % L : -1);
                    float w = load_f32(got->w, row * K + c), wantW = here ? load_f32(s->w[src].data, (int64_t)t * K + c) : 0.0f;
                    if (!same_f32(w, wantW)) FAIL("rank %d: received topkWeights[%lld][%d] = %g, model %g", d, (long long)row, c, w, wantW);
                }
            }
            for (int i = 0; i < n; i++) {
                int64_t row = rowsOf[i];
                if (row < 0 || row >= rows) FAIL("rank %d: model row %lld outside the buffer", d, (long long)row);
                seen[row] = 1;
                if (memcmp(got->recv + row * rowBytes, want, (size_t)rowBytes) != 0)
                    FAIL("rank %d: received row %lld is not token %d of rank %d%s", d, (long long)row, t, src, s->fp8 ? " (FP8 codes)" : "");
                if (s->fp8 && memcmp(got->scales + row * scaleBytes, scales, (size_t)scaleBytes) != 0)
                    FAIL("rank %d: received scales of row %lld are not those of token %d of rank %d", d, (long long)row, t, src);
            }
        }
    /* Padding (HT expert-major): zero rows and scales, weight 0, index -1. */
    if (s->layout == epLayoutExpertMajorPadded)
        for (int l = 0; l < L; l++)
            for (int64_t row = p->offsets[d * L + l] + p->expert[d * L + l]; row < p->offsets[d * L + l] + round_up(p->expert[d * L + l], s->alignment); row++) {
                seen[row] = 2;
                for (int64_t b = 0; b < rowBytes; b++) if (got->recv[row * rowBytes + b]) FAIL("rank %d: padding row %lld is not zero", d, (long long)row);
                for (int64_t b = 0; s->fp8 && b < scaleBytes; b++) if (got->scales[row * scaleBytes + b]) FAIL("rank %d: padding scales of row %lld are not zero", d, (long long)row);
                if (load_index(got->idx, got->idxDtype, row) != -1 || !same_f32(load_f32(got->w, row), 0.0f))
                    FAIL("rank %d: padding row %lld has index %lld, weight %g", d, (long long)row, (long long)load_index(got->idx, got->idxDtype, row), load_f32(got->w, row));
            }
    /* Every other row as it was. */
    int routingPerRow = s->layout == epLayoutExpertMajorPadded ? 1 : K;
    int idxSize = got->idxDtype == epInt64 ? 8 : 4;
    for (int64_t row = 0; row < rows; row++) {
        if (seen[row]) continue;
        if (memcmp(got->recv + row * rowBytes, got->recvBefore + row * rowBytes, (size_t)rowBytes) != 0)
            FAIL("rank %d: row %lld, outside the received zones, was written", d, (long long)row);
        if (s->fp8 && memcmp(got->scales + row * scaleBytes, got->scalesBefore + row * scaleBytes, (size_t)scaleBytes) != 0)
            FAIL("rank %d: the scales of row %lld, outside the received zones, were written", d, (long long)row);
        if (s->routingNdim > 0 && (memcmp(got->idx + row * routingPerRow * idxSize, got->idxBefore + row * routingPerRow * idxSize, (size_t)(routingPerRow * idxSize)) != 0 ||
                                   memcmp(got->w + row * routingPerRow * 4, got->wBefore + row * routingPerRow * 4, (size_t)routingPerRow * 4) != 0))
            FAIL("rank %d: the routing of row %lld, outside the received zones, was written", d, (long long)row);
    }
    free(seen);
    free(codes);
    free(scales);
}

/* ---------------------------------------------------------------------------------------- */
/* Combine                                                                                   */

/* Rank r's combined rows after an accepted combine of step `m` whose every argument was the
 * model's own: `eo[d]` the expert outputs rank d gave, `weights[d]` the topkWeights it gave (LL
 * expert-major: rank r's own [B, K]; HT expert-major: the per-slot ones of rank d),
 * `gradients[d]` its weight gradients (backward HT). */
static void check_combine(const State* s, const StepModel* m, const Plan* p, int r, int forward, const uint8_t* const* eo,
                          const uint8_t* const* weights, const uint8_t* const* gradients, const uint8_t* out, const uint8_t* gradOut) {
    const int L = s->L, R = s->R, K = s->K, type = s->elementType;
    const int64_t H = s->H, rowBytes = H * (int64_t)s->esize;
    if (!(m->mask >> r & 1)) return;
    float* acc = malloc((size_t)H * 4 + 4);
    float* partial = malloc((size_t)H * 4 + 4);
    for (int t = 0; t < m->tokens[r]; t++) {
        for (int64_t i = 0; i < H; i++) acc[i] = 0.0f;
        if (s->layout == epLayoutExpertMajor) {
            for (int c = 0; c < K; c++) {
                int64_t row = p->selRow[r][t * K + c];
                if (row < 0) continue;
                int e = expert_of(s, m, r, t, c);
                float w = forward ? load_f32(weights[r], (int64_t)t * K + c) : 1.0f;
                const uint8_t* x = eo[e / L] + row * rowBytes;
                for (int64_t i = 0; i < H; i++) acc[i] = fmaf(w, load_element(x, i, type), acc[i]);
            }
        } else {
            for (int d = 0; d < R; d++) {
                int64_t pair = p->pairRow[r][t * R + d];
                if (pair < 0) continue;
                if (s->layout != epLayoutExpertMajorPadded) {
                    for (int64_t i = 0; i < H; i++) acc[i] = fmaf(1.0f, load_element(eo[d] + pair * rowBytes, i, type), acc[i]);
                    continue;
                }
                /* The destination's partial sum over the token's slots, ascending local expert. */
                for (int64_t i = 0; i < H; i++) partial[i] = 0.0f;
                for (int l = 0; l < L; l++)
                    for (int c = 0; c < K; c++) {
                        int e = expert_of(s, m, r, t, c);
                        if (e != d * L + l) continue;
                        int64_t slot = p->selRow[r][t * K + c];
                        float w = forward ? load_f32(weights[d], slot) : 1.0f;
                        for (int64_t i = 0; i < H; i++) partial[i] = fmaf(w, load_element(eo[d] + slot * rowBytes, i, type), partial[i]);
                    }
                for (int64_t i = 0; i < H; i++) acc[i] = fmaf(1.0f, round_trip(partial[i], type), acc[i]);
            }
        }
        for (int64_t i = 0; i < H; i++) {
            uint32_t want = store_bits(acc[i], type), got = 0;
            memcpy(&got, out + (int64_t)t * rowBytes + i * (int64_t)s->esize, s->esize);
            if (got != want && !(is_nan_bits(got, type) && is_nan_bits(want, type)))
                FAIL("rank %d: combined token %d element %lld = 0x%x, model 0x%x (%s, %s)", r, t, (long long)i, got, want,
                     forward ? "forward" : "backward", s->layout == epLayoutExpertMajor ? "LL expert-major" : s->layout == epLayoutRankMajor ? "rank-major" : s->layout == epLayoutFlat ? "flat" : "HT expert-major");
        }
        if (forward || !ht(s) || !gradOut) continue;
        for (int c = 0; c < K; c++) {
            float want = 0.0f;
            int e = expert_of(s, m, r, t, c);
            if (e >= 0) {
                int d = e / L;
                if (s->layout == epLayoutExpertMajorPadded && p->selRow[r][t * K + c] >= 0) want = load_f32(gradients[d], p->selRow[r][t * K + c]);
                else if (s->layout == epLayoutFlat && p->pairRow[r][t * R + d] >= 0) want = load_f32(gradients[d], p->pairRow[r][t * R + d] * K + c);
            }
            float got = load_f32(gradOut, (int64_t)t * K + c);
            if (!same_f32(got, want)) FAIL("rank %d: topkWeightGradients[%d][%d] = %g, model %g", r, t, c, got, want);
        }
    }
    free(acc);
    free(partial);
}
