/*
 * A C program against include/expert_parallel.h: one CPU step through the collective calls, the
 * same step through per-rank handles on two threads, error paths, and NCCL-rank groups (argument
 * errors; without NCCL or CUDA a clean error; with both, a group of one rank). Built and run by
 * python/tests/test_c_abi.py (cc ... -lexpert_parallel). `abi_smoke sizes` prints sizeof of
 * every struct, which the Python package's ctypes mirrors are checked against.
 */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include "expert_parallel.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        checks++;                                                     \
        if (!(cond)) {                                                \
            failures++;                                               \
            fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
        }                                                             \
    } while (0)

#define CHECK_OK(call)                                                                        \
    do {                                                                                      \
        epResult_t r_ = (call);                                                               \
        CHECK(r_ == epSuccess, "%s -> %s (%s)", #call, epGetErrorString(r_), epGetLastErrorMessage()); \
    } while (0)

/* Fails with `status` and a last-error message containing `fragment`. */
#define CHECK_FAILS(call, status, fragment)                                                   \
    do {                                                                                      \
        epResult_t r_ = (call);                                                               \
        const char* m_ = epGetLastErrorMessage();                                             \
        CHECK(r_ == (status) && strstr(m_, (fragment)) != NULL, "%s -> %s, message \"%s\"; expected %s and \"%s\"", \
              #call, epGetErrorString(r_), m_, #status, (fragment));                          \
    } while (0)

enum { R = 2, E = 4, K = 2, H = 8, BMAX = 2, L = E / R };

static epGroupConfig_t smallConfig(void) {
    epGroupConfig_t c;
    memset(&c, 0, sizeof c);
    c.structSize = sizeof c;
    c.algorithm = epAlgorithmLowLatency;
    c.layout = epLayoutExpertMajor;
    c.ranks = R;
    c.experts = E;
    c.topK = K;
    c.hidden = H;
    c.elementType = epFloat32;
    c.maxTokensPerRank = BMAX;
    return c;
}

/* One rank's buffers: one token of value r + 1, routed to experts 0 (rank 0) and 3 (rank 1). */
typedef struct {
    float x[1][H];
    int32_t idx[1][K];
    float w[1][K];
    float received[L][R * BMAX][H];
    float y[1][H];
    int64_t expertCounters[L], expertOffsets[L], sourceRankCounters[R], expertSourceCounters[L * R];
    epTensor_t tx, tidx, tw, trecv, ty;
    epLayoutInfo_t info;
} RankBuffers;

static void setUp(RankBuffers* b, int rank) {
    const int64_t xs[2] = {1, H}, is[2] = {1, K}, rs[3] = {L, R * BMAX, H};
    memset(b, 0, sizeof *b);
    for (int i = 0; i < H; i++) b->x[0][i] = (float)(rank + 1);
    b->idx[0][0] = 0;
    b->idx[0][1] = 3;
    b->w[0][0] = 0.25f;
    b->w[0][1] = 0.5f;
    b->tx = epMakeTensor(b->x, epFloat32, 2, xs, -1);
    b->tidx = epMakeTensor(b->idx, epInt32, 2, is, -1);
    b->tw = epMakeTensor(b->w, epFloat32, 2, is, -1);
    b->trecv = epMakeTensor(b->received, epFloat32, 3, rs, -1);
    b->ty = epMakeTensor(b->y, epFloat32, 2, xs, -1);
    b->info.structSize = sizeof b->info;
    b->info.expertCounters = b->expertCounters;
    b->info.expertOffsets = b->expertOffsets;
    b->info.sourceRankCounters = b->sourceRankCounters;
    b->info.expertSourceCounters = b->expertSourceCounters;
}

/* Every rank's collective-call arguments over its buffers `b` (set up here); `counters`: the
 * dispatch fills each rank's layout info. The experts are the identity: the received rows are
 * the expert outputs. */
typedef struct {
    epUpdateInputs_t update[R];
    epDispatchInputs_t din[R];
    epDispatchOutputs_t dout[R];
    epCombineInputs_t cin[R];
    epCombineOutputs_t cout[R];
} RankCalls;

static void setUpCalls(RankBuffers* b, RankCalls* c, int counters) {
    for (int r = 0; r < R; r++) {
        setUp(&b[r], r);
        c->update[r] = (epUpdateInputs_t){sizeof(epUpdateInputs_t), &b[r].tidx};
        c->din[r] = (epDispatchInputs_t){sizeof(epDispatchInputs_t), &b[r].tx, NULL, NULL};
        c->dout[r] = (epDispatchOutputs_t){sizeof(epDispatchOutputs_t), &b[r].trecv, NULL, NULL, counters ? &b[r].info : NULL, NULL, NULL, NULL};
        c->cin[r] = (epCombineInputs_t){sizeof(epCombineInputs_t), &b[r].trecv, &b[r].tw, NULL};
        c->cout[r] = (epCombineOutputs_t){sizeof(epCombineOutputs_t), &b[r].ty, NULL};
    }
}

/* What rank `rank` must hold after the step: every expert zone got both ranks' tokens. */
static void checkStep(const RankBuffers* b, int rank, const char* how) {
    /* Rank 0 holds expert 0 (local 0), rank 1 expert 3 (local 1): two rows, sources 0 then 1. */
    int local = rank == 0 ? 0 : 1;
    CHECK(b->info.receivedTotal == 2, "%s rank %d: receivedTotal %lld", how, rank, (long long)b->info.receivedTotal);
    CHECK(b->expertCounters[local] == 2 && b->expertCounters[1 - local] == 0, "%s rank %d: expertCounters %lld %lld",
          how, rank, (long long)b->expertCounters[0], (long long)b->expertCounters[1]);
    CHECK(b->sourceRankCounters[0] == 1 && b->sourceRankCounters[1] == 1, "%s rank %d: sourceRankCounters", how, rank);
    CHECK(b->expertOffsets[1] == R * BMAX, "%s rank %d: expertOffsets[1] %lld", how, rank, (long long)b->expertOffsets[1]);
    CHECK(b->received[local][0][0] == 1.0f && b->received[local][1][H - 1] == 2.0f, "%s rank %d: received rows", how, rank);
    /* Combine of the identity experts: 0.25 x + 0.5 x. */
    for (int i = 0; i < H; i++) {
        CHECK(b->y[0][i] == 0.75f * (float)(rank + 1), "%s rank %d: y[%d] = %g", how, rank, i, (double)b->y[0][i]);
    }
}

static void collectiveStep(void) {
    epGroupConfig_t config = smallConfig();
    epGroup_t group = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    if (!group) return;

    epGroupInfo_t info;
    memset(&info, 0, sizeof info);
    info.structSize = sizeof info;
    CHECK_OK(epGroupGetInfo(group, &info));
    CHECK(info.localExperts == L && info.receiveNdim == 3 && info.receiveShape[1] == R * BMAX && info.receiveRoutingNdim == 0,
          "group info: L %d, receive ndim %d", info.localExperts, info.receiveNdim);

    static RankBuffers b[R];
    static RankCalls calls;
    setUpCalls(b, &calls, 1);
    epCombineConfig_t combineConfig = {sizeof(epCombineConfig_t), epForward, epLaunchSingle, NULL, epPhaseWhole};
    CHECK_OK(epGroupUpdateAll(group, calls.update, NULL, NULL));
    CHECK_OK(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL));
    CHECK_OK(epGroupCombineAll(group, calls.cin, calls.cout, &combineConfig, NULL));
    CHECK_OK(epGroupCheckStatus(group));
    for (int r = 0; r < R; r++) checkStep(&b[r], r, "collective");

    epLayoutInfo_t again = {sizeof(epLayoutInfo_t), NULL, NULL, NULL, NULL, 0, 0};
    CHECK_OK(epGroupGetLayoutInfo(group, 1, &again));
    CHECK(again.receivedTotal == 2, "epGroupGetLayoutInfo: receivedTotal %lld", (long long)again.receivedTotal);

    /* Errors: an expert id out of range names the rank and the entry; nothing is written. */
    b[1].idx[0][1] = 300;
    CHECK_FAILS(epGroupUpdateAll(group, calls.update, NULL, NULL), epInvalidArgument, "rank 1: invalid argument: inputs[1].topkIdx[0][1] = 300");
    /* A failed update voids the step: dispatch fails, writing nothing, until an update succeeds. */
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidUsage,
                "the last update of this handle failed (rank 0 did nothing because rank 1 rejected its call: invalid argument: inputs[1].topkIdx[0][1] = 300;");
    b[1].idx[0][1] = 3;
    CHECK_OK(epGroupUpdateAll(group, calls.update, NULL, NULL));
    /* A tensor of the wrong dtype (named as epDataType_t names it), and one with strides that are not contiguous. */
    calls.din[0].tokens = &b[0].tidx;
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidArgument, "rank 0: invalid argument: inputs[0].tokens.dtype = epInt32; must be epFloat32");
    calls.din[0].tokens = &b[0].tx;
    epTensor_t strided = b[0].trecv;
    strided.strides[1] = 2 * H;
    calls.dout[0].tokens = &strided;
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidArgument, "outputs[0].tokens.strides");
    calls.dout[0].tokens = &b[0].trecv;
    /* A struct from another ABI version. */
    calls.dout[1].structSize = 8;
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidArgument, "outputs[1].structSize = 8");
    calls.dout[1].structSize = sizeof(epDispatchOutputs_t);
    /* An enum value out of range. */
    combineConfig.direction = (epPassDirection_t)7;
    CHECK_FAILS(epGroupCombineAll(group, calls.cin, calls.cout, &combineConfig, NULL), epInvalidArgument, "config.direction = 7");
    combineConfig.direction = epForward;
    /* Combine after an update with no dispatch is out of order. */
    CHECK_FAILS(epGroupCombineAll(group, calls.cin, calls.cout, &combineConfig, NULL), epInvalidUsage, "combine needs a dispatch");
    /* A topkIdx claiming more rows than maxTokensPerRank is refused by its row count, before any
       row is read or anything allocated for it. */
    epTensor_t tooMany = b[1].tidx;
    tooMany.sizes[0] = (int64_t)1 << 40;
    calls.update[1].topkIdx = &tooMany;
    CHECK_FAILS(epGroupUpdateAll(group, calls.update, NULL, NULL), epInvalidArgument,
                "rank 1: invalid argument: inputs[1].topkIdx.sizes[0] (tokens) = 1099511627776; must be in 0...maxTokensPerRank");
    calls.update[1].topkIdx = &b[1].tidx;
    CHECK_FAILS(epGroupGetLayoutInfo(group, 2, &again), epInvalidArgument, "rank = 2");

    CHECK_OK(epGroupDestroy(group));
    CHECK_FAILS(epGroupUpdateAll(group, calls.update, NULL, NULL), epInvalidArgument, "live epGroup_t");
    CHECK_FAILS(epGroupDestroy(group), epInvalidArgument, "group");
}

/* The stacked calls (v4): the ranks' buffers are the elements of one array, so each argument's
 * parts are sizeof(RankBuffers) apart; the same step as collectiveStep, the same results. */
static void stackedStep(void) {
    epGroupConfig_t config = smallConfig();
    epGroup_t group = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    if (!group) return;
    static RankBuffers b[R];
    for (int r = 0; r < R; r++) setUp(&b[r], r);
    const int64_t stride = (int64_t)sizeof(RankBuffers);
    epStackedDispatch_t d;
    memset(&d, 0, sizeof d);
    d.structSize = sizeof d;
    d.tokens = 1;
    d.topkIdx = (epStacked_t){b[0].idx, epInt32, -1, stride};
    d.inputTokens = (epStacked_t){b[0].x, epFloat32, -1, stride};
    d.receivedTokens = (epStacked_t){b[0].received, epFloat32, -1, stride};
    epStackedCombine_t c;
    memset(&c, 0, sizeof c);
    c.structSize = sizeof c;
    c.expertOutputs = (epStacked_t){b[0].received, epFloat32, -1, stride};
    c.topkWeights = (epStacked_t){b[0].w, epFloat32, -1, stride};
    c.combinedTokens = (epStacked_t){b[0].y, epFloat32, -1, stride};
    CHECK_OK(epGroupDispatchStacked(group, &d, NULL));
    CHECK_OK(epGroupCombineStacked(group, &c, NULL));
    for (int r = 0; r < R; r++) {
        CHECK_OK(epGroupGetLayoutInfo(group, r, &b[r].info));
        checkStep(&b[r], r, "stacked");
    }
    /* Errors name the argument and the bound, and run nothing. */
    d.inputTokens.rankStride = 4;
    CHECK_FAILS(epGroupDispatchStacked(group, &d, NULL), epInvalidArgument, "call.inputTokens.rankStride = 4");
    d.inputTokens.rankStride = stride;
    d.tokens = BMAX + 1;
    CHECK_FAILS(epGroupDispatchStacked(group, &d, NULL), epInvalidArgument, "call.tokens = 3");
    d.tokens = 1;
    d.receivedTokens.data = NULL;
    CHECK_FAILS(epGroupDispatchStacked(group, &d, NULL), epInvalidArgument, "call.receivedTokens.data = NULL");
    d.receivedTokens.data = b[0].received;
    /* A dispatch with the step's routing (topkIdx NULL) gives the step's count (1 token here). */
    d.topkIdx.data = NULL;
    d.tokens = 2;
    CHECK_FAILS(epGroupDispatchStacked(group, &d, NULL), epInvalidArgument, "call.tokens = 2; must be the step's (1)");
    CHECK_OK(epGroupDestroy(group));
}

typedef struct {
    epHandle_t handle;
    RankBuffers* buffers;
    epResult_t results[3];
} RankThread;

static void* runRank(void* argument) {
    RankThread* t = argument;
    RankBuffers* b = t->buffers;
    epUpdateInputs_t update = {sizeof update, &b->tidx};
    epDispatchInputs_t din = {sizeof din, &b->tx, NULL, NULL};
    epDispatchOutputs_t dout = {sizeof dout, &b->trecv, NULL, NULL, &b->info, NULL, NULL, NULL};
    epCombineInputs_t cin = {sizeof cin, &b->trecv, &b->tw, NULL};
    epCombineOutputs_t cout = {sizeof cout, &b->ty, NULL};
    t->results[0] = epHandleUpdate(t->handle, &update, NULL, NULL);
    t->results[1] = epDispatch(t->handle, &din, &dout, NULL, NULL);
    t->results[2] = epCombine(t->handle, &cin, &cout, NULL, NULL);
    return NULL;
}

static void perRankStep(void) {
    epGroupConfig_t config = smallConfig();
    epGroup_t group = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    if (!group) return;
    static RankBuffers b[R];
    RankThread threads[R];
    pthread_t ids[R];
    for (int r = 0; r < R; r++) {
        setUp(&b[r], r);
        threads[r] = (RankThread){NULL, &b[r], {epSuccess, epSuccess, epSuccess}};
        CHECK_OK(epHandleCreate(group, r, &threads[r].handle));
    }
    /* The group may go before its handles: they keep it alive. */
    CHECK_OK(epGroupDestroy(group));
    for (int r = 0; r < R; r++) CHECK(pthread_create(&ids[r], NULL, runRank, &threads[r]) == 0, "pthread_create");
    for (int r = 0; r < R; r++) {
        pthread_join(ids[r], NULL);
        for (int i = 0; i < 3; i++) CHECK(threads[r].results[i] == epSuccess, "rank %d call %d: %s", r, i, epGetErrorString(threads[r].results[i]));
        checkStep(&b[r], r, "per-rank");
        /* Nothing was sent-only: completing is a call out of order, as epGroupComplete says. */
        CHECK_FAILS(epComplete(threads[r].handle, NULL), epInvalidUsage, "phase epPhaseSendOnly");
        CHECK_OK(epHandleDestroy(threads[r].handle));
    }
}

static void configErrors(void) {
    epGroup_t group = NULL;
    epGroupConfig_t config = smallConfig();
    config.experts = 5;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "experts = 5; must be a multiple of ranks (2)");
    config = smallConfig();
    config.structSize = sizeof config - 4;   /* the size of no ABI version */
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "config.structSize");
    /* FP8 (v3): hidden must be a multiple of the scale block; pass-through needs a scale mode. */
    config = smallConfig();
    config.fp8Scales = epFP8Float32Block128;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "hidden = 8; must be a multiple of 128");
    config = smallConfig();
    config.fp8Source = epFP8PassThrough;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "fp8Source");
    config = smallConfig();
    config.layout = epLayoutFlat;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "layout = epLayoutFlat; is not a layout of algorithm epAlgorithmLowLatency");
    config = smallConfig();
    config.maxReceivedTokensPerRank = -1;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "maxReceivedTokensPerRank = -1; must be 0 for LL");
    config = smallConfig();
    config.algorithm = epAlgorithmHighThroughput;
    config.layout = epLayoutExpertMajorPadded;
    config.alignment = 2000;
    CHECK_FAILS(epGroupCreate(&config, NULL, &group), epInvalidArgument, "alignment = 2000; must be in 1...1024");
    CHECK_FAILS(epGroupCreate(NULL, NULL, &group), epInvalidArgument, "config = NULL");
    CHECK(group == NULL, "no group after failures");
    CHECK_FAILS(epGroupUpdateAll(NULL, NULL, NULL, NULL), epInvalidArgument, "group = NULL");

    /* Dispatch before any update is a call out of order. */
    config = smallConfig();
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    static RankBuffers b[R];
    epDispatchInputs_t din[R];
    epDispatchOutputs_t dout[R];
    for (int r = 0; r < R; r++) {
        setUp(&b[r], r);
        din[r] = (epDispatchInputs_t){sizeof(epDispatchInputs_t), &b[r].tx, NULL, NULL};
        dout[r] = (epDispatchOutputs_t){sizeof(epDispatchOutputs_t), &b[r].trecv, NULL, NULL, NULL, NULL, NULL, NULL};
    }
    CHECK_FAILS(epGroupDispatchAll(group, din, dout, NULL, NULL), epInvalidUsage, "update");
    CHECK_OK(epGroupDestroy(group));

    /* A GPU group on a machine without CUDA fails cleanly (and works where there is one). */
    epBackendConfig_t gpu = {sizeof gpu, epBackendVirtualGPU, 0, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
    /* A tuning knob out of bounds is named before any device is opened. */
    struct {
        int32_t* field;
        int32_t bad;
        const char* message;
    } knobs[] = {
        {&gpu.tuning.pipelineDepth, 9, "tuning.pipelineDepth = 9"},
        {&gpu.tuning.fusedUpdate, 3, "tuning.fusedUpdate = 3"},
        {&gpu.tuning.updateChunkTokens, -1, "tuning.updateChunkTokens = -1"},
        {&gpu.tuning.launchGrid, 3, "tuning.launchGrid = 3"},
        {&gpu.tuning.launches, 3, "tuning.launches = 3"},
    };
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
        *knobs[i].field = knobs[i].bad;
        CHECK_FAILS(epGroupCreate(&config, &gpu, &group), epInvalidArgument, knobs[i].message);
        *knobs[i].field = 0;
    }
    /* A version 4 config (6 tuning fields, no launchGrid) is accepted. */
    epBackendConfig_t v4 = gpu;
    v4.structSize = (offsetof(epBackendConfig_t, tuning.launchGrid) + _Alignof(epBackendConfig_t) - 1) /
                    _Alignof(epBackendConfig_t) * _Alignof(epBackendConfig_t);
    CHECK(v4.structSize < sizeof v4, "the v4 size %zu is below this version's %zu", v4.structSize, sizeof v4);
    epResult_t fourth = epGroupCreate(&config, &v4, &group);
    CHECK(fourth == epSuccess || fourth == epCudaError, "GPU group (v4 config): %s (%s)", epGetErrorString(fourth), epGetLastErrorMessage());
    if (fourth == epSuccess) epGroupDestroy(group);
    /* A config from before updateChunkTokens and fusedUpdate (4 tuning fields) is accepted; a size
     * between versions is not. */
    epBackendConfig_t before = gpu;
    before.structSize = (offsetof(epBackendConfig_t, tuning.updateChunkTokens) + _Alignof(epBackendConfig_t) - 1) /
                        _Alignof(epBackendConfig_t) * _Alignof(epBackendConfig_t);
    epResult_t early = epGroupCreate(&config, &before, &group);
    CHECK(early == epSuccess || early == epCudaError, "GPU group (4 tuning fields): %s (%s)", epGetErrorString(early), epGetLastErrorMessage());
    if (early == epSuccess) epGroupDestroy(group);
    before.structSize = sizeof before - 4;
    CHECK_FAILS(epGroupCreate(&config, &before, &group), epInvalidArgument, "structSize");
    /* A version 2 backend config (no tuning) is accepted. */
    epBackendConfig_t old = gpu;
    old.structSize = offsetof(epBackendConfig_t, tuning);
    epResult_t r = epGroupCreate(&config, &old, &group);
    CHECK(r == epSuccess || r == epCudaError, "GPU group (v2 config): %s (%s)", epGetErrorString(r), epGetLastErrorMessage());
    if (r == epSuccess) epGroupDestroy(group);
    r = epGroupCreate(&config, &gpu, &group);
    CHECK(r == epSuccess || r == epCudaError, "GPU group: %s (%s)", epGetErrorString(r), epGetLastErrorMessage());
    if (r == epSuccess) {
        epHandle_t handle = NULL;
        CHECK_FAILS(epHandleCreate(group, 0, &handle), epInvalidUsage, "epGroupUpdateAll");
        epGroupDestroy(group);
    }

    int32_t version = 0;
    CHECK_OK(epGetAbiVersion(&version));
    CHECK(version == EP_ABI_VERSION, "ABI version %d", version);
    CHECK(strncmp(epGetErrorString(epTimeout), "epTimeout", 9) == 0, "epGetErrorString(epTimeout)");
    CHECK(strncmp(epGetErrorString((epResult_t)99), "unknown", 7) == 0, "epGetErrorString(99)");
    CHECK(strcmp(epGetLastErrorMessage(), "") == 0, "a successful call clears the message");
}

/* NCCL-rank groups (ABI version 2). A group of one rank needs no other process, so where NCCL and
 * a GPU are present it is made for real; elsewhere creating it fails naming what is missing. */
static void ncclGroup(void) {
    setenv("NCCL_NVLS_ENABLE", "0", 0); /* never NVLink multicast (a caller's setting wins) */
    epGroupConfig_t config = smallConfig();
    config.ranks = 1;
    epNCCLRankConfig_t rank;
    memset(&rank, 0, sizeof rank);
    rank.structSize = sizeof rank;
    epGroup_t group = NULL;

    CHECK_FAILS(epGroupCreateNCCL(&config, NULL, &group), epInvalidArgument, "ncclRank = NULL");
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, NULL), epInvalidArgument, "group = NULL");
    rank.rank = 1;
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, &group), epInvalidArgument, "ncclRank.rank = 1; must be in 0..<1 (config.ranks)");
    rank.rank = 0;
    rank.device = -1;
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, &group), epInvalidArgument, "ncclRank.device = -1");
    rank.device = 0;
    rank.initTimeoutSeconds = -2.0;
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, &group), epInvalidArgument, "ncclRank.initTimeoutSeconds = -2.0");
    rank.initTimeoutSeconds = 0;
    rank.structSize = 8;
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, &group), epInvalidArgument, "ncclRank.structSize = 8");
    rank.structSize = sizeof rank;
    config.experts = 3;
    config.ranks = 2;
    CHECK_FAILS(epGroupCreateNCCL(&config, &rank, &group), epInvalidArgument, "experts = 3");
    config = smallConfig();
    config.ranks = 1;
    epBackendConfig_t backend = {sizeof backend, epBackendNCCLRank, 0, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
    CHECK_FAILS(epGroupCreate(&config, &backend, &group), epInvalidUsage, "epGroupCreateNCCL");
    CHECK_FAILS(epGetNCCLUniqueId(NULL), epInvalidArgument, "id = NULL");
    CHECK(group == NULL, "no group after failures");

    epResult_t r = epGetNCCLUniqueId(&rank.uniqueId);
    CHECK(r == epSuccess || (r == epNcclError && strstr(epGetLastErrorMessage(), "libnccl.so.2 is not available") != NULL),
          "epGetNCCLUniqueId: %s (%s)", epGetErrorString(r), epGetLastErrorMessage());
    r = epGroupCreateNCCL(&config, &rank, &group);
    if (r != epSuccess) {
        const char* m = epGetLastErrorMessage();
        CHECK((r == epNcclError && strstr(m, "libnccl.so.2 is not available") != NULL) ||
                  (r == epCudaError && strstr(m, "libcuda") != NULL),
              "NCCL group without NCCL or CUDA: %s (%s)", epGetErrorString(r), m);
        return;
    }
    epGroupInfo_t info;
    memset(&info, 0, sizeof info);
    info.structSize = sizeof info;
    CHECK_OK(epGroupGetInfo(group, &info));
    CHECK(info.backend == epBackendNCCLRank && info.ranks == 1, "NCCL group info: backend %d, ranks %d", (int)info.backend, info.ranks);
    static RankBuffers b;
    setUp(&b, 0);
    epUpdateInputs_t update = {sizeof update, &b.tidx};
    CHECK_FAILS(epGroupUpdateAll(group, &update, NULL, NULL), epInvalidUsage, "epHandleCreate(group, 0, ...)");
    CHECK_FAILS(epGroupCleanRanks(group, 1), epInvalidUsage, "epGroupCleanRanks");
    epHandle_t handle = NULL;
    CHECK_OK(epHandleCreate(group, 0, &handle));
    /* Host tensors on a GPU group are refused, naming the argument and the places as its device field gives them. */
    CHECK_FAILS(epHandleUpdate(handle, &update, NULL, NULL), epInvalidArgument, "inputs.topkIdx.device = -1 (host); must be 0");
    /* The stacked calls take this rank's one part (v7); received rows go to a slot's own buffers. */
    epStackedDispatch_t d;
    memset(&d, 0, sizeof d);
    d.structSize = sizeof d;
    d.tokens = 1;
    d.topkIdx = (epStacked_t){b.idx, epInt32, -1, 0};
    d.inputTokens = (epStacked_t){b.x, epFloat32, -1, 0};
    d.receivedTokens = (epStacked_t){b.received, epFloat32, -1, 0};
    CHECK_FAILS(epGroupDispatchStacked(group, &d, NULL), epInvalidArgument, "call.topkIdx.device");
    CHECK_OK(epHandleDestroy(handle));
    CHECK_OK(epGroupDestroy(group));
}

static void printSizes(void) {
#define SIZE(type) printf("%s %zu\n", #type, sizeof(type))
    SIZE(epTensor_t);
    SIZE(epGroupConfig_t);
    SIZE(epBackendConfig_t);
    SIZE(epGroupInfo_t);
    SIZE(epLayoutInfo_t);
    SIZE(epUpdateInputs_t);
    SIZE(epUpdateConfig_t);
    SIZE(epDispatchInputs_t);
    SIZE(epDispatchOutputs_t);
    SIZE(epDispatchConfig_t);
    SIZE(epCombineInputs_t);
    SIZE(epCombineOutputs_t);
    SIZE(epCombineConfig_t);
    SIZE(epNCCLUniqueId_t);
    SIZE(epNCCLRankConfig_t);
    SIZE(epGPUTuning_t);
    SIZE(epStacked_t);
    SIZE(epStackedDispatch_t);
    SIZE(epStackedCombine_t);
#undef SIZE
}

/* ABI v3: steps of the group's own, several live at once; per-expert counts written by the
 * dispatch; a version 2 struct still accepted; the zero-copy buffers only NCCL ranks own. */
static void steps(void) {
    epGroupConfig_t config = smallConfig();
    epGroup_t group = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    if (!group) return;
    static RankBuffers b[R];
    static int32_t counts[R][L], sourceCounts[R][L][R];
    epUpdateInputs_t update[R];
    epDispatchInputs_t din[R];
    epDispatchOutputs_t dout[R];
    epCombineInputs_t cin[R];
    epCombineOutputs_t cout[R];
    epTensor_t tcounts[R], tsources[R];
    for (int r = 0; r < R; r++) {
        setUp(&b[r], r);
        int64_t cs[1] = {L}, ss[2] = {L, R};
        tcounts[r] = epMakeTensor(counts[r], epInt32, 1, cs, -1);
        tsources[r] = epMakeTensor(sourceCounts[r], epInt32, 2, ss, -1);
        update[r] = (epUpdateInputs_t){sizeof(epUpdateInputs_t), &b[r].tidx};
        din[r] = (epDispatchInputs_t){sizeof(epDispatchInputs_t), &b[r].tx, NULL, NULL};
        dout[r] = (epDispatchOutputs_t){sizeof(epDispatchOutputs_t), &b[r].trecv, NULL, NULL, &b[r].info, &tcounts[r], &tsources[r], NULL};
        cin[r] = (epCombineInputs_t){sizeof(epCombineInputs_t), &b[r].trecv, &b[r].tw, NULL};
        cout[r] = (epCombineOutputs_t){sizeof(epCombineOutputs_t), &b[r].ty, NULL};
    }
    epStep_t a = NULL, other = NULL;
    CHECK_OK(epStepCreate(group, &a));
    CHECK_OK(epStepCreate(group, &other));
    epUpdateConfig_t ua = {sizeof ua, epLaunchSingle, a}, uo = {sizeof uo, epLaunchSingle, other};
    epDispatchConfig_t da = {sizeof da, epForward, epLaunchSingle, a, epPhaseWhole};
    epCombineConfig_t ca = {sizeof ca, epForward, epLaunchSingle, a, epPhaseSendOnly};
    CHECK_OK(epGroupUpdateAll(group, update, &ua, NULL));
    /* Another step's update between A's update and A's dispatch leaves A's routing alone. */
    b[0].idx[0][0] = -1;
    CHECK_OK(epGroupUpdateAll(group, update, &uo, NULL));
    b[0].idx[0][0] = 0;
    CHECK_OK(epGroupDispatchAll(group, din, dout, &da, NULL));
    CHECK_OK(epGroupCombineAll(group, cin, cout, &ca, NULL));
    CHECK_OK(epGroupComplete(group, NULL));   /* the host ran it whole: nothing pending */
    for (int r = 0; r < R; r++) {
        checkStep(&b[r], r, "step A");
        for (int e = 0; e < L; e++) {
            CHECK(counts[r][e] == (int32_t)b[r].expertCounters[e], "rank %d: expertCounts[%d] = %d, layout says %lld", r, e,
                  counts[r][e], (long long)b[r].expertCounters[e]);
            int32_t sum = 0;
            for (int s = 0; s < R; s++) sum += sourceCounts[r][e][s];
            CHECK(sum == counts[r][e], "rank %d: expertSourceCounts of expert %d sum to %d, not %d", r, e, sum, counts[r][e]);
        }
    }
    epLayoutInfo_t info = {sizeof(epLayoutInfo_t), NULL, NULL, NULL, NULL, 0, 0};
    CHECK_OK(epStepGetLayoutInfo(a, 1, &info));
    CHECK(info.receivedTotal == 2, "epStepGetLayoutInfo: receivedTotal %lld", (long long)info.receivedTotal);
    /* A version 2 config (no step, no phase) is the group's own step. */
    epDispatchConfig_t old = {offsetof(epDispatchConfig_t, step), epForward, epLaunchSingle, NULL, epPhaseWhole};
    CHECK_FAILS(epGroupDispatchAll(group, din, dout, &old, NULL), epInvalidUsage, "");
    CHECK_OK(epGroupUpdateAll(group, update, NULL, NULL));
    CHECK_OK(epGroupDispatchAll(group, din, dout, &old, NULL));
    /* Counts of the wrong shape are refused before anything moves. */
    int64_t wrong[1] = {L + 1};
    epTensor_t bad = epMakeTensor(counts[0], epInt32, 1, wrong, -1);
    dout[0].expertCounts = &bad;
    CHECK_FAILS(epGroupDispatchAll(group, din, dout, &da, NULL), epInvalidArgument, "expertCounts");
    dout[0].expertCounts = &tcounts[0];
    /* Only NCCL ranks own buffers. */
    epTensor_t buffer;
    buffer.structSize = sizeof buffer;
    CHECK_FAILS(epGroupGetBuffer(group, 0, epBufferReceivedTokens, &buffer), epInvalidUsage, "only NCCL-rank groups");
    CHECK_FAILS(epGroupCopyReceived(group, NULL, &bad, NULL), epInvalidUsage, "only NCCL-rank groups receive into buffer slots");
    CHECK_FAILS(epGroupCopyReceived(NULL, NULL, &bad, NULL), epInvalidArgument, "group");
    CHECK_FAILS(epGroupCopyReceived(group, NULL, NULL, NULL), epInvalidArgument, "tokens");
    /* A step of another group is refused by name, before anything moves. */
    epGroup_t otherGroup = NULL;
    epStep_t foreign = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &otherGroup));
    CHECK_OK(epStepCreate(otherGroup, &foreign));
    epDispatchConfig_t df = {sizeof df, epForward, epLaunchSingle, foreign, epPhaseWhole};
    CHECK_FAILS(epGroupDispatchAll(group, din, dout, &df, NULL), epInvalidArgument, "must be a step made from this group");
    CHECK_FAILS(epGroupCopyReceived(group, foreign, &bad, NULL), epInvalidArgument, "must be a step made from this group");
    CHECK_OK(epStepDestroy(foreign));
    CHECK_OK(epGroupDestroy(otherGroup));
    /* A destroyed step is refused by name. */
    CHECK_OK(epStepDestroy(a));
    CHECK_FAILS(epGroupDispatchAll(group, din, dout, &da, NULL), epInvalidArgument, "config.step");
    CHECK_OK(epStepDestroy(other));
    CHECK_OK(epStepDestroy(NULL));
    CHECK_OK(epGroupDestroy(group));
}

/* An output that shares memory with an input or another output is refused by name (both in the
 * header's words) before anything moves: the inputs are left as they were. */
static void overlappingOutputs(void) {
    epGroupConfig_t config = smallConfig();
    epGroup_t group = NULL;
    CHECK_OK(epGroupCreate(&config, NULL, &group));
    if (!group) return;
    static RankBuffers b[R];
    static RankCalls calls;
    setUpCalls(b, &calls, 0);
    CHECK_OK(epGroupUpdateAll(group, calls.update, NULL, NULL));
    /* Rank 1 reads its rows from the receive buffer it dispatches into. */
    static float aliased[L][R * BMAX][H];
    const int64_t xs[2] = {1, H}, rs[3] = {L, R * BMAX, H};
    for (int i = 0; i < H; i++) aliased[L - 1][R * BMAX - 1][i] = 2.0f;
    epTensor_t rows = epMakeTensor(aliased[L - 1][R * BMAX - 1], epFloat32, 2, xs, -1);
    epTensor_t received = epMakeTensor(aliased, epFloat32, 3, rs, -1);
    calls.din[1].tokens = &rows;
    calls.dout[1].tokens = &received;
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidArgument, "rank 1: invalid argument: outputs[1].tokens.data = ");
    CHECK(strstr(epGetLastErrorMessage(), "must not overlap inputs[1].tokens (") != NULL, "%s", epGetLastErrorMessage());
    CHECK(aliased[0][0][0] == 0.0f && aliased[L - 1][R * BMAX - 1][0] == 2.0f, "the refused dispatch wrote into its input");
    /* Rank 0 dispatches into the buffer rank 1 reads its rows from: the ranks run at once. */
    calls.dout[1].tokens = &b[1].trecv;
    calls.dout[0].tokens = &received;
    CHECK_FAILS(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL), epInvalidArgument, "epGroupDispatchAll: invalid argument: outputs[0].tokens.data = ");
    CHECK(strstr(epGetLastErrorMessage(), "must not overlap inputs[1].tokens (") != NULL, "%s", epGetLastErrorMessage());
    CHECK(aliased[0][0][0] == 0.0f && aliased[L - 1][R * BMAX - 1][0] == 2.0f, "the refused dispatch wrote into rank 1's input");
    calls.din[1].tokens = &b[1].tx;
    calls.dout[0].tokens = &b[0].trecv;
    CHECK_OK(epGroupDispatchAll(group, calls.din, calls.dout, NULL, NULL));
    /* Rank 0's combined row starts where its weights are. */
    static float row[H] = {0.25f, 0.5f};
    const int64_t ws[2] = {1, K};
    epTensor_t weights = epMakeTensor(row, epFloat32, 2, ws, -1), overWeights = epMakeTensor(row, epFloat32, 2, xs, -1);
    calls.cin[0].topkWeights = &weights;
    calls.cout[0].tokens = &overWeights;
    CHECK_FAILS(epGroupCombineAll(group, calls.cin, calls.cout, NULL, NULL), epInvalidArgument, "rank 0: invalid argument: outputs[0].tokens.data = ");
    CHECK(strstr(epGetLastErrorMessage(), "(32 bytes); must not overlap inputs[0].topkWeights (") != NULL, "%s", epGetLastErrorMessage());
    CHECK(row[0] == 0.25f && row[1] == 0.5f && row[2] == 0.0f, "the refused combine wrote over its weights");
    /* Rank 1's combined rows over rank 0's weights. */
    static float rowOfTwo[H];
    epTensor_t overOthers = epMakeTensor(row, epFloat32, 2, xs, -1), own = epMakeTensor(rowOfTwo, epFloat32, 2, xs, -1);
    calls.cout[0].tokens = &own;
    calls.cout[1].tokens = &overOthers;
    CHECK_FAILS(epGroupCombineAll(group, calls.cin, calls.cout, NULL, NULL), epInvalidArgument, "epGroupCombineAll: invalid argument: outputs[1].tokens.data = ");
    CHECK(strstr(epGetLastErrorMessage(), "must not overlap inputs[0].topkWeights (") != NULL, "%s", epGetLastErrorMessage());
    CHECK(row[0] == 0.25f && row[1] == 0.5f && row[2] == 0.0f && rowOfTwo[0] == 0.0f, "the refused combine wrote");
    calls.cout[0].tokens = &b[0].ty;
    calls.cout[1].tokens = &b[1].ty;
    CHECK_OK(epGroupCombineAll(group, calls.cin, calls.cout, NULL, NULL));
    for (int r = 0; r < R; r++) CHECK(b[r].y[0][0] == 0.75f * (float)(r + 1), "rank %d: y[0] = %g", r, (double)b[r].y[0][0]);
    CHECK_OK(epGroupDestroy(group));
}

int main(int argc, char** argv) {
    if (argc > 1 && strcmp(argv[1], "sizes") == 0) {
        printSizes();
        return 0;
    }
    collectiveStep();
    stackedStep();
    perRankStep();
    steps();
    overlappingOutputs();
    configErrors();
    ncclGroup();
    printf("abi_smoke: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
