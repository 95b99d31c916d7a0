/*
 * The group config of an abi_fuzz.c input (included by it once): its first 13 bytes, then the
 * backend byte. Small configs come from most byte values (R 1...8, L 1...3, K <= 4, rows of
 * 8...32 bytes, Bmax 1...4); the top values of each byte reach large ones (hidden up to 7168,
 * top-k 32, hundreds or thousands of experts, Bmax up to 512, up to 64 ranks, alignment up to
 * 1024, FP8 in every scale mode and source), scaled down to BUDGET bytes of buffers so that an
 * input stays fast. The wrong-config byte sets one field just past a bound of GroupConfig's
 * validation (must be refused: epInvalidArgument) or on it (must be accepted, or, where the
 * host's memory cannot hold the step's metadata, refused as out of memory).
 */

/* Bytes of all the buffers the harness holds for one input (all ranks, before the copies taken
 * around each call). Over it, a config is scaled down (or, on a bound, only created and asked). */
#define BUDGET ((double)(24 << 20))

static const double timeouts[] = {0.2, 0.5, 0.1, -1.0, NAN, INFINITY, 1e-12, 0.3};

typedef struct {
    int expectValid;  /* 1: must be accepted; 0: must be refused; -1: either */
    int bound;        /* a field on or past a bound of the validation */
} ConfigExpectation;

static int64_t fp8_block_of(const epGroupConfig_t* c) { return c->fp8Scales == epFP8E8M0Block32 ? 32 : 128; }

/* The receive rows of a valid config, as the header defines them (independently of the library). */
static double receive_rows(const epGroupConfig_t* c) {
    double R = c->ranks, L = c->ranks ? (double)(c->experts / c->ranks) : 0, B = (double)c->maxTokensPerRank;
    int layout = c->layout == epLayoutDefault ? (c->algorithm == epAlgorithmLowLatency ? epLayoutExpertMajor : epLayoutFlat) : c->layout;
    double a = c->alignment < 1 ? 1 : c->alignment, K = c->topK < L ? c->topK : L;
    switch (layout) {
    case epLayoutExpertMajor: return L * R * B;
    case epLayoutRankMajor: return R * B;
    case epLayoutFlat: return c->maxReceivedTokensPerRank ? (double)c->maxReceivedTokensPerRank : R * B;
    default: return c->maxReceivedTokensPerRank ? (double)c->maxReceivedTokensPerRank : R * B * K + L * (a - 1);
    }
}

static double config_bytes(const epGroupConfig_t* c) {
    double es = (double)dtype_size(c->elementType), H = (double)c->hidden, K = c->topK, R = c->ranks;
    double rows = receive_rows(c), B = (double)c->maxTokensPerRank + 1, words = c->fp8Scales ? H / 32 : 0;
    int layout = c->layout == epLayoutDefault ? (c->algorithm == epAlgorithmLowLatency ? epLayoutExpertMajor : epLayoutFlat) : c->layout;
    double routing = layout == epLayoutExpertMajor ? 0 : layout == epLayoutExpertMajorPadded ? 16 : K * 16; /* idx, weights, gradients */
    double perRank = rows * H * (c->fp8Scales ? 1 + es : es) + rows * 4 * words + rows * routing + B * H * es * 2 + B * K * 16;
    return perRank * R * 2; /* and the stacked calls' arenas */
}

/* The host backend's routing metadata of one step of B tokens a rank (GroupConfig.hostStepBytes). */
static double host_step_bytes(const epGroupConfig_t* c, double B) {
    return (6.0 * ((double)c->experts + c->ranks) + B * (3.0 * c->topK + c->ranks)) * 8 * c->ranks;
}

/* Sets `c`'s HT capacity from its byte: small (0...23 rows) or a share of the automatic one. */
static void set_capacity(epGroupConfig_t* c, uint8_t nb) {
    c->maxReceivedTokensPerRank = 0;
    if (c->algorithm != epAlgorithmHighThroughput || !(nb & 1)) return;
    int v = (nb >> 1) & 0x3F;
    if (v < 24) { c->maxReceivedTokensPerRank = v; return; }
    epGroupConfig_t automatic = *c;
    double rows = receive_rows(&automatic) * (v - 23) / 32;
    c->maxReceivedTokensPerRank = rows < 1 ? 1 : (int64_t)rows;
}

/* One field on or past a bound (`v` 0...31); returns the expectation. */
static int bound_case(epGroupConfig_t* c, int v, int es) {
    const int64_t max32 = 0x7fffffff;
    int ht = c->algorithm == epAlgorithmHighThroughput, padded = c->layout == epLayoutExpertMajorPadded;
    int L = c->experts / c->ranks;
    switch (v) {
    case 0: c->ranks = 64; c->experts = 64 * (L < 2 ? L : 2); if (c->topK > c->experts) c->topK = c->experts; return 1;
    case 1: c->ranks = 65; c->experts = 65; c->topK = 1; return 0;
    case 2: c->ranks = -1; return 0;
    case 3: c->topK = 32; if (c->experts < 32) c->experts = c->ranks * ((32 + c->ranks - 1) / c->ranks); return 1;
    case 4: c->topK = 33; if (c->experts < 33) c->experts = c->ranks * ((33 + c->ranks - 1) / c->ranks); return 0;
    case 5: c->topK = c->experts <= 32 ? c->experts : 32; return 1;
    case 6: c->hidden = max32; return 0;                       /* odd: never a multiple of 8 bytes */
    case 7: c->hidden = max32 & ~(int64_t)127; return 1;       /* the largest hidden, every element type and block */
    case 8: c->hidden = max32 + 1; return 0;                   /* past the C ABI's 32-bit range */
    case 9: c->hidden = INT64_MAX; return 0;
    case 10: c->maxTokensPerRank = max32; return 1;
    case 11: c->maxTokensPerRank = max32 + 1; return 0;
    case 12: c->maxTokensPerRank = INT64_MIN; return 0;
    case 13: c->experts = (int32_t)(max32 - max32 % c->ranks); c->topK = c->topK; return -1; /* metadata may not fit */
    case 14: c->experts = INT32_MIN; return 0;
    case 15: c->maxReceivedTokensPerRank = (int64_t)1 << 40; return ht ? 1 : 0;
    case 16: c->maxReceivedTokensPerRank = ((int64_t)1 << 40) + 1; return 0;
    case 17: c->maxReceivedTokensPerRank = INT64_MIN; return 0;
    case 18: c->alignment = 1024; return padded ? 1 : 0;
    case 19: c->alignment = padded ? 1025 : INT32_MIN; return 0;
    case 20: c->timeoutSeconds = 1e-9; return 1;               /* every wait may time out */
    case 21: c->timeoutSeconds = 86400; return 1;
    case 22: c->timeoutSeconds = 86400.000001; return 0;
    case 23: c->timeoutSeconds = -0.0; return 1;               /* == 0: the default 10 s */
    case 24: c->fp8Scales = (epFP8Scales_t)4; return 0;
    case 25: c->fp8Source = (epFP8Source_t)(c->fp8Scales ? 2 : 1); return 0; /* pass-through needs a scale mode */
    case 26: c->fp8Scales = epFP8E8M0Block32; c->hidden = 32 * (1 + (es == 1)); return es == 1 ? 0 : 1; /* u8 takes no FP8 */
    case 27: c->fp8Scales = epFP8UE8M0Block128; c->hidden = 32 * 5; c->elementType = epBFloat16; return 0; /* not a multiple of 128 */
    case 28: c->elementType = epFloat8E4M3; return 0;
    case 29: c->layout = (epLayout_t)-1; return 0;
    case 30: c->structSize = sizeof *c + 8; return -1;         /* a later version's size */
    default: /* every count at its largest together */
        c->ranks = 64; c->experts = (int32_t)(max32 - max32 % 64); c->topK = 32; c->hidden = max32 & ~(int64_t)127;
        c->maxTokensPerRank = max32; c->maxReceivedTokensPerRank = ht ? (int64_t)1 << 40 : 0; c->alignment = padded ? 1024 : 0;
        return -1;
    }
}

/* Decodes the group config and what the library must answer to it. */
static ConfigExpectation decode_config(Reader* in, epGroupConfig_t* c) {
    memset(c, 0, sizeof *c);
    c->structSize = sizeof *c;
    int valid = 1;
    uint8_t a = u8(in);
    c->algorithm = (epAlgorithm_t)(a & 1);
    uint8_t lb = u8(in);
    if (c->algorithm == epAlgorithmLowLatency) c->layout = (epLayout_t)((lb % 3 == 0) ? epLayoutDefault : (lb % 3 == 1) ? epLayoutExpertMajor : epLayoutRankMajor);
    else c->layout = (epLayout_t)((lb % 3 == 0) ? epLayoutDefault : (lb % 3 == 1) ? epLayoutFlat : epLayoutExpertMajorPadded);
    if (lb >= 250) { /* the other algorithm's layouts, or no layout at all */
        int v = lb - 250;
        c->layout = (epLayout_t)(c->algorithm == epAlgorithmLowLatency ? 3 + v : v < 2 ? 1 + v : 3 + v);
        valid = 0;
    }
    static const int bigRanks[] = {9, 12, 16, 24, 64, 32, 48, 10}; /* 64 ranks (a thread each per call) only from 0xFC */
    uint8_t rb = u8(in);
    c->ranks = rb < 0xF8 ? 1 + rb % 8 : bigRanks[rb & 7];
    static const int bigLocal[] = {4, 8, 16, 32, 64, 128, 256, 5};
    uint8_t eb = u8(in);
    int L = eb < 0xC0 ? 1 + eb % 3 : bigLocal[eb & 7];
    if ((int64_t)c->ranks * L > 4096) L = 4096 / c->ranks;
    c->experts = c->ranks * L;
    static const int bigK[] = {5, 8, 16, 32, 32, 6, 9, 24};
    uint8_t kb = u8(in);
    int maxK = c->experts < 4 ? c->experts : 4;
    c->topK = kb < 0xC0 ? 1 + kb % maxK : bigK[kb & 7] < c->experts ? bigK[kb & 7] : c->experts;
    /* The element type; bits 2...4 an FP8 scale mode (1...3; else none), bit 5 its source. */
    uint8_t tb = u8(in);
    static const epDataType_t types[] = {epBFloat16, epFloat16, epFloat32, epUInt8};
    c->elementType = types[tb % 4];
    int fp8 = (tb >> 2) & 7;
    if (fp8 >= 1 && fp8 <= 3) {
        c->fp8Scales = (epFP8Scales_t)fp8;
        c->fp8Source = (tb & 0x20) ? epFP8PassThrough : epFP8Quantize;
        if (c->elementType == epUInt8) valid = 0; /* combine runs in the element type */
    }
    int es = (int)dtype_size(c->elementType);
    int64_t unit = c->fp8Scales ? fp8_block_of(c) : 8 / es;
    static const int64_t bigHidden[] = {64, 128, 256, 512, 1024, 2048, 4096, 7168};
    uint8_t hb = u8(in);
    c->hidden = hb < 0xC0 ? (int64_t)(1 + hb % 4) * unit : round_up(bigHidden[hb & 7], unit);
    static const int64_t bigTokens[] = {8, 16, 32, 64, 128, 256, 512, 100};
    uint8_t bb = u8(in);
    c->maxTokensPerRank = bb < 0xC0 ? 1 + bb % 4 : bigTokens[bb & 7];
    uint8_t nb = u8(in);
    c->overflow = (c->algorithm == epAlgorithmHighThroughput && (nb & 0x80)) ? epOverflowDrop : epOverflowFail;
    uint8_t ab = u8(in);
    static const int alignments[] = {0, 1, 2, 4, 3, 8}, bigAlignments[] = {16, 64, 128, 1024, 7, 512, 1000, 1023};
    c->alignment = c->layout != epLayoutExpertMajorPadded ? 0 : ab < 0xC0 ? alignments[ab % 6] : bigAlignments[ab & 7];
    uint8_t ob = u8(in);
    c->timeoutSeconds = timeouts[ob % 4 == 3 ? 0 : ob % 3]; /* mostly valid */
    /* Within the budget: fewer tokens first (or, bit 5 of the tokens byte, a shorter row), then
     * fewer experts, then fewer ranks. */
    set_capacity(c, nb);
    while (config_bytes(c) > BUDGET) {
        int rowFirst = (bb & 0x20) != 0;
        if (!rowFirst && c->maxTokensPerRank > 1) c->maxTokensPerRank = (c->maxTokensPerRank + 1) / 2;
        else if (c->hidden > unit) c->hidden = c->hidden / 2 / unit * unit < unit ? unit : c->hidden / 2 / unit * unit;
        else if (c->maxTokensPerRank > 1) c->maxTokensPerRank = (c->maxTokensPerRank + 1) / 2;
        else if (c->experts > c->ranks) c->experts = c->ranks * (c->experts / c->ranks / 2);
        else if (c->ranks > 1) c->experts = c->ranks = c->ranks / 2;
        else break;
        if (c->topK > c->experts) c->topK = c->experts;
        set_capacity(c, nb);
    }
    /* The wrong-config byte: one field out of its bounds (224...255), or on or just past a
     * bound of the validation (192...223). */
    uint8_t wb = u8(in);
    ConfigExpectation x = {valid, 0};
    if (wb >= 192 && wb < 224) {
        int v = bound_case(c, wb - 192, es);
        x.bound = 1;
        if (valid == 1 || v == 0) x.expectValid = v;
    } else if (wb >= 224) {
        x.expectValid = 0;
        switch ((wb - 224) % 16) {
        case 0: c->ranks = (wb & 1) ? 0 : 65; break;
        case 1: c->experts = c->experts + 1; if (c->ranks == 1) c->experts = 0; break;
        case 2: c->topK = (wb & 1) ? 0 : 33; break;
        case 3: c->topK = c->experts + 1; if (c->topK <= 32) break; c->topK = 0; break;
        case 4: c->hidden = (wb & 1) ? 0 : -8; break;
        case 5: c->hidden = es == 1 ? 3 : 1; if (es == 4) c->hidden = 1; break; /* not a multiple of 8 bytes */
        case 6: c->elementType = (wb & 1) ? epInt32 : (epDataType_t)99; break;
        case 7: c->maxTokensPerRank = (wb & 1) ? 0 : -1; break;
        case 8: c->maxReceivedTokensPerRank = c->algorithm == epAlgorithmLowLatency ? 5 : -1; break;
        case 9: c->overflow = (epOverflowPolicy_t)7; break;
        case 10: c->alignment = c->layout == epLayoutExpertMajorPadded ? ((wb & 1) ? 1025 : -1) : 0; if (c->layout != epLayoutExpertMajorPadded && lb < 250) x.expectValid = valid; break;
        case 11: c->timeoutSeconds = timeouts[3 + (wb & 1)]; break;
        case 12: /* 0, or version 2's size (the FP8 fields unread: accepted, without FP8) */
            c->structSize = (wb & 1) ? offsetof(epGroupConfig_t, fp8Scales) : 0;
            if (wb & 1) x.expectValid = lb < 250;
            break;
        case 13: c->algorithm = (epAlgorithm_t)5; break;
        case 14: if (c->algorithm == epAlgorithmLowLatency) { c->overflow = epOverflowDrop; x.expectValid = -1; } else c->overflow = (epOverflowPolicy_t)-1; break;
        case 15: c->timeoutSeconds = timeouts[5 + (wb & 1)]; x.expectValid = -1; break; /* inf / 1e-12: either answer */
        }
    }
    return x;
}

/* epGroupGetInfo against the config, every field worked out here from the header's definitions. */
static void check_info_fields(const epGroupConfig_t* c, const epGroupInfo_t* info) {
    int fp8 = c->structSize >= offsetof(epGroupConfig_t, fp8Source) + sizeof c->fp8Source ? c->fp8Scales : 0;
    int64_t L = c->experts / c->ranks, H = c->hidden, B = c->maxTokensPerRank, K = c->topK;
    int layout = c->layout == epLayoutDefault ? (c->algorithm == epAlgorithmLowLatency ? epLayoutExpertMajor : epLayoutFlat) : c->layout;
    int64_t a = layout == epLayoutExpertMajorPadded && c->alignment > 1 ? c->alignment : 1;
    int64_t N = c->maxReceivedTokensPerRank ? c->maxReceivedTokensPerRank : c->ranks * B;
    if (layout == epLayoutExpertMajorPadded && !c->maxReceivedTokensPerRank) N = c->ranks * B * (K < L ? K : L) + L * (a - 1);
    int64_t shape[4] = {0}, routing[4] = {0};
    int ndim = 2, rndim = 0;
    switch (layout) {
    case epLayoutExpertMajor: ndim = 3; shape[0] = L; shape[1] = c->ranks * B; shape[2] = H; N = L * c->ranks * B; break;
    case epLayoutRankMajor: ndim = 3; shape[0] = c->ranks; shape[1] = B; shape[2] = H; N = c->ranks * B; rndim = 3; routing[0] = c->ranks; routing[1] = B; routing[2] = K; break;
    case epLayoutFlat: shape[0] = N; shape[1] = H; rndim = 2; routing[0] = N; routing[1] = K; break;
    default: shape[0] = N; shape[1] = H; rndim = 1; routing[0] = N; break;
    }
#define WANT(field, value) do { if ((int64_t)(info->field) != (int64_t)(value)) FAIL("epGroupGetInfo: " #field " = %lld, the header says %lld", (long long)(info->field), (long long)(value)); } while (0)
    WANT(ranks, c->ranks); WANT(experts, c->experts); WANT(localExperts, L); WANT(topK, K); WANT(hidden, H);
    WANT(elementType, c->elementType); WANT(algorithm, c->algorithm); WANT(layout, layout); WANT(alignment, a);
    WANT(maxTokensPerRank, B); WANT(receiveCapacity, N); WANT(receiveNdim, ndim); WANT(receiveRoutingNdim, rndim);
    for (int i = 0; i < ndim; i++) WANT(receiveShape[i], shape[i]);
    for (int i = 0; i < rndim; i++) WANT(receiveRoutingShape[i], routing[i]);
    WANT(fp8Scales, fp8);
    WANT(receiveElementType, fp8 ? epFloat8E4M3 : c->elementType);
    WANT(receiveScalesNdim, fp8 ? ndim : 0);
    if (fp8) {
        for (int i = 0; i < ndim - 1; i++) WANT(receiveScalesShape[i], shape[i]);
        WANT(receiveScalesShape[ndim - 1], fp8_scale_words(fp8, H));
    }
#undef WANT
}
