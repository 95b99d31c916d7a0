/*
 * expert_parallel.h: the C ABI of ExpertParallel (libexpert_parallel.so).
 *
 * Moves Mixture-of-Experts tokens between ranks: dispatch sends every token to the ranks that
 * hold its top-k experts, combine brings the expert outputs back and reduces them into the
 * original token order. Three backends sit behind one set of calls:
 *   - the host (CPU) group: R ranks in one process, one thread per rank; the bit-exact oracle;
 *   - the virtual GPU group: R ranks on one CUDA device, every call one launch for all R ranks
 *     (both algorithms, both overflow policies);
 *   - the NCCL-rank group (ABI version 2): one rank of a multi-process job, one GPU per process,
 *     joined by an NCCL communicator (epGroupCreateNCCL); each process drives its own rank.
 *
 * Conventions
 *   - Every call returns an epResult_t. On failure, epGetLastErrorMessage() says what was wrong,
 *     naming the field, the value and the bound; it is thread-local and holds the message of this
 *     thread's last call (empty after a call that succeeded, but for a destroy call's success:
 *     epGroupDestroy, epHandleDestroy and epStepDestroy leave it as it was, since a garbage
 *     collector's finalizer may run them between another call's failure and its read). Fields are named as the call's
 *     parameters and structs name them (`inputs.tokens.sizes`, `call.receivedTokens.data`), with
 *     "rank r: " before a collective call's rank's failure, whose arguments are entry r of the
 *     call's arrays (`inputs[1].topkIdx[0][1]`, also in epGroupCheckStatus's routing errors),
 *     and values as this header names them ("inputs.tokens.dtype = epFloat32; must be
 *     epBFloat16", "inputs.topkIdx.device = -1 (host); must be 0").
 *   - An optional argument that the call does not take (each field's comment says where it
 *     applies: the group's layout, algorithm and FP8 mode, the call's direction) must be NULL (a
 *     stacked call's: data NULL): given, the call fails with epInvalidArgument naming it
 *     ("outputs.topkIdx = given; must be NULL: layout epLayoutExpertMajor (LL) receives no routing"),
 *     on every backend, rather than ignoring it.
 *   - Every struct starts with `size_t structSize`: set it to sizeof(the struct). ABI version 1
 *     requires exactly sizeof; later versions add fields at the end and keep accepting the sizes of
 *     earlier versions (version 2 added structs and calls and changed none of version 1's; version
 *     3 added fields to epGroupConfig_t, epGroupInfo_t, epBackendConfig_t, epNCCLRankConfig_t,
 *     epUpdateConfig_t, epDispatchInputs_t, epDispatchOutputs_t, epDispatchConfig_t and
 *     epCombineConfig_t: a struct of version 2's size reads as if the new fields were zero /
 *     NULL, and an epGroupInfo_t of version 2's size gets version 2's fields only). A pointer to a
 *     config struct may be NULL (defaults).
 *   - Arrays of structs (one per rank, in the *All calls) are read with a stride of their first
 *     element's structSize; every element must carry the same structSize.
 *   - Tensors are borrowed: the caller owns every buffer; the library writes only into outputs.
 *     Shapes are in elements, strides in elements; tensors must be contiguous (row-major) for now.
 *   - An output may share no byte with an input or another output of the same call (in a
 *     collective or stacked call: of any rank), nor, on a GPU group, with the routing of the
 *     step it belongs to (read again until the step's combine); such a call fails with
 *     epInvalidArgument naming both ("outputs[0].tokens.data = ...; must not overlap
 *     inputs[1].tokens (...)") before anything is written. Inputs may share memory.
 *   - Each call takes an inputs struct, an outputs struct, a config struct and a stream. The
 *     stream is a CUstream (or cudaStream_t) for the GPU group, NULL meaning CUDA's default
 *     stream; the host group ignores it and runs each call to completion before returning.
 *   - The GPU group's data-path calls (update, dispatch, combine) enqueue work and return
 *     without synchronising; errors found on the device (invalid routing, a timeout) are reported
 *     by epGroupCheckStatus (or by a dispatch that asks for its layout info).
 *   - Calls on one group are serialised by the library, except a host group's per-rank handle
 *     calls, which wait for the other ranks' matching calls and so run on a thread per rank: a
 *     rank makes one call at a time (a second one while its first is under way fails with
 *     epInvalidUsage and takes no place), and every other per-rank call takes its place in the
 *     ranks' sequence, refused or not, so the other ranks must make the matching call; a collective call after per-rank
 *     calls made on some ranks only fails at once (epInvalidUsage) until epGroupCleanRanks.
 *     A group is not freed while a handle made from it is alive.
 */
#ifndef EXPERT_PARALLEL_H
#define EXPERT_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI this header describes; epGetAbiVersion reports the library's. */
#define EP_ABI_VERSION 8
/* Most dimensions an epTensor_t carries. */
#define EP_MAX_DIMS 4

/* ---------------------------------------------------------------------------------------- */
/* Status                                                                                   */

typedef enum {
    epSuccess = 0,
    /* A pointer, struct size, enum value, configuration field, tensor (dtype, shape, strides,
     * device) or routing entry (out of range, an expert repeated in a token's row) is invalid. */
    epInvalidArgument = 1,
    /* A call out of order (dispatch before update), or one this group does not offer. */
    epInvalidUsage = 2,
    /* More rows would reach a rank than its receive buffer holds (HT, overflow policy fail);
     * no output was touched. The GPU group reports it from epGroupCheckStatus. */
    epOverflow = 3,
    /* A rank waited longer than the group's timeout for another; the late ranks are now masked
     * inactive (see epGroupGetActiveRanks / epGroupCleanRanks). */
    epTimeout = 4,
    /* Another rank of the same step rejected its call, so this one did nothing either. */
    epPeerFailed = 5,
    /* The calling rank is masked inactive; clean it first. */
    epInactiveRank = 6,
    /* A CUDA driver or NVRTC call failed (or no driver or device was found). */
    epCudaError = 7,
    /* An NCCL call failed, or NCCL (libnccl.so.2) could not be loaded. */
    epNcclError = 8,
    /* A failure inside the library that no argument explains. */
    epInternalError = 9
} epResult_t;

/* A static, human-readable name and summary of `result` ("epTimeout: ..."). Never NULL. */
const char* epGetErrorString(epResult_t result);
/* This thread's last call's error message; "" after a call that succeeded (a successful destroy
 * call leaves it as it was). Valid until this thread's next call into the library. Never NULL. */
const char* epGetLastErrorMessage(void);
/* The library's ABI version (EP_ABI_VERSION of the header it was built with). */
epResult_t epGetAbiVersion(int32_t* version);

/* ---------------------------------------------------------------------------------------- */
/* Enumerations                                                                             */

typedef enum {
    epBFloat16 = 0, /* token payloads */
    epFloat16 = 1,  /* token payloads */
    epFloat32 = 2,  /* token payloads, routing weights */
    epInt32 = 3,    /* routing indices */
    epInt64 = 4,    /* routing indices */
    epUInt8 = 5,    /* raw-byte token payloads (dispatch only) */
    epFloat8E4M3 = 6 /* OCP FP8 e4m3 (torch float8_e4m3fn): the rows of an FP8 dispatch (v3) */
} epDataType_t;

typedef enum {
    epAlgorithmLowLatency = 0,    /* LL: decode, B up to a few hundred tokens per rank */
    epAlgorithmHighThroughput = 1 /* HT: training and prefill */
} epAlgorithm_t;

typedef enum {
    epLayoutDefault = 0,          /* LL: expert-major; HT: flat */
    epLayoutExpertMajor = 1,      /* LL: tokens [L, R*Bmax, H], packed per local expert */
    epLayoutRankMajor = 2,        /* LL: tokens [R, Bmax, H] + topkIdx/topkWeights [R, Bmax, K]; source
                                   * s's rows packed in [s] in its token order (row i: the i-th of its
                                   * tokens sent here, not token i) */
    epLayoutFlat = 3,             /* HT: tokens [N, H] + topkIdx/topkWeights [N, K] */
    epLayoutExpertMajorPadded = 4 /* HT: tokens [N, H] + topkIdx/topkWeights [N], zones padded */
} epLayout_t;

typedef enum {
    epOverflowFail = 0, /* the update fails with epOverflow and touches nothing */
    epOverflowDrop = 1  /* HT: rows that do not fit are dropped (kept in (rank, token) order) and
                         * counted; every backend */
} epOverflowPolicy_t;

typedef enum { epForward = 0, epBackward = 1 } epPassDirection_t;

typedef enum {
    epBackendHost = 0,       /* R ranks on the CPU, one thread per rank */
    epBackendVirtualGPU = 1, /* R ranks on one CUDA device */
    epBackendNCCLRank = 2    /* one rank per process over NCCL: made by epGroupCreateNCCL only (v2) */
} epBackend_t;

typedef enum {
    epLaunchSingle = 0, /* GPU: one launch covering every rank (the fast path) */
    epLaunchPerRank = 1 /* GPU: one launch per rank on its own stream, joined by events */
} epLaunchMode_t;

/* How much of a dispatch or combine a call enqueues (v3). */
typedef enum {
    epPhaseWhole = 0,    /* the whole call */
    epPhaseSendOnly = 1  /* GPU: only the sending half, then return; the caller overlaps other work and
                          * enqueues the receiving half with epGroupComplete / epComplete before the
                          * next data-path call of the group. Host group: runs the whole call. Every
                          * backend refuses a data-path call (update, dispatch, combine, stacked) while
                          * one is pending, with epInvalidUsage ("call epGroupComplete for the pending
                          * send-only dispatch first"; a handle's calls say epComplete): the collective
                          * calls until epGroupComplete, a handle's calls until its epComplete (a host rank's refused call still takes its
                          * place among the ranks, and a refused update voids its handle's step).
                          * Host group: the collective pending call and a handle's are apart (a
                          * handle's calls are not refused by a pending collective call, nor the
                          * reverse).
                          * epGroupCleanRanks and epGroupDeactivateRank are refused while a
                          * collective one is pending. */
} epCallPhase_t;

/* FP8 dispatch (v3, docs/fp8.md): the scale of each block of a row. */
typedef enum {
    epFP8None = 0,          /* no FP8: rows move in the element type */
    epFP8Float32Block128 = 1, /* float32 scale per 128 elements (DeepSeek) */
    epFP8UE8M0Block128 = 2, /* power-of-two scale per 128 elements, exponent bytes packed 4 per int32 */
    epFP8E8M0Block32 = 3    /* power-of-two scale per 32 elements (MXFP8), packed 4 per int32 */
} epFP8Scales_t;

/* Where an FP8 dispatch's e4m3 rows come from (v3). */
typedef enum {
    epFP8Quantize = 0,   /* the dispatch quantises the caller's elementType rows */
    epFP8PassThrough = 1 /* the caller gives e4m3 rows and their scales (epDispatchInputs_t.scales) */
} epFP8Source_t;

/* The group-owned buffers of an NCCL-rank group (epGroupGetBuffer, v3). */
typedef enum {
    epBufferReceivedTokens = 0,      /* dispatch output: receiveShape, the element type */
    epBufferReceivedTopkIdx = 1,     /* dispatch output: receiveRoutingShape, int32 (layouts that have it) */
    epBufferReceivedTopkWeights = 2, /* dispatch output: receiveRoutingShape, float32 (layouts that have it) */
    epBufferExpertOutputs = 3,       /* combine input: receiveShape, the element type */
    epBufferWeightGradients = 4,     /* backward HT combine input: receiveRoutingShape, float32 */
    epBufferReceivedScales = 5       /* FP8 dispatch output: receiveScalesShape, float32 or int32 words */
} epBuffer_t;

/* ---------------------------------------------------------------------------------------- */
/* Tensors                                                                                  */

/* A borrowed view of a caller-owned tensor. */
typedef struct {
    size_t structSize;
    void* data;                    /* may be NULL only when the tensor has no elements */
    epDataType_t dtype;
    int32_t ndim;                  /* 0 ... EP_MAX_DIMS */
    int64_t sizes[EP_MAX_DIMS];    /* sizes[0 ..< ndim], each >= 0 */
    int64_t strides[EP_MAX_DIMS];  /* in elements; must describe a row-major contiguous tensor */
    int32_t device;                /* -1: host memory; >= 0: memory of that CUDA device */
} epTensor_t;

/* A contiguous tensor descriptor (a convenience; any correctly filled struct works). */
static inline epTensor_t epMakeTensor(void* data, epDataType_t dtype, int32_t ndim, const int64_t* sizes,
                                      int32_t device) {
    epTensor_t t;
    int64_t stride = 1;
    int32_t i;
    t.structSize = sizeof(epTensor_t);
    t.data = data;
    t.dtype = dtype;
    t.ndim = ndim;
    t.device = device;
    for (i = 0; i < EP_MAX_DIMS; i++) { t.sizes[i] = 0; t.strides[i] = 0; }
    for (i = ndim - 1; i >= 0 && i < EP_MAX_DIMS; i--) {
        t.sizes[i] = sizes[i];
        t.strides[i] = stride;
        stride *= sizes[i];
    }
    return t;
}

/* ---------------------------------------------------------------------------------------- */
/* Groups                                                                                   */

typedef struct epGroup* epGroup_t;
typedef struct epHandle* epHandle_t;
/* One step's routing and what was derived from it (v3): made by epStepCreate, named in the
 * config of update, dispatch and combine. NULL there means the group's own step. */
typedef struct epStep* epStep_t;

/* The shape of an expert-parallel group; every rank of a group uses the same one. */
typedef struct {
    size_t structSize;
    epAlgorithm_t algorithm;
    epLayout_t layout;
    int32_t alignment;                /* epLayoutExpertMajorPadded: zone granule in rows, 1...1024; 0 = 1 */
    int32_t ranks;                    /* R, 1...64 (GPU: ...32) */
    int32_t experts;                  /* E, a multiple of R; L = E / R experts per rank */
    int32_t topK;                     /* K, 1...32 */
    int64_t hidden;                   /* H, elements per token row; H * element size a multiple of 8 bytes */
    epDataType_t elementType;         /* bf16, f16, f32 or u8 */
    int64_t maxTokensPerRank;         /* Bmax */
    int64_t maxReceivedTokensPerRank; /* HT receive capacity N in rows; 0 = automatic (never overflows); LL: 0 */
    epOverflowPolicy_t overflow;
    double timeoutSeconds;            /* bound on every wait for another rank, in [1e-9, 86400]; 0 = 10 s */
    /* v3: FP8 dispatch (docs/fp8.md). With a scale mode, rows move as e4m3 (epFloat8E4M3) with a
     * scale per block; elementType (bf16, f16, f32) is what combine runs in and, with
     * epFP8Quantize, what dispatch reads. Every backend. */
    epFP8Scales_t fp8Scales;
    epFP8Source_t fp8Source;
} epGroupConfig_t;

/* Tuning of the GPU kernels (v3); 0 in a field means its default. */
typedef struct {
    int32_t pipelineDepth;           /* dispatch: 16-byte vectors each lane loads before storing, 1...8 (default 4) */
    int32_t rowsInFlight;            /* combine: rows loaded before the first is used, 1...16 (default 8) */
    int32_t rowPieces;               /* pieces a row is cut into, one warp each, 1...row bytes / 16 (default: automatic) */
    int32_t blocksPerMultiprocessor; /* 512-thread blocks per SM in one launch, 1 or 2 (default 2; 1 for R = 1 but the HT combine) */
    /* v4 (a config whose structSize ends before these reads them as 0) */
    int32_t updateChunkTokens;       /* HT: tokens each update block counts, >= 1 (default 256; at most 16 blocks a rank) */
    int32_t fusedUpdate;             /* LL: update inside the stacked dispatch's launch: 0 default (on, but off at
                                      * an NCCL rank with peers: its dispatch blocks would wait on every SM for the
                                      * slowest peer's counts), 1 on, 2 off */
    /* v5 (a config whose structSize ends before these reads them as 0) */
    int32_t launchGrid;              /* dispatch and combine blocks: 0 default (fitted), 1 fitted to the step's
                                      * work (one warp a token's row piece, 16 a block), 2 every SM's (before v5) */
    /* v6 (in v5's reserved field, which had to be 0) */
    int32_t launches;                /* step kernels: 0 default (dependent where the GPU and driver can), 1 programmatic
                                      * dependent launches (sm_90+, CUDA 12.3+ drivers; plain elsewhere), 2 plain */
} epGPUTuning_t;

/* Which backend runs the group. NULL means the host backend. */
typedef struct {
    size_t structSize;
    epBackend_t backend;
    /* epBackendHost uses neither: a negative value is refused in the GPU group's words, any
     * other but 0 as not applying (it has no device and no SMs to limit) */
    int32_t device;          /* epBackendVirtualGPU: CUDA device ordinal */
    int32_t multiprocessors; /* epBackendVirtualGPU: SMs the group may use, at most the device's; 0 = all */
    /* v3: tuning of the GPU kernels (epBackendVirtualGPU), each 0 for its default; epBackendHost
     * runs no kernels but refuses what a GPU group would (same checks, same errors) */
    epGPUTuning_t tuning;
} epBackendConfig_t;

/* Facts about a group, for sizing its buffers. */
typedef struct {
    size_t structSize;
    epBackend_t backend;
    int32_t ranks;
    int32_t experts;
    int32_t localExperts;            /* L = E / R */
    int32_t topK;
    int64_t hidden;
    epDataType_t elementType;
    epAlgorithm_t algorithm;
    epLayout_t layout;               /* never epLayoutDefault */
    int32_t alignment;
    int64_t maxTokensPerRank;
    int64_t receiveCapacity;         /* rows of a rank's receive buffer */
    int32_t receiveNdim;             /* dispatch `tokens` output and combine `expertOutputs` input */
    int64_t receiveShape[EP_MAX_DIMS];
    int32_t receiveRoutingNdim;      /* dispatch `topkIdx`/`topkWeights` outputs; 0 = the layout has none */
    int64_t receiveRoutingShape[EP_MAX_DIMS];
    /* v3 */
    int32_t bufferSlots;             /* NCCL-rank group: receive buffer slots (epGroupGetBuffer); else 0 */
    int32_t multiprocessors;         /* GPU groups: SMs the group's kernels may use; host: 0 */
    epFP8Scales_t fp8Scales;         /* as configured */
    epFP8Source_t fp8Source;
    epDataType_t receiveElementType; /* of the dispatch `tokens` output: elementType, or epFloat8E4M3 */
    int32_t receiveScalesNdim;       /* FP8: the dispatch `scales` output (receiveShape, last dimension the
                                      * scale words of a row: float32 scales, or int32 words of 4 exponent
                                      * bytes); 0 without FP8 */
    int64_t receiveScalesShape[EP_MAX_DIMS];
} epGroupInfo_t;

/* Creates a group of `config->ranks` ranks on the chosen backend (NULL: host). Control path:
 * allocates; the GPU group opens the device and allocates its workspaces. */
epResult_t epGroupCreate(const epGroupConfig_t* config, const epBackendConfig_t* backend, epGroup_t* group);
/* Releases the caller's reference; the group goes when its last handle goes too. NULL is a no-op.
 * Later calls naming it fail with epInvalidArgument (an epGroup_t, epHandle_t or epStep_t value is
 * never given to another object, so a destroyed one is never taken for a later one). */
epResult_t epGroupDestroy(epGroup_t group);
epResult_t epGroupGetInfo(epGroup_t group, epGroupInfo_t* info);

/* What one rank received in a dispatch. The caller provides the arrays (or NULL to skip one);
 * the library fills them and the two scalars. */
typedef struct {
    size_t structSize;
    int64_t* expertCounters;       /* [L]: rows per local expert (padding excluded) */
    int64_t* expertOffsets;        /* [L]: first row of each expert's zone (expert-major layouts; else 0) */
    int64_t* sourceRankCounters;   /* [R]: (token, this rank) pairs received from each source rank */
    int64_t* expertSourceCounters; /* [L * R]: rows per (local expert, source rank), row-major */
    int64_t receivedTotal;         /* rows of the receive buffer in use (HT expert-major: padding included) */
    int64_t droppedTokens;         /* (token, this rank) pairs dropped by epOverflowDrop */
} epLayoutInfo_t;

/* ---------------------------------------------------------------------------------------- */
/* Call structs (one rank's view)                                                           */

typedef struct {
    size_t structSize;
    const epTensor_t* topkIdx;      /* [B, K] int32 or int64: global expert ids, -1 = none; B <= Bmax */
} epUpdateInputs_t;

typedef struct {
    size_t structSize;
    epLaunchMode_t launchMode;      /* GPU group only */
    /* v3 */
    epStep_t step;                  /* the step to update (NULL: the group's own); its earlier routing is replaced */
} epUpdateConfig_t;

typedef struct {
    size_t structSize;
    const epTensor_t* tokens;       /* [B, H] of the element type */
    const epTensor_t* topkWeights;  /* [B, K] float32; required except for LL expert-major (optional there:
                                     * checked when given), a backward dispatch too (the layouts that
                                     * carry weights send them with the rows either way) */
    /* v3: FP8 pass-through: [B, scale words] of `tokens` (e4m3 or uint8 codes); else NULL (refused) */
    const epTensor_t* scales;
} epDispatchInputs_t;

typedef struct {
    size_t structSize;
    const epTensor_t* tokens;       /* receiveShape: LL expert-major [L, R*Bmax, H]; rank-major [R, Bmax, H]; HT [N, H] */
    const epTensor_t* topkIdx;      /* receiveRoutingShape, int32 or int64, local expert ids; must be NULL
                                     * for LL expert-major, which receives no routing (refused) */
    const epTensor_t* topkWeights;  /* receiveRoutingShape, float32; must be NULL for LL expert-major (refused) */
    /* Optional (NULL: skip). Host group: filled at no cost. GPU group: filling it waits for the
     * stream and checks the device status, as epGroupCheckStatus does. */
    epLayoutInfo_t* layoutInfo;
    /* v3, optional (NULL: skip): rows per local expert [L] and per (local expert, source rank)
     * [L, R], int32, in the memory the group works in (GPU groups: device memory, written on the
     * stream, no host synchronisation; host group: host memory). The same numbers as
     * layoutInfo's expertCounters / expertSourceCounters. */
    const epTensor_t* expertCounts;
    const epTensor_t* expertSourceCounts;
    /* v3: FP8 groups: the received rows' scales, receiveScalesShape (required); else NULL (refused) */
    const epTensor_t* scales;
} epDispatchOutputs_t;

typedef struct {
    size_t structSize;
    epPassDirection_t direction;
    epLaunchMode_t launchMode;      /* GPU group only */
    /* v3 */
    epStep_t step;                  /* whose routing (NULL: the group's own step) */
    epCallPhase_t phase;
} epDispatchConfig_t;

typedef struct {
    size_t structSize;
    const epTensor_t* expertOutputs;   /* shaped like the dispatch `tokens` output */
    /* Forward LL expert-major: the source's [B, K] float32 routing weights (the ones given to
     * dispatch). Forward HT expert-major: the [N] per-slot weights dispatch delivered. Else NULL
     * (a backward combine, the rank-major and flat layouts: given, refused). */
    const epTensor_t* topkWeights;
    const epTensor_t* weightGradients; /* backward HT: shaped like the dispatch `topkWeights` output; else NULL (refused) */
} epCombineInputs_t;

typedef struct {
    size_t structSize;
    const epTensor_t* tokens;              /* [B, H] combined rows in the original token order */
    const epTensor_t* topkWeightGradients; /* backward HT: [B, K] float32; else NULL (refused) */
} epCombineOutputs_t;

typedef struct {
    size_t structSize;
    epPassDirection_t direction;
    epLaunchMode_t launchMode;      /* GPU group only */
    /* v3 */
    epStep_t step;                  /* whose routing (NULL: the group's own step); it must have been dispatched */
    epCallPhase_t phase;
} epCombineConfig_t;

/* ---------------------------------------------------------------------------------------- */
/* Collective calls: one call runs a step for all R ranks of the group. `inputs` and `outputs`
 * are arrays of R structs, element r for rank r. Host group: the R ranks run concurrently, one
 * thread each, and the call returns when all are done; if several ranks fail, the error of the
 * lowest rank that did not merely see a peer fail is reported, prefixed "rank r: ". Masked
 * (inactive) ranks are skipped: their elements' tensors are not read. GPU group: one launch
 * that covers every rank (masked ranks do nothing in it).                                    */

/* This step's routing for every rank. The topkIdx tensors must stay unchanged until this
 * step's combine (the GPU group reads them again). An update refused by its checks of the
 * routing (the topkIdx tensor's dtype or shape, an entry) voids the step: dispatch and combine
 * then fail until an update succeeds; one refused before it begins (an argument struct that
 * cannot be read: a NULL tensor, an unknown dtype enum; a send-only call pending) leaves the step
 * as it was. */
epResult_t epGroupUpdateAll(epGroup_t group, const epUpdateInputs_t* inputs, const epUpdateConfig_t* config,
                            void* stream);
/* Sends every rank's rows straight into their slots on the destination ranks. Rows outside the
 * received zones are left as they were. */
epResult_t epGroupDispatchAll(epGroup_t group, const epDispatchInputs_t* inputs, const epDispatchOutputs_t* outputs,
                              const epDispatchConfig_t* config, void* stream);
/* Every rank reduces its tokens' expert outputs in a fixed order (float32 fused multiply-adds,
 * one rounding to the element type), so results are bit-identical across backends and runs. */
epResult_t epGroupCombineAll(epGroup_t group, const epCombineInputs_t* inputs, const epCombineOutputs_t* outputs,
                             const epCombineConfig_t* config, void* stream);
/* GPU group: waits for the streams of the group's calls, then returns the first error a rank
 * recorded on the device since the last check (the check clears it). Host group: epSuccess (its
 * calls report errors). */
epResult_t epGroupCheckStatus(epGroup_t group);
/* What `rank` received in the last dispatch of the group's own step (a config.step of NULL; a
 * named step's: epStepGetLayoutInfo) (GPU group: checks the status first, so it waits). */
epResult_t epGroupGetLayoutInfo(epGroup_t group, int32_t rank, epLayoutInfo_t* info);

/* ---------------------------------------------------------------------------------------- */
/* Stacked calls (v4): a collective call whose every per-rank argument is one part of one array
 * (rank r's part starts rankStride bytes after rank r-1's), described once instead of once per
 * rank: the fast path of callers that keep their ranks' tensors in one [R, ...] array (the
 * Python package's VirtualGroup). The library checks each array like rank 0's epTensor_t of
 * the per-rank call (type, device, an address wherever there are elements) and its stride and
 * alignment; as with epTensor_t it cannot see how much memory an address has, so the sizes are
 * the caller's word. Host and virtual GPU groups; NCCL-rank groups since v7, with one part (this
 * process's rank's: rankStride is checked, and has no other use): a dispatch receives into a
 * buffer slot's own buffers (receivedTokens one slot's epBufferReceivedTokens; receivedTopkIdx,
 * receivedTopkWeights and receivedScales that slot's, or NULL for that slot's); a combine reads a
 * slot's own expertOutputs or copies the step's received rows of the caller's as epCombine does;
 * a NULL step is the per-rank calls' own step. One call then does an NCCL rank's update and
 * dispatch (epHandleUpdate + epDispatch). At B = 0 an optional argument (topkIdx, topkWeights,
 * scales) needs a non-NULL data to count as given. (Before v7, NCCL-rank groups answered
 * epInvalidUsage.) */

typedef struct {
    void* data;             /* rank 0's part; NULL: not given (an input with no elements, or an
                             * optional argument left out) */
    epDataType_t dtype;
    int32_t device;         /* -1: host memory; >= 0: memory of that CUDA device (the group's) */
    int64_t rankStride;     /* bytes from one rank's part to the next's; 0: packed (one part's own
                             * size, for the shape the call needs). Checked against the parts' sizes
                             * and overflow, not against the memory behind `data`: that every
                             * part lies in memory of the caller's is the caller's word */
} epStacked_t;

/* Every rank's `tokens` rows (the same B for every rank). With topkIdx.data set the call is the
 * step's update and its dispatch in one call (as epGroupUpdateAll then epGroupDispatchAll);
 * without, a dispatch of the step's routing again (a backward dispatch), B the step's. The parts
 * have the shapes of the per-rank call's tensors: rank r's topkIdx is [B, K], its received
 * rows receiveShape, and so on. Every argument is checked before anything runs: a rejected call
 * runs nothing and leaves the step as it was. (Routing refused inside the update, such as an
 * expert id out of range, fails the update as epGroupUpdateAll does, which voids the step.) */
typedef struct {
    size_t structSize;
    int64_t tokens;                   /* B, 0 ... maxTokensPerRank */
    epStacked_t topkIdx;              /* [B, K] int32 or int64 per rank, or data NULL (see above) */
    epStacked_t inputTokens;          /* [B, H] rows per rank (epDispatchInputs_t.tokens) */
    epStacked_t topkWeights;          /* [B, K] float32 (epDispatchInputs_t.topkWeights) */
    epStacked_t scales;               /* FP8 pass-through: [B, scale words]; else data NULL */
    epStacked_t receivedTokens;       /* receiveShape per rank (epDispatchOutputs_t.tokens) */
    epStacked_t receivedTopkIdx;      /* receiveRoutingShape, int32 or int64; layouts that have it, else data NULL */
    epStacked_t receivedTopkWeights;  /* receiveRoutingShape, float32; layouts that have it, else data NULL */
    epStacked_t receivedScales;       /* FP8 groups: receiveScalesShape; else data NULL */
    epStacked_t expertCounts;         /* optional: [L] int32 per rank */
    epStacked_t expertSourceCounts;   /* optional: [L, R] int32 per rank */
    epPassDirection_t direction;
    epLaunchMode_t launchMode;        /* GPU group only */
    epCallPhase_t phase;
    epStep_t step;                    /* NULL: the group's own step */
} epStackedDispatch_t;

/* The combine of a dispatched step; rank r's combined rows (its routing's B_r) go to part r of
 * combinedTokens, [B_r, H] (packed: the most rows of any rank per part). */
typedef struct {
    size_t structSize;
    epStacked_t expertOutputs;        /* receiveShape per rank (epCombineInputs_t.expertOutputs) */
    epStacked_t topkWeights;          /* epCombineInputs_t.topkWeights: LL expert-major forward [B, K];
                                       * HT expert-major forward the per-slot [N]; else data NULL */
    epStacked_t weightGradients;      /* backward HT: receiveRoutingShape per rank; else data NULL */
    epStacked_t combinedTokens;       /* [B, H] per rank (epCombineOutputs_t.tokens) */
    epStacked_t topkWeightGradients;  /* backward HT: [B, K] float32 per rank; else data NULL */
    epPassDirection_t direction;
    epLaunchMode_t launchMode;        /* GPU group only */
    epCallPhase_t phase;
    epStep_t step;                    /* NULL: the group's own step */
} epStackedCombine_t;

epResult_t epGroupDispatchStacked(epGroup_t group, const epStackedDispatch_t* call, void* stream);
epResult_t epGroupCombineStacked(epGroup_t group, const epStackedCombine_t* call, void* stream);

/* Steps (v3). A step holds one update's routing and what was derived from it (small: slot maps
 * and counts, in the memory the group works in); the rows stay in the receive buffers. Several
 * steps can be live on one group (one per MoE layer, micro-batch or pass): a step's combine and
 * its backward dispatch use its own routing, whatever other steps were updated since. Collective
 * calls and the NCCL-rank group's per-rank calls name the step in their config; the host group's
 * per-rank calls use their handle's own step. Every rank makes the same calls in the same order.
 * Control path: epStepCreate allocates. A step keeps its group alive. */
epResult_t epStepCreate(epGroup_t group, epStep_t* step);
/* Frees the step; later calls naming it fail with epInvalidArgument. NULL is a no-op. */
epResult_t epStepDestroy(epStep_t step);
/* What `rank` received in the step's last dispatch (GPU: waits for the device). */
epResult_t epStepGetLayoutInfo(epStep_t step, int32_t rank, epLayoutInfo_t* info);

/* Enqueues the receiving half of the group's last epPhaseSendOnly dispatch or combine on
 * `stream` (collective calls; epComplete: a per-rank handle's); epInvalidUsage when none is
 * pending. Host group: the call ran whole; completing it does nothing more. */
epResult_t epGroupComplete(epGroup_t group, void* stream);

/* The active-rank mask (bit r = rank r). A rank that timed out is masked; it sends and receives
 * nothing until cleaned. Control path (GPU: synchronises). */
epResult_t epGroupGetActiveRanks(epGroup_t group, uint64_t* mask);
epResult_t epGroupDeactivateRank(epGroup_t group, int32_t rank);
/* Marks the ranks of `mask` active again and restarts every rank's step numbering (bits past the
 * group's ranks are ignored: ~0 cleans every rank). Call between steps only: epInvalidUsage while
 * a send-only call waits for epGroupComplete (epGroupDeactivateRank too), whose receiving half
 * would meet another mask. */
epResult_t epGroupCleanRanks(epGroup_t group, uint64_t mask);

/* ---------------------------------------------------------------------------------------- */
/* Per-rank calls: what one rank (one process of a multi-GPU job) calls.
 *   - Host group: a rank blocks until every active rank makes its matching call, so drive the R
 *     ranks from R threads.
 *   - NCCL-rank group: a handle for this process's rank only; the calls enqueue on `stream` and
 *     return (see epGroupCreateNCCL).
 * (The virtual GPU group runs all its ranks in one launch: use the collective calls.)        */

/* A handle holds one rank's routing of the current step. It keeps its group alive. */
epResult_t epHandleCreate(epGroup_t group, int32_t rank, epHandle_t* handle);
epResult_t epHandleDestroy(epHandle_t handle);
epResult_t epHandleUpdate(epHandle_t handle, const epUpdateInputs_t* inputs, const epUpdateConfig_t* config,
                          void* stream);
epResult_t epDispatch(epHandle_t handle, const epDispatchInputs_t* inputs, const epDispatchOutputs_t* outputs,
                      const epDispatchConfig_t* config, void* stream);
epResult_t epCombine(epHandle_t handle, const epCombineInputs_t* inputs, const epCombineOutputs_t* outputs,
                     const epCombineConfig_t* config, void* stream);
/* The receiving half of this handle's last epPhaseSendOnly call (v3). */
epResult_t epComplete(epHandle_t handle, void* stream);

/* ---------------------------------------------------------------------------------------- */
/* NCCL-rank groups (ABI version 2): one rank per process, one GPU each, joined by an NCCL
 * communicator that the group creates from a unique id. NCCL (libnccl.so.2) is opened at run
 * time: without it these calls fail with epNcclError, without a CUDA driver or device with
 * epCudaError; the rest of the library works either way.
 *
 * Rank 0 calls epGetNCCLUniqueId and hands the id to every rank (a broadcast of the launcher:
 * torch.distributed, MPI, a file); then every rank calls epGroupCreateNCCL with the same config
 * and its own rank, at the same time (it returns once all ranks have joined). Each process then
 * makes a handle for its rank (epHandleCreate(group, rank, ...)) and runs the step with
 * epHandleUpdate, epDispatch and epCombine, every rank the same calls in the same order.
 *   - The calls enqueue work on the caller's stream (a CUstream / cudaStream_t; NULL: CUDA's
 *     default stream) and return; device-side errors come from epGroupCheckStatus, or from a
 *     dispatch that asks for its layout info (which waits for the device).
 *   - Tensors live on the group's device. Dispatch receives into the group's own buffers of a
 *     buffer slot (the other ranks write them). Given those buffers as outputs (epGroupGetBuffer,
 *     v3) it copies nothing; given other tensors it receives into slot 0 and, on the stream,
 *     fills outputs->tokens with zeros and copies the received zones into it (since v8; before,
 *     the whole receive buffer; so outputs->tokens must be 8-byte aligned, FP8 rows excepted),
 *     and copies the whole received routing (and FP8 rows and scales), so rows outside the
 *     received zones read as zero (and topkIdx outputs are int32). Combine reads the slot its
 *     step's dispatch used: given that
 *     slot's expert-output buffer it copies nothing; else it copies the rows of the caller's
 *     expertOutputs that the step received (the rows the other ranks read; the rest are neither
 *     read nor copied; all of them where expertOutputs is not 8-byte aligned) and, for HT
 *     expert-major forward, the per-slot topkWeights, for HT backward the weightGradients, into
 *     the slot's buffers that the other ranks read, on the stream, then reduces. A send-only
 *     combine copies the same way before its sending half; there, HT expert-major forward takes
 *     only the slot's own per-slot weights (epBufferReceivedTopkWeights as its dispatch into
 *     that slot's own buffers left them). A step whose slot a later dispatch has used cannot
 *     combine (epInvalidUsage).
 *   - epGroupGetInfo reports backend epBackendNCCLRank; epGroupGetLayoutInfo and
 *     epGroupGetActiveRanks answer for this process's rank. The stacked calls take this rank's
 *     arrays (v7, see there). The collective *All calls, epGroupDeactivateRank and
 *     epGroupCleanRanks are not offered (epInvalidUsage).
 *   - epGroupDestroy (with the group's last handle) ends the communicator: every rank does it,
 *     and it waits (bounded) for the others.                                                   */

#define EP_NCCL_UNIQUE_ID_BYTES 128

/* ncclUniqueId: opaque bytes, the same on every rank of one group. */
typedef struct {
    uint8_t bytes[EP_NCCL_UNIQUE_ID_BYTES];
} epNCCLUniqueId_t;

/* This process's place in an NCCL-rank group. */
typedef struct {
    size_t structSize;
    int32_t rank;               /* 0 ... config->ranks - 1; the communicator has config->ranks ranks */
    int32_t device;             /* CUDA device ordinal of this rank's GPU */
    int32_t multiprocessors;    /* SMs the group's kernels may use; 0 = all */
    epNCCLUniqueId_t uniqueId;  /* from epGetNCCLUniqueId on rank 0 */
    double initTimeoutSeconds;  /* bound on waiting for every rank to join (and, at destroy, to leave); 0 = 60 s */
    /* v3 */
    epGPUTuning_t tuning;       /* tuning of this rank's kernels, each 0 for its default */
} epNCCLRankConfig_t;

/* Zero copy (v3): one of this rank's group-owned buffers of buffer slot `slot` (0 ..<
 * epGroupInfo_t.bufferSlots), described in `tensor` (device memory of the group's device). A
 * dispatch whose outputs->tokens (and topkIdx, topkWeights) are slot s's received buffers
 * receives there with no copy (rows outside the received zones are then unspecified: they hold
 * earlier steps' rows); a combine whose expertOutputs is slot s's expert-output buffer (and, HT
 * expert-major forward, topkWeights slot s's received weights; HT backward, weightGradients its
 * weight-gradient buffer) reads them with no copy. The step's combine must use the slot its
 * dispatch used. A slot's buffers are rewritten by the next dispatch into that slot, on any
 * rank: use them before your next dispatch into it. Only NCCL-rank groups own such buffers. */
epResult_t epGroupGetBuffer(epGroup_t group, int32_t slot, epBuffer_t buffer, epTensor_t* tensor);

/* Copies the rows `step`'s dispatch received (NULL: the group's own step), the layout's zones
 * with their padding (the rows a combine reads), out of the buffer slot that dispatch used into
 * `tokens` (shaped and typed like the slot's epBufferReceivedTokens; the group's device), on
 * `stream`; rows outside the zones are not touched (v8). For a caller that keeps the received
 * rows past the slot's reuse (an autograd graph): the zones are what it costs, not the
 * worst-case buffer (ll-std at one rank of 1: ~15 MB of 470 MB). `stream` must run it after the
 * dispatch (its stream, or an event) and before this rank's next update or dispatch (those let
 * the peers write the slot again). A step that failed on the device (epGroupCheckStatus names it)
 * copies nothing: `tokens` is left as it was. NCCL-rank groups only, and not FP8 ones
 * (epInvalidUsage; FP8: epInvalidArgument); `tokens` 8-byte aligned (epInvalidArgument);
 * epInvalidUsage while a send-only call waits for epComplete, or once a later dispatch has used
 * the step's slot. */
epResult_t epGroupCopyReceived(epGroup_t group, epStep_t step, const epTensor_t* tokens, void* stream);

/* A fresh NCCL unique id (ncclGetUniqueId): rank 0 calls it once per group. */
epResult_t epGetNCCLUniqueId(epNCCLUniqueId_t* id);
/* Creates this process's rank of an NCCL-rank group: joins the communicator (blocks until every
 * rank has joined, at most initTimeoutSeconds), allocates the shared buffers and maps the other
 * ranks' ones. Collective: every rank calls it with the same config and uniqueId. */
epResult_t epGroupCreateNCCL(const epGroupConfig_t* config, const epNCCLRankConfig_t* ncclRank, epGroup_t* group);

#ifdef __cplusplus
}
#endif

#endif /* EXPERT_PARALLEL_H */
