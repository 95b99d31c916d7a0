/*
 * A coverage-guided fuzz target (libFuzzer) over the C ABI on the host (CPU) backend.
 *
 * Each input is decoded into a group config (abi_fuzz_config.h: small ones from most bytes, large
 * valid ones from the top byte values, scaled to a byte budget; sometimes a field on or just
 * past a bound of the validation, sometimes invalid), then a sequence of up to 24 calls in any
 * order: collective update / dispatch / combine (per-rank descriptors, or stacked arrays:
 * epGroupDispatchStacked / epGroupCombineStacked), deactivate, clean, layout info, active ranks,
 * status, per-rank handle calls (one thread per rank), handle and group destroys. Every tensor
 * descriptor is right most of the time and otherwise wrong in one way (dtype, a size, ndim, NULL
 * data, NULL descriptor, structSize, strides, device, alignment); every buffer is allocated to
 * exactly the bytes its descriptor describes, so an over-read or over-write is an
 * AddressSanitizer report.
 *
 * Checked after every call (a failed check aborts, which libFuzzer reports as a crash):
 *   - the status is a named one (never epInternalError, nor a CUDA/NCCL status on the host);
 *   - success leaves the last-error message empty; a failure leaves "<entry point>: <what>";
 *   - epGroupCreate accepts every valid config (on a bound too; one whose step metadata cannot fit
 *     the host may be refused, epInvalidArgument) and refuses every invalid one; epGroupGetInfo
 *     reports every field as the header defines it (capacity, shapes, FP8 scales);
 *   - a rejected call wrote nothing (every output and layout-info array is compared with a copy
 *     taken before the call); inputs are never written; masked ranks' outputs are untouched;
 *   - order: dispatch succeeds only after a successful update whose mask still holds, combine
 *     only after a dispatch of that step; a call on a destroyed group or handle is
 *     epInvalidArgument; a topkIdx describing 2^40 rows is refused before any read or allocation;
 *   - calls whose every argument is right are accepted (epTimeout allowed; an update fails with
 *     epOverflow exactly when the model says a receive buffer overflows);
 *   - an accepted dispatch matches the model of abi_fuzz_model.h, for every layout, both overflow
 *     policies (drop: the strict prefix that fits) and FP8 (codes and scales quantised by the
 *     harness from docs/fp8.md): layout counters, received rows, received routing, padding, and
 *     every other row left as it was;
 *   - an accepted combine gives, bit for bit, the sum the model computes in the documented order
 *     (docs/architecture.md, "Order and arithmetic"), forward and backward, and the backward HT
 *     weight gradients.
 * python/tests/test_call_sequences.py is the numeric oracle of the Python package.
 *
 * Built and run by scripts/fuzz (clang -fsanitize=fuzzer,address). The input format is defined
 * by the decoder below; Tests/fuzz/make_seeds.py writes the seed corpus in it.
 */
#include "expert_parallel.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---------------------------------------------------------------------------------------- */
/* Input decoding                                                                           */

typedef struct {
    const uint8_t* p;
    size_t n;
} Reader;

static uint8_t u8(Reader* r) {
    if (r->n == 0) return 0;
    r->n--;
    return *r->p++;
}

static uint64_t rng_state;
static uint64_t next_random(void) { /* splitmix64: payload bytes, seeded from the input */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---------------------------------------------------------------------------------------- */
/* Failures                                                                                 */

static const char* current_op = "";

#define FAIL(...)                                                                 \
    do {                                                                          \
        fprintf(stderr, "abi_fuzz: property violated in %s: ", current_op);       \
        fprintf(stderr, __VA_ARGS__);                                             \
        fprintf(stderr, "\n");                                                    \
        abort();                                                                  \
    } while (0)

/* Per-rank calls get every kind of wrong argument, the C layer's refusals (a struct, config or
 * descriptor that does not convert) among them: a refused call still takes its place among the
 * ranks (HostRank.refuse), so the ranks' rounds stay in step. (They went out of step and a later
 * dispatch or combine trapped before: the corpus keeps that input, per-rank-desync-trap.)
 * EP_FUZZ_KNOWN_BUGS=1 is kept for the inputs of defects still open; none is now. */
static int known_bugs = 1;
/* Set while a per-rank call's arguments are made. */
static int per_rank_args = 0;
/* EP_FUZZ_TRACE=1: every call and its status on stderr (to read a crash's input). */
static int trace = 0;
#define TRACE(...) do { if (trace) { fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)

/* The status and message of a call that returned `rc`, `message` being its last-error text. */
static void check_status(const char* name, epResult_t rc, const char* message) {
    if (rc == epInternalError) FAIL("%s -> epInternalError: %s", name, message);
    if ((int)rc < 0 || (int)rc > epInternalError) FAIL("%s -> unknown status %d", name, (int)rc);
    if (rc == epCudaError || rc == epNcclError) FAIL("%s -> %s on the host backend: %s", name, epGetErrorString(rc), message);
    if (rc == epSuccess) {
        if (message[0] != 0) FAIL("%s succeeded with a message: %s", name, message);
        return;
    }
    size_t length = strlen(name);
    if (strncmp(message, name, length) != 0 || strncmp(message + length, ": ", 2) != 0 || strlen(message) < length + 8)
        FAIL("%s -> %s with a message that does not name the call and what was wrong: \"%s\"", name, epGetErrorString(rc), message);
}

/* A destroy call (`call`, entry point `name`), its status into `rc`: as check_status, but its
 * success leaves this thread's last message as it was before the call, not empty (a garbage
 * collector's finalizer may run one between another call's failure and the read of its message). */
#define DESTROY_CHECKED(name, rc, call) do {                                                       \
        char* before_ = strdup(epGetLastErrorMessage());                                           \
        (rc) = (call);                                                                              \
        if ((rc) == epSuccess && strcmp(epGetLastErrorMessage(), before_) != 0)                     \
            FAIL("%s succeeded and changed the last message: \"%s\" -> \"%s\"", (name), before_,     \
                 epGetLastErrorMessage());                                                          \
        if ((rc) != epSuccess) check_status((name), (rc), epGetLastErrorMessage());                \
        free(before_);                                                                              \
    } while (0)

/* ---------------------------------------------------------------------------------------- */
/* Tensors and their buffers                                                                */

static size_t dtype_size(int dtype) {
    switch (dtype) {
    case epBFloat16: case epFloat16: return 2;
    case epFloat32: case epInt32: return 4;
    case epInt64: return 8;
    case epUInt8: case epFloat8E4M3: return 1;
    default: return 4;
    }
}

/* One tensor argument of a call: its descriptor, its buffer, and a copy of the buffer taken
 * before the call (outputs: compared on rejection; inputs: compared always). */
typedef struct {
    epTensor_t desc;
    const epTensor_t* pointer; /* what the call gets: &desc, or NULL */
    uint8_t* buffer;           /* the bytes the descriptor describes (plus one for misalignment) */
    size_t bytes;
    uint8_t* before;
    int output;
    int rank;
    int owned;                 /* buffer is this call's own (a mutated descriptor) */
    int mutated;
} Arg;

enum { MAX_R = 64 };
#define MAX_ARGS (8 * MAX_R)
typedef struct {
    Arg args[MAX_ARGS];
    int count;
    int mutated;               /* any argument of the call was wrong */
} ArgList;

static int64_t elements_of(int ndim, const int64_t* sizes) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        int64_t s = sizes[i] < 0 ? 0 : sizes[i];
        if (s != 0 && n > INT64_MAX / s) return INT64_MAX; /* saturates (a huge mutated shape) */
        n *= s;
    }
    return n;
}

/* A persistent buffer of a rank: exactly `bytes`, kept across calls (dispatch fills what
 * combine reads). */
typedef struct {
    uint8_t* data;
    size_t bytes;
} Buffer;

static void fill_random(uint8_t* p, size_t bytes) {
    size_t i = 0;
    for (; i + 8 <= bytes; i += 8) { uint64_t v = next_random(); memcpy(p + i, &v, 8); }
    for (; i < bytes; i++) p[i] = (uint8_t)next_random();
}

static void buffer_make(Buffer* b, size_t bytes) {
    b->bytes = bytes;
    b->data = malloc(bytes ? bytes : 1);
    fill_random(b->data, bytes);
}

static void buffer_free(Buffer* b) {
    free(b->data);
    b->data = NULL;
    b->bytes = 0;
}

/* Largest buffer a mutated descriptor gets exactly; past it a token buffer (the library must
 * refuse such a shape before reading). */
#define MUTATED_BYTES_MAX ((int64_t)64 << 20)

/* Adds a tensor argument over `base` with the right dtype/shape, then maybe breaks it as the
 * next input byte says. Returns the descriptor pointer the call gets. */
static const epTensor_t* arg(Reader* in, ArgList* list, Buffer* base, int dtype, int ndim, const int64_t* sizes,
                             int output, int rank) {
    Arg* a = &list->args[list->count++];
    memset(a, 0, sizeof *a);
    a->output = output;
    a->rank = rank;
    a->desc = epMakeTensor(base->data, (epDataType_t)dtype, ndim, sizes, -1);
    a->pointer = &a->desc;
    a->buffer = base->data;
    a->bytes = base->bytes;
    uint8_t m = u8(in);
    if (m < 208) return a->pointer;
    a->mutated = 1;
    list->mutated = 1;
    epTensor_t* t = &a->desc;
    int64_t s[EP_MAX_DIMS] = {0, 0, 0, 0};
    int mutationCase = (m - 208) % 16;
    if (per_rank_args && !known_bugs && mutationCase >= 6 && mutationCase <= 13) mutationCase = 1 + mutationCase % 5;
    for (int i = 0; i < ndim; i++) s[i] = sizes[i];
    int newDtype = dtype, newNdim = ndim, misalign = 0;
    switch (mutationCase) {
    case 0: newDtype = (dtype + 1 + m % 6) % 7; break;
    case 1: if (ndim > 0) s[0] += 1; break;
    case 2: if (ndim > 0 && s[0] > 0) s[0] -= 1; else if (ndim > 0) s[0] = 2; break;
    case 3: if (ndim > 0) s[ndim - 1] += 1; break;
    case 4: if (ndim < EP_MAX_DIMS) { s[ndim] = 1; newNdim = ndim + 1; } break;
    case 5: if (ndim >= 2) { s[0] *= s[1]; for (int i = 1; i < ndim - 1; i++) s[i] = s[i + 1]; newNdim = ndim - 1; } break;
    case 6: t->data = NULL; return a->pointer;                    /* NULL data, shape as it is */
    case 7: a->pointer = NULL; return NULL;                       /* no descriptor at all */
    case 8: t->structSize = (m & 1) ? sizeof(epTensor_t) - 8 : 0; return a->pointer;
    case 9: if (ndim > 0) t->strides[0] += 1 + (m & 1); return a->pointer;
    case 10: t->device = (m & 1) ? 0 : -2; return a->pointer;
    case 11: misalign = 1; break;
    case 12: if (ndim > 0) s[ndim - 1] = -1 - (m & 1); break;
    case 13: newNdim = (m & 1) ? EP_MAX_DIMS + 1 : -1; break;
    case 14: if (ndim > 0) s[0] = 0; break;
    case 15: if (ndim > 0) s[0] = (int64_t)1 << 40; break; /* huge: refused before any read or allocation */
    }
    /* A buffer of exactly the described bytes (huge or invalid descriptions get a token buffer:
     * the library must refuse them before reading). */
    int describedNdim = newNdim < 0 ? 0 : newNdim > EP_MAX_DIMS ? EP_MAX_DIMS : newNdim;
    int64_t count = elements_of(describedNdim, s);
    size_t bytes = count > MUTATED_BYTES_MAX / 8 || newNdim != describedNdim ? 16 : (size_t)count * dtype_size(newDtype);
    a->owned = 1;
    a->bytes = bytes;
    uint8_t* raw = malloc(bytes + 1 + 8);
    fill_random(raw, bytes + 1 + 8);
    memcpy(raw + misalign, base->data, bytes < base->bytes ? bytes : base->bytes);
    a->buffer = raw;
    *t = epMakeTensor(raw + misalign, (epDataType_t)newDtype, describedNdim, s, -1);
    t->ndim = newNdim;
    if (misalign && dtype_size(newDtype) == 1) t->data = raw + 1; /* byte tensors: no misalignment possible */
    a->bytes = bytes + misalign;
    return a->pointer;
}

static void args_snapshot(ArgList* list) {
    for (int i = 0; i < list->count; i++) {
        Arg* a = &list->args[i];
        a->before = malloc(a->bytes ? a->bytes : 1);
        memcpy(a->before, a->buffer, a->bytes);
    }
}

static int arg_changed(const Arg* a) { return memcmp(a->before, a->buffer, a->bytes) != 0; }

static void args_free(ArgList* list) {
    for (int i = 0; i < list->count; i++) {
        free(list->args[i].before);
        if (list->args[i].owned) free(list->args[i].buffer);
    }
    list->count = 0;
    list->mutated = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* The group under test and the model of its state                                          */

typedef struct {
    int valid;                         /* a successful update whose mask still holds */
    int known;                         /* ... made of the model's own tensors (so its routing is known) */
    int maybeVoid;                     /* a later update failed: the step may be void or may stand */
    int dispatched;
    uint64_t mask;                     /* active ranks at the update */
    int tokens[MAX_R];
    int64_t* idx[MAX_R];               /* [B][K] of each rank (a copy) */
} StepModel;

typedef struct {
    /* config */
    int algorithm, layout, R, E, L, K, elementType, overflow, alignment;
    int fp8, fp8Source, scaleType;     /* epFP8Scales_t (0: none), epFP8Source_t, the scale words' dtype */
    int64_t H, Bmax, capacity, scaleWords;
    int recvNdim, routingNdim, scalesNdim;
    int64_t recvShape[EP_MAX_DIMS], routingShape[EP_MAX_DIMS], scalesShape[EP_MAX_DIMS];
    size_t esize;                      /* elementType's bytes */
    size_t isize;                      /* an element of the rows dispatch reads: esize, or 1 (FP8 pass-through) */
    size_t wsize;                      /* ... of the rows it writes: esize, or 1 (FP8) */
    /* objects */
    epGroup_t group;
    int groupDestroyed;
    epHandle_t handles[MAX_R];
    int handlesDestroyed;
    uint64_t mask, all;
    StepModel groupStep, handleStep;
    /* per-rank buffers of the current step */
    int tokens[MAX_R];                 /* B of the last update attempt */
    int idxDtype[MAX_R];
    Buffer idx[MAX_R], x[MAX_R], w[MAX_R], scalesIn[MAX_R];
    Buffer recv[MAX_R], recvIdx[MAX_R], recvW[MAX_R], recvScales[MAX_R], eo[MAX_R], y[MAX_R], gradIn[MAX_R], gradOut[MAX_R];
    int recvIdxDtype[MAX_R], recvType[MAX_R], inputType[MAX_R];
    int64_t* counters[MAX_R];          /* layout info arrays: expert, offsets, source, expert×source */
    double timeoutSeconds;             /* the group's (0: the default 10 s) */
} State;

static int64_t layout_array_len(const State* s) { return (int64_t)s->L * 2 + s->R + (int64_t)s->L * s->R; }

/* The expert outputs combine reads: the received rows themselves, or (FP8) rows of the element type. */
static Buffer* expert_outputs(State* s, int r) { return s->fp8 ? &s->eo[r] : &s->recv[r]; }

static void free_step_buffers(State* s, int r) {
    buffer_free(&s->idx[r]);
    buffer_free(&s->x[r]);
    buffer_free(&s->w[r]);
    buffer_free(&s->scalesIn[r]);
    buffer_free(&s->y[r]);
    buffer_free(&s->gradOut[r]);
}

static int64_t read_index(const State* s, int r, int64_t i) {
    if (s->idxDtype[r] == epInt64) return ((const int64_t*)s->idx[r].data)[i];
    return ((const int32_t*)s->idx[r].data)[i];
}

/* Rows of a routing read from the input, one (kind, start) byte pair each; further rows (large
 * B) are drawn from the input's random stream, mostly right. */
enum { EXPLICIT_ROWS = 16 };

/* New routing for rank r: B tokens, distinct experts per row mostly, sometimes -1 or broken. */
static void make_routing(Reader* in, State* s, int r) {
    free_step_buffers(s, r);
    uint8_t b = u8(in);
    int B = (int)(b % (s->Bmax + 1));
    if (b >= 250) B = (int)s->Bmax + 1; /* one row too many */
    else if (b >= 240 && s->Bmax > 200) B = (int)s->Bmax - (b - 240); /* large Bmax: full or nearly */
    s->tokens[r] = B;
    s->idxDtype[r] = (b & 0x40) ? epInt64 : epInt32;
    buffer_make(&s->idx[r], (size_t)B * s->K * dtype_size(s->idxDtype[r]));
    for (int t = 0; t < B; t++) {
        uint8_t rowKind, startByte;
        int start;
        if (t < EXPLICIT_ROWS) {
            rowKind = u8(in);
            startByte = u8(in);
            start = startByte % s->E;
        } else {
            uint64_t v = next_random();
            rowKind = (v & 0xF0) == 0xF0 ? (uint8_t)(0x10 * (1 + (v >> 8) % 2)) : 0; /* now and then a -1 */
            start = (int)((v >> 16) % (uint64_t)s->E);
        }
        for (int c = 0; c < s->K; c++) {
            int64_t e = (start + c) % s->E;
            if ((rowKind >> 4) == c + 1) e = -1;
            if (rowKind >= 0xF8) { /* one wrong entry */
                switch (rowKind & 7) {
                case 0: e = s->E; break;
                case 1: e = -2; break;
                case 2: e = c > 0 ? start % s->E : e; break; /* repeats the row's first expert */
                case 3: e = (int64_t)1 << 33; break;
                default: e = 0x7fffffff; break;
                }
            }
            int64_t i = (int64_t)t * s->K + c;
            if (s->idxDtype[r] == epInt64) ((int64_t*)s->idx[r].data)[i] = e;
            else ((int32_t*)s->idx[r].data)[i] = (int32_t)e;
        }
    }
    buffer_make(&s->x[r], (size_t)B * s->H * s->isize);
    buffer_make(&s->w[r], (size_t)B * s->K * 4);
    float* w = (float*)s->w[r].data;
    for (int64_t i = 0; i < (int64_t)B * s->K; i++) w[i] = (float)(next_random() % 1000) / 256.0f;
    if (s->isize > 1) { /* finite payloads: f32 small multiples of 1/64; 16-bit types with the top exponent bit clear */
        for (int64_t i = 0; i < B * s->H; i++) {
            if (s->isize == 4) ((float*)s->x[r].data)[i] = (float)((int)(next_random() % 2001) - 1000) / 64.0f;
            else ((uint16_t*)s->x[r].data)[i] &= 0xBFFF;
        }
    }
    if (s->fp8 && s->fp8Source == epFP8PassThrough) buffer_make(&s->scalesIn[r], (size_t)B * s->scaleWords * 4);
    else buffer_make(&s->scalesIn[r], 0);
    buffer_make(&s->y[r], (size_t)B * s->H * s->esize);
    buffer_make(&s->gradOut[r], (size_t)B * s->K * 4);
}

#include "abi_fuzz_model.h"
/* ---------------------------------------------------------------------------------------- */
/* Calls                                                                                    */

typedef enum { CALL_UPDATE, CALL_DISPATCH, CALL_COMBINE } CallKind;

/* Everything one rank passes to one data call. */
typedef struct {
    epUpdateInputs_t update;
    epUpdateConfig_t updateConfig;
    epDispatchInputs_t din;
    epDispatchOutputs_t dout;
    epDispatchConfig_t dconfig;
    epCombineInputs_t cin;
    epCombineOutputs_t cout;
    epCombineConfig_t cconfig;
    epLayoutInfo_t info;
    int infoGiven;
    int direction;
    /* dispatch: the outputs' arguments (their copies from before the call) */
    const Arg *recvArg, *idxArg, *wArg, *scalesArg;
} RankCall;

static void layout_info_struct(State* s, int r, epLayoutInfo_t* info) {
    memset(info, 0, sizeof *info);
    info->structSize = sizeof *info;
    int64_t* base = s->counters[r];
    info->expertCounters = base;
    info->expertOffsets = base + s->L;
    info->sourceRankCounters = base + 2 * s->L;
    info->expertSourceCounters = base + 2 * s->L + s->R;
    for (int64_t i = 0; i < layout_array_len(s); i++) base[i] = -77;
    info->receivedTotal = -77;
    info->droppedTokens = -77;
}

static int layout_info_untouched(const State* s, int r, const epLayoutInfo_t* info) {
    for (int64_t i = 0; i < layout_array_len(s); i++)
        if (s->counters[r][i] != -77) return 0;
    return info->receivedTotal == -77 && info->droppedTokens == -77;
}

/* Fills rank r's structs for `kind`; `direction` for dispatch/combine. */
static void prepare(Reader* in, State* s, ArgList* list, RankCall* c, int r, CallKind kind, int direction) {
    memset(c, 0, sizeof *c);
    int B = s->tokens[r];
    int64_t xs[2] = {B, s->H}, ks[2] = {B, s->K}, ss[2] = {B, s->scaleWords};
    c->direction = direction;
    uint8_t structByte = u8(in);
    switch (kind) {
    case CALL_UPDATE:
        c->update.structSize = sizeof c->update;
        c->update.topkIdx = arg(in, list, &s->idx[r], s->idxDtype[r], 2, ks, 0, r);
        c->updateConfig = (epUpdateConfig_t){sizeof(epUpdateConfig_t), epLaunchSingle, NULL};
        break;
    case CALL_DISPATCH:
        c->din.structSize = sizeof c->din;
        c->din.tokens = arg(in, list, &s->x[r], s->inputType[r], 2, xs, 0, r);
        if (s->routingNdim > 0 || (structByte & 1)) c->din.topkWeights = arg(in, list, &s->w[r], epFloat32, 2, ks, 0, r);
        if (s->fp8 && s->fp8Source == epFP8PassThrough) c->din.scales = arg(in, list, &s->scalesIn[r], s->scaleType, 2, ss, 0, r);
        c->dout.structSize = sizeof c->dout;
        c->recvArg = &list->args[list->count];
        c->dout.tokens = arg(in, list, &s->recv[r], s->recvType[r], s->recvNdim, s->recvShape, 1, r);
        if (s->routingNdim > 0) {
            c->idxArg = &list->args[list->count];
            c->dout.topkIdx = arg(in, list, &s->recvIdx[r], s->recvIdxDtype[r], s->routingNdim, s->routingShape, 1, r);
            c->wArg = &list->args[list->count];
            c->dout.topkWeights = arg(in, list, &s->recvW[r], epFloat32, s->routingNdim, s->routingShape, 1, r);
        }
        if (s->fp8) {
            c->scalesArg = &list->args[list->count];
            c->dout.scales = arg(in, list, &s->recvScales[r], s->scaleType, s->scalesNdim, s->scalesShape, 1, r);
        }
        if (!(structByte & 2)) {
            layout_info_struct(s, r, &c->info);
            c->dout.layoutInfo = &c->info;
            c->infoGiven = 1;
        }
        c->dconfig = (epDispatchConfig_t){sizeof(epDispatchConfig_t), (epPassDirection_t)direction, epLaunchSingle, NULL, epPhaseWhole};
        break;
    case CALL_COMBINE: {
        c->cin.structSize = sizeof c->cin;
        c->cin.expertOutputs = arg(in, list, expert_outputs(s, r), s->elementType, s->recvNdim, s->recvShape, 0, r);
        int forward = direction == epForward;
        if (forward && s->layout == epLayoutExpertMajor) c->cin.topkWeights = arg(in, list, &s->w[r], epFloat32, 2, ks, 0, r);
        if (forward && s->layout == epLayoutExpertMajorPadded) c->cin.topkWeights = arg(in, list, &s->recvW[r], epFloat32, 1, s->routingShape, 0, r);
        if (!forward && s->algorithm == epAlgorithmHighThroughput) {
            c->cin.weightGradients = arg(in, list, &s->gradIn[r], epFloat32, s->routingNdim, s->routingShape, 0, r);
        }
        c->cout.structSize = sizeof c->cout;
        c->cout.tokens = arg(in, list, &s->y[r], s->elementType, 2, xs, 1, r);
        if (!forward && s->algorithm == epAlgorithmHighThroughput)
            c->cout.topkWeightGradients = arg(in, list, &s->gradOut[r], epFloat32, 2, ks, 1, r);
        c->cconfig = (epCombineConfig_t){sizeof(epCombineConfig_t), (epPassDirection_t)direction, epLaunchSingle, NULL, epPhaseWhole};
        break;
    }
    }
    if (structByte >= 240 && (!per_rank_args || known_bugs)) { /* a broken struct or config */
        list->mutated = 1;
        size_t bad = (structByte & 1) ? 8 : 0;
        switch ((structByte >> 1) & 3) {
        case 0: c->update.structSize = c->din.structSize = c->cin.structSize = bad; break;
        case 1: c->dout.structSize = c->cout.structSize = bad; break;
        case 2: c->updateConfig.launchMode = (epLaunchMode_t)7; c->dconfig.direction = c->cconfig.direction = (epPassDirection_t)5; break;
        case 3: c->updateConfig.structSize = c->dconfig.structSize = c->cconfig.structSize = bad + 4; c->info.structSize = bad; break;
        }
    }
}

/* The checks every data call shares; `ranks` says whose arguments were read (bit r). */
static void check_call(const char* name, State* s, ArgList* list, RankCall* calls, int ncalls, epResult_t rc,
                       const char* message, uint64_t writtenRanks) {
    check_status(name, rc, message);
    for (int i = 0; i < list->count; i++) {
        Arg* a = &list->args[i];
        if (!a->output && arg_changed(a)) FAIL("%s wrote into an input of rank %d (argument %d)", name, a->rank, i);
        if (a->output && rc != epSuccess && arg_changed(a)) FAIL("%s -> %s wrote into an output of rank %d (argument %d): %s", name, epGetErrorString(rc), a->rank, i, message);
        if (a->output && rc == epSuccess && !(writtenRanks >> a->rank & 1) && arg_changed(a))
            FAIL("%s wrote into the output of rank %d, which took no part", name, a->rank);
    }
    for (int r = 0; r < ncalls; r++) {
        if (!calls[r].infoGiven || calls[r].info.structSize != sizeof(epLayoutInfo_t)) continue;
        int written = !layout_info_untouched(s, r, &calls[r].info);
        if (written && rc != epSuccess) FAIL("%s -> %s wrote rank %d's layout info", name, epGetErrorString(rc), r);
        if (written && !(writtenRanks >> r & 1)) FAIL("%s wrote the layout info of rank %d, which took no part", name, r);
    }
}

/* Records a successful update of `m` from the current routing buffers. */
static void step_record(State* s, StepModel* m, int known) {
    m->valid = 1;
    m->known = known;
    m->maybeVoid = 0;
    m->dispatched = 0;
    m->mask = s->mask;
    for (int r = 0; r < s->R; r++) {
        m->tokens[r] = (s->mask >> r & 1) ? s->tokens[r] : 0;
        free(m->idx[r]);
        m->idx[r] = malloc((size_t)m->tokens[r] * s->K * 8 + 8);
        for (int64_t i = 0; i < (int64_t)m->tokens[r] * s->K; i++) m->idx[r][i] = read_index(s, r, i);
    }
}

/* Whether an update of the current routing buffers (every entry right) must fail with epOverflow. */
static int update_overflows(State* s) {
    if (s->algorithm != epAlgorithmHighThroughput || s->overflow != epOverflowFail) return 0;
    StepModel m;
    memset(&m, 0, sizeof m);
    step_record(s, &m, 1);
    Plan p;
    plan_build(s, &m, &p);
    int overflow = p.overflow;
    plan_free(&p);
    for (int r = 0; r < s->R; r++) free(m.idx[r]);
    return overflow;
}

/* The outputs of an accepted dispatch or combine of the known step `m`; `right`: every argument
 * was the model's own buffer (else only the layout info is checked). */
static void check_outputs(State* s, StepModel* m, CallKind kind, RankCall* calls, int right, uint64_t ranks) {
    Plan p;
    plan_build(s, m, &p);
    if (p.overflow) FAIL("an overflowing step (fail policy) was accepted");
    for (int d = 0; d < s->R; d++) {
        if (!(m->mask >> d & 1) || !(ranks >> d & 1)) continue;
        if (kind == CALL_DISPATCH) {
            Received got = {0};
            got.info = calls[d].infoGiven && calls[d].info.structSize == sizeof(epLayoutInfo_t) ? &calls[d].info : NULL;
            if (right) {
                got.recv = s->recv[d].data; got.recvBefore = calls[d].recvArg->before;
                got.idx = s->recvIdx[d].data; got.w = s->recvW[d].data; got.idxDtype = s->recvIdxDtype[d];
                if (calls[d].idxArg) { got.idxBefore = calls[d].idxArg->before; got.wBefore = calls[d].wArg->before; }
                if (calls[d].scalesArg) { got.scales = s->recvScales[d].data; got.scalesBefore = calls[d].scalesArg->before; }
            }
            check_dispatch(s, m, &p, d, &got);
        } else if (right && s->elementType != epUInt8) {
            const uint8_t *eo[MAX_R], *weights[MAX_R], *gradients[MAX_R];
            for (int r = 0; r < s->R; r++) {
                eo[r] = expert_outputs(s, r)->data;
                weights[r] = s->layout == epLayoutExpertMajor ? s->w[r].data : s->recvW[r].data;
                gradients[r] = s->gradIn[r].data;
            }
            check_combine(s, m, &p, d, calls[d].direction == epForward, eo, weights, gradients, s->y[d].data, s->gradOut[d].data);
        }
    }
    plan_free(&p);
}

/* What the model says of a call's outcome, and its update after it. */
static void model_after(State* s, StepModel* m, CallKind kind, epResult_t rc, int allRight, const char* name,
                        const char* message, RankCall* calls) {
    int floating = s->elementType != epUInt8;
    if (kind == CALL_UPDATE) {
        if (allRight) {
            int overflow = update_overflows(s);
            if (rc == epSuccess && overflow && s->mask) FAIL("%s accepted a routing that overflows a receive buffer (capacity %lld)", name, (long long)s->capacity);
            if (rc == epOverflow && !overflow) FAIL("%s -> epOverflow, but every buffer fits (capacity %lld): %s", name, (long long)s->capacity, message);
            if (rc != epSuccess && rc != epOverflow) FAIL("%s refused right arguments: %s", name, message);
        }
        if (rc == epSuccess) step_record(s, m, allRight);
        /* A refusal inside the step voids it; one of the call's structs or descriptors, found
         * before the step is reached, leaves it standing. Either is allowed. */
        else m->maybeVoid = 1;
        return;
    }
    /* (with every rank masked a call reads nothing and does nothing: accepted in any order) */
    if (rc == epSuccess && !m->valid && s->mask != 0) FAIL("%s accepted without a valid update (or after the mask changed)", name);
    if (rc == epSuccess && kind == CALL_COMBINE && !m->dispatched && s->mask != 0)
        FAIL("%s accepted without a dispatch of the step", name);
    if (rc == epSuccess) m->maybeVoid = 0;
    if (allRight && m->valid && m->known && !m->maybeVoid && rc != epSuccess && rc != epOverflow && rc != epTimeout && (kind != CALL_COMBINE || floating) &&
        (kind != CALL_COMBINE || m->dispatched))
        FAIL("%s refused right arguments: %s", name, message);
    if (rc == epSuccess && m->valid && m->known && (kind == CALL_DISPATCH || m->dispatched))
        check_outputs(s, m, kind, calls, allRight, ~0ull);
    if (rc == epSuccess && kind == CALL_DISPATCH) m->dispatched = 1;
}

/* The active ranks changed: a step updated before must be refused from now on (wrongOrder), the
 * group's own and the per-rank handles' alike. */
static void mask_changed(State* s) {
    s->groupStep.valid = 0;
    s->handleStep.valid = 0;
}

static void resync_mask(State* s) {
    uint64_t mask = 0;
    epResult_t rc = epGroupGetActiveRanks(s->group, &mask);
    if (rc == epSuccess) {
        if (mask != s->mask) mask_changed(s);
        s->mask = mask;
    }
}

/* A refused collective call leaves the active ranks as they were, but for one race: a rank whose
 * own arguments are refused never arrives where the others wait for it, and where the group's
 * timeout is shorter than its checks take (1e-9 s) their wait may end first, masking it as late;
 * the call still reports the refusal (the lowest rank's own error). With a timeout of 1 ms or
 * more, a refusal that changed the active ranks is a defect. */
static void after_refusal(State* s, const char* name) {
    uint64_t mask = 0;
    if (epGroupGetActiveRanks(s->group, &mask) != epSuccess || mask == s->mask) return;
    if (!(s->timeoutSeconds > 0 && s->timeoutSeconds < 1e-3))
        FAIL("%s was refused and changed the active ranks %llx -> %llx (timeout %g s)", name, (unsigned long long)s->mask,
             (unsigned long long)mask, s->timeoutSeconds);
    TRACE("%s: refused, and a rank waiting for the refused one timed out: active ranks %llx -> %llx", name,
          (unsigned long long)s->mask, (unsigned long long)mask);
    mask_changed(s);
    s->mask = mask;
}

/* A collective data call. */
static void collective(Reader* in, State* s, CallKind kind) {
    static const char* names[] = {"epGroupUpdateAll", "epGroupDispatchAll", "epGroupCombineAll"};
    current_op = names[kind];
    int direction = (u8(in) & 3) == 3 ? epBackward : epForward;
    if (kind == CALL_UPDATE)
        for (int r = 0; r < s->R; r++) make_routing(in, s, r);
    ArgList* list = calloc(1, sizeof *list);
    RankCall calls[MAX_R];
    for (int r = 0; r < s->R; r++) prepare(in, s, list, &calls[r], r, kind, direction);
    int allRight = !list->mutated;
    for (int r = 0; r < s->R; r++) if (s->tokens[r] > s->Bmax) allRight = 0;
    if (kind != CALL_UPDATE) /* the tokens must be the step's */
        for (int r = 0; r < s->R; r++) if (s->tokens[r] != s->groupStep.tokens[r] && (s->mask >> r & 1)) allRight = 0;
    if (kind == CALL_UPDATE) {
        for (int r = 0; r < s->R; r++)
            for (int i = 0; i < s->tokens[r] * s->K; i++) {
                int64_t e = read_index(s, r, i);
                if (e < -1 || e >= s->E) allRight = 0;
                for (int j = i - i % s->K; j < i; j++) if (e >= 0 && read_index(s, r, j) == e) allRight = 0;
            }
    }
    uint8_t arrayByte = u8(in);
    args_snapshot(list);
    epUpdateInputs_t update[MAX_R];
    epDispatchInputs_t din[MAX_R];
    epDispatchOutputs_t dout[MAX_R];
    epCombineInputs_t cin[MAX_R];
    epCombineOutputs_t cout[MAX_R];
    for (int r = 0; r < s->R; r++) {
        update[r] = calls[r].update; din[r] = calls[r].din; dout[r] = calls[r].dout; cin[r] = calls[r].cin; cout[r] = calls[r].cout;
    }
    int nullArray = arrayByte >= 250;
    if (nullArray) allRight = 0;
    epResult_t rc;
    switch (kind) {
    case CALL_UPDATE: rc = epGroupUpdateAll(s->group, nullArray ? NULL : update, (arrayByte & 1) ? NULL : &calls[0].updateConfig, NULL); break;
    case CALL_DISPATCH: rc = epGroupDispatchAll(s->group, din, nullArray ? NULL : dout, (arrayByte & 1) ? NULL : &calls[0].dconfig, NULL); break;
    default: rc = epGroupCombineAll(s->group, nullArray ? NULL : cin, cout, (arrayByte & 1) ? NULL : &calls[0].cconfig, NULL); break;
    }
    if ((arrayByte & 1) && direction == epBackward && kind != CALL_UPDATE) allRight = 0; /* NULL config: forward */
    const char* message = epGetLastErrorMessage();
    char copy[2048];
    snprintf(copy, sizeof copy, "%s", message);
    TRACE("%s(%s, mask %llx, tokens %d %d %d %d, right %d) -> %s %s", names[kind], direction ? "backward" : "forward",
          (unsigned long long)s->mask, s->tokens[0], s->tokens[1], s->tokens[2], s->tokens[3], allRight, epGetErrorString(rc), copy);
    if (s->groupDestroyed) {
        if (rc != epInvalidArgument) FAIL("%s on a destroyed group -> %s", names[kind], epGetErrorString(rc));
        check_status(names[kind], rc, copy);
    } else {
        check_call(names[kind], s, list, calls, s->R, rc, copy, s->mask);
        if (rc == epTimeout) resync_mask(s);
        else {
            if (rc != epSuccess) after_refusal(s, names[kind]);
            model_after(s, &s->groupStep, kind, rc, allRight, names[kind], copy, calls);
        }
    }
    args_free(list);
    free(list);
}

/* A stacked call (ABI v4: every rank's argument one part of one array), sometimes with one field
 * broken. Checked: a named status; inputs never written; a refused call writes no output. The
 * group's own step follows: an accepted dispatch updated and dispatched it (routing not
 * modelled); a refused one may have voided it (routing refused inside the update) or not. */
static uint8_t* arena(size_t bytes) {
    uint8_t* p = malloc(bytes ? bytes : 1);
    fill_random(p, bytes);
    return p;
}

/* Arenas copied before a call, to compare after it. */
typedef struct {
    const uint8_t* data[12];
    uint8_t* copy[12];
    size_t bytes[12];
    int count;
} Arenas;

static void arenas_add(Arenas* a, const uint8_t* data, size_t bytes) {
    a->data[a->count] = data;
    a->bytes[a->count] = bytes;
    a->copy[a->count] = malloc(bytes ? bytes : 1);
    memcpy(a->copy[a->count], data, bytes);
    a->count++;
}

/* 1 + the index of the first arena that changed; 0 when none did. Frees the copies. */
static int arenas_changed_free(Arenas* a) {
    int changed = 0;
    for (int i = 0; i < a->count; i++) {
        if (!changed && memcmp(a->copy[i], a->data[i], a->bytes[i]) != 0) changed = i + 1;
        free(a->copy[i]);
    }
    a->count = 0;
    return changed;
}

/* One way (`how` 0...4) to break an epStacked_t whose array holds `elements` elements. Another
 * type gets a fresh arena of the bytes that type claims (as arg() does for a mutated descriptor:
 * a call that accepts the type reads and writes inside its arena, and ASan sees anything beyond);
 * it is returned, for the caller to check and free. */
static uint8_t* break_stacked(epStacked_t* f, int how, uint8_t which, int64_t elements) {
    switch (how) {
    case 0:
        f->dtype = (epDataType_t)((f->dtype + 1 + which % 5) % 7);
        if (f->data == NULL) return NULL;
        f->data = arena((size_t)elements * dtype_size(f->dtype));
        return f->data;
    case 1: f->device = (which & 1) ? 0 : -2; break;
    case 2: f->rankStride = (which & 1) ? 4 : -8; break;
    case 3: f->data = (uint8_t*)f->data + 1; break;
    default: f->data = NULL; break;
    }
    return NULL;
}

/* The checks every stacked call gets: a named status, inputs never written, a refusal writes no output. */
static void check_stacked(const char* name, epResult_t rc, const char* message, Arenas* ins, Arenas* outs) {
    check_status(name, rc, message);
    int wrote = arenas_changed_free(ins);
    if (wrote) FAIL("%s wrote input %d", name, wrote - 1);
    wrote = arenas_changed_free(outs);
    if (rc != epSuccess && wrote) FAIL("%s refused (%s) but wrote output %d", name, message, wrote - 1);
}

static void stacked(Reader* in, State* s, int combine) {
    const char* name = combine ? "epGroupCombineStacked" : "epGroupDispatchStacked";
    current_op = name;
    const int R = s->R, K = s->K;
    const int64_t H = s->H, Bmax = s->Bmax;
    uint8_t b = u8(in), breakByte = u8(in), which = u8(in);
    int64_t B = b % (Bmax + 1);
    const size_t es = s->esize;
    const epDataType_t element = (epDataType_t)s->elementType;
    const epDataType_t input = (epDataType_t)s->inputType[0], wire = (epDataType_t)s->recvType[0];
    const int64_t recvElems = elements_of(s->recvNdim, s->recvShape), routingElems = s->routingNdim ? elements_of(s->routingNdim, s->routingShape) : 0;
    const int64_t scalesElems = s->fp8 ? elements_of(s->scalesNdim, s->scalesShape) : 0;
    const int passThrough = s->fp8 && s->fp8Source == epFP8PassThrough;
    /* The arenas: R parts each, exactly. */
    size_t idxBytes = (size_t)(R * B * K) * 4, xBytes = (size_t)(R * B * H) * s->isize, wBytes = (size_t)(R * Bmax * K) * 4;
    size_t recvBytes = (size_t)(R * recvElems) * s->wsize, routingBytes = (size_t)(R * routingElems) * 4, countBytes = (size_t)(R * s->L) * 4;
    size_t outBytes = (size_t)(R * Bmax * H) * es, slotWBytes = (size_t)(R * s->capacity) * 4, eoBytes = (size_t)(R * recvElems) * es;
    size_t scalesBytes = passThrough ? (size_t)(R * B * s->scaleWords) * 4 : 0, recvScalesBytes = (size_t)(R * scalesElems) * 4;
    uint8_t *idx = arena(idxBytes), *x = arena(xBytes), *w = arena(wBytes), *recv = arena(recvBytes), *ridx = arena(routingBytes);
    uint8_t *rw = arena(routingBytes), *counts = arena(countBytes), *out = arena(outBytes), *slotW = arena(slotWBytes);
    uint8_t *eo = arena(eoBytes), *scales = arena(scalesBytes), *recvScales = arena(recvScalesBytes);
    for (int64_t t = 0; t < R * B; t++) { /* distinct experts per row, in range */
        int start = (int)(next_random() % (uint64_t)s->E);
        for (int c = 0; c < K; c++) ((int32_t*)idx)[t * K + c] = (start + c) % s->E;
    }
    for (size_t i = 0; i < wBytes / 4; i++) ((float*)w)[i] = 0.25f;
    for (size_t i = 0; i < slotWBytes / 4; i++) ((float*)slotW)[i] = 0.5f;
    const int mutated = breakByte >= 200;
    Arenas ins = {0}, outs = {0};
    uint8_t* fresh = NULL;   /* a broken field's own arena (another type) */
    epResult_t rc;
    if (!combine) {
        epStackedDispatch_t d;
        memset(&d, 0, sizeof d);
        d.structSize = sizeof d;
        d.tokens = B;
        d.topkIdx = (epStacked_t){idx, epInt32, -1, 0};
        d.inputTokens = (epStacked_t){x, input, -1, 0};
        d.topkWeights = (epStacked_t){w, epFloat32, -1, (int64_t)Bmax * K * 4};
        d.receivedTokens = (epStacked_t){recv, wire, -1, 0};
        if (passThrough) d.scales = (epStacked_t){scales, (epDataType_t)s->scaleType, -1, 0};
        if (s->fp8) d.receivedScales = (epStacked_t){recvScales, (epDataType_t)s->scaleType, -1, 0};
        if (s->routingNdim) {
            d.receivedTopkIdx = (epStacked_t){ridx, epInt32, -1, 0};
            d.receivedTopkWeights = (epStacked_t){rw, epFloat32, -1, 0};
        }
        d.expertCounts = (epStacked_t){counts, epInt32, -1, 0};
        if (mutated) {
            epStacked_t* fields[] = {&d.topkIdx, &d.inputTokens, &d.topkWeights, &d.receivedTokens, &d.expertCounts};
            const int64_t elements[] = {R * B * K, R * B * H, R * Bmax * K, R * recvElems, (int64_t)R * s->L};
            int how = breakByte % 8, field = which % 5;
            if (how < 5 && (fresh = break_stacked(fields[field], how, which, elements[field])) != NULL)
                arenas_add(field < 3 ? &ins : &outs, fresh, (size_t)elements[field] * dtype_size(fields[field]->dtype));
            else if (how == 5) d.tokens = (which & 1) ? Bmax + 1 : (int64_t)1 << 40;
            else if (how == 6) d.structSize = (which & 1) ? 8 : sizeof d + 8;
            else d.direction = (epPassDirection_t)7;
        }
        arenas_add(&ins, idx, idxBytes);
        arenas_add(&ins, x, xBytes);
        arenas_add(&ins, w, wBytes);
        arenas_add(&ins, scales, scalesBytes);
        arenas_add(&outs, recvScales, recvScalesBytes);
        arenas_add(&outs, recv, recvBytes);
        arenas_add(&outs, ridx, routingBytes);
        arenas_add(&outs, rw, routingBytes);
        arenas_add(&outs, counts, countBytes);
        rc = epGroupDispatchStacked(s->group, &d, NULL);
    } else {
        epStackedCombine_t c;
        memset(&c, 0, sizeof c);
        c.structSize = sizeof c;
        c.expertOutputs = (epStacked_t){eo, element, -1, 0};
        c.combinedTokens = (epStacked_t){out, element, -1, (int64_t)(Bmax * H * (int64_t)es)};
        if (s->layout == epLayoutExpertMajor) c.topkWeights = (epStacked_t){w, epFloat32, -1, (int64_t)Bmax * K * 4};
        if (s->layout == epLayoutExpertMajorPadded) c.topkWeights = (epStacked_t){slotW, epFloat32, -1, 0};
        if (mutated) {
            epStacked_t* fields[] = {&c.expertOutputs, &c.combinedTokens, &c.topkWeights};
            const int64_t elements[] = {R * recvElems, R * Bmax * H, s->layout == epLayoutExpertMajor ? R * Bmax * K : (int64_t)R * s->capacity};
            int how = breakByte % 6, field = which % 3;
            if (how < 5 && (fresh = break_stacked(fields[field], how, which, elements[field])) != NULL)
                arenas_add(field == 1 ? &outs : &ins, fresh, (size_t)elements[field] * dtype_size(fields[field]->dtype));
            else c.structSize = 8;
        }
        arenas_add(&ins, eo, eoBytes);
        arenas_add(&ins, w, wBytes);
        arenas_add(&ins, slotW, slotWBytes);
        arenas_add(&outs, out, outBytes);
        rc = epGroupCombineStacked(s->group, &c, NULL);
    }
    const char* message = epGetLastErrorMessage();
    TRACE("%s(B %lld, broken %d) -> %s %s", name, (long long)B, mutated, epGetErrorString(rc), message);
    check_stacked(name, rc, message, &ins, &outs);
    if (!s->groupDestroyed && rc != epSuccess && rc != epTimeout) after_refusal(s, name);
    if (s->groupDestroyed) {
        if (rc != epInvalidArgument) FAIL("%s on a destroyed group -> %s", name, epGetErrorString(rc));
    } else if (rc == epTimeout) {
        resync_mask(s);
    } else if (!combine) {
        if (!mutated && rc != epSuccess && rc != epOverflow && rc != epInactiveRank) FAIL("%s refused right arguments: %s", name, message);
        StepModel* m = &s->groupStep;
        if (rc == epSuccess) { /* the step's routing: the arena's (later calls on the step are checked against it) */
            m->valid = 1; m->known = !mutated; m->maybeVoid = 0; m->dispatched = 1; m->mask = s->mask;
            for (int r = 0; r < R; r++) {
                m->tokens[r] = (s->mask >> r & 1) ? (int)B : 0;
                free(m->idx[r]);
                m->idx[r] = malloc((size_t)(B * K) * 8 + 8);
                for (int64_t i = 0; i < B * K; i++) m->idx[r][i] = ((const int32_t*)idx)[r * B * K + i];
            }
        } else {
            m->maybeVoid = 1;
        }
    }
    free(idx); free(x); free(w); free(recv); free(ridx); free(rw); free(counts); free(out); free(slotW); free(fresh);
    free(eo); free(scales); free(recvScales);
}

/* Per-rank handle calls: one thread per rank, each on its own handle. */
typedef struct {
    epHandle_t handle;
    CallKind kind;
    RankCall* call;
    epResult_t rc;
    char message[1024];
} RankThread;

static void* rank_thread(void* argument) {
    RankThread* t = argument;
    RankCall* c = t->call;
    switch (t->kind) {
    case CALL_UPDATE: t->rc = epHandleUpdate(t->handle, &c->update, &c->updateConfig, NULL); break;
    case CALL_DISPATCH: t->rc = epDispatch(t->handle, &c->din, &c->dout, &c->dconfig, NULL); break;
    default: t->rc = epCombine(t->handle, &c->cin, &c->cout, &c->cconfig, NULL); break;
    }
    snprintf(t->message, sizeof t->message, "%s", epGetLastErrorMessage());
    return NULL;
}

static void per_rank(Reader* in, State* s, CallKind kind) {
    static const char* names[] = {"epHandleUpdate", "epDispatch", "epCombine"};
    current_op = names[kind];
    if (s->handlesDestroyed) return;
    for (int r = 0; r < s->R; r++) {
        if (s->handles[r]) continue;
        epResult_t rc = epHandleCreate(s->group, r, &s->handles[r]);
        check_status("epHandleCreate", rc, epGetLastErrorMessage());
        if (rc != epSuccess) { if (!s->groupDestroyed) FAIL("epHandleCreate(rank %d) -> %s", r, epGetLastErrorMessage()); return; }
    }
    int direction = (u8(in) & 3) == 3 ? epBackward : epForward;
    if (kind == CALL_UPDATE)
        for (int r = 0; r < s->R; r++) make_routing(in, s, r);
    ArgList* list = calloc(1, sizeof *list);
    RankCall calls[MAX_R];
    RankThread threads[MAX_R];
    pthread_t ids[MAX_R];
    per_rank_args = 1;
    for (int r = 0; r < s->R; r++) prepare(in, s, list, &calls[r], r, kind, direction);
    per_rank_args = 0;
    args_snapshot(list);
    for (int r = 0; r < s->R; r++) {
        threads[r] = (RankThread){s->handles[r], kind, &calls[r], epSuccess, ""};
        if (pthread_create(&ids[r], NULL, rank_thread, &threads[r]) != 0) FAIL("pthread_create");
    }
    for (int r = 0; r < s->R; r++) pthread_join(ids[r], NULL);
    for (int r = 0; r < s->R; r++) TRACE("%s rank %d -> %s %s", names[kind], r, epGetErrorString(threads[r].rc), threads[r].message);
    /* Each rank's own checks; a rank's outputs may be written only when its call succeeded. */
    int allOk = 1;
    uint64_t succeeded = 0;
    for (int r = 0; r < s->R; r++) {
        check_status(names[kind], threads[r].rc, threads[r].message);
        if (threads[r].rc == epSuccess) succeeded |= 1ull << r;
        else allOk = 0;
        if (threads[r].rc == epTimeout) allOk = 0;
    }
    for (int i = 0; i < list->count; i++) {
        Arg* a = &list->args[i];
        if (!a->output && arg_changed(a)) FAIL("%s wrote into an input of rank %d", names[kind], a->rank);
        if (a->output && !(succeeded >> a->rank & 1) && arg_changed(a))
            FAIL("%s -> %s wrote into an output of rank %d: %s", names[kind], epGetErrorString(threads[a->rank].rc), a->rank, threads[a->rank].message);
    }
    for (int r = 0; r < s->R; r++)
        if (calls[r].infoGiven && calls[r].info.structSize == sizeof(epLayoutInfo_t) && !(succeeded >> r & 1) &&
            !layout_info_untouched(s, r, &calls[r].info))
            FAIL("%s -> %s wrote rank %d's layout info", names[kind], epGetErrorString(threads[r].rc), r);
    /* The handles' step: valid only when every active rank's update succeeded. */
    int anyTimeout = 0;
    for (int r = 0; r < s->R; r++) anyTimeout |= threads[r].rc == epTimeout;
    if (anyTimeout && !s->groupDestroyed) resync_mask(s);
    if (kind == CALL_UPDATE) {
        uint64_t active = s->handleStep.mask;
        (void)active;
        if ((succeeded & s->mask) == s->mask && !anyTimeout && s->mask != 0) {
            step_record(s, &s->handleStep, !list->mutated);
        } else {
            s->handleStep.maybeVoid = 1;
        }
    } else if (succeeded & s->handleStep.mask) {
        if (!s->handleStep.valid) FAIL("%s accepted on a handle without a valid update", names[kind]);
        if (kind == CALL_COMBINE && !s->handleStep.dispatched) FAIL("%s accepted without a dispatch of the step", names[kind]);
        int whole = (succeeded & s->handleStep.mask) == s->handleStep.mask;
        if (s->handleStep.known && whole && (kind == CALL_DISPATCH || s->handleStep.dispatched))
            check_outputs(s, &s->handleStep, kind, calls, !list->mutated, succeeded);
        if (kind == CALL_DISPATCH) s->handleStep.dispatched = 1;
    }
    (void)allOk;
    args_free(list);
    free(list);
}

/* ---------------------------------------------------------------------------------------- */
/* Config                                                                                   */

#include "abi_fuzz_config.h"

/* ---------------------------------------------------------------------------------------- */
/* A config too large for its buffers (a bound)                                             */

/* A descriptor of `shape` over `data` with the strides of a row-major tensor, wrapping where they
 * pass 64 bits (then no longer a contiguous tensor's: the library must refuse it). */
static epTensor_t huge_tensor(void* data, int dtype, int ndim, const int64_t* shape) {
    epTensor_t t = epMakeTensor(data, (epDataType_t)dtype, 0, shape, -1);
    t.ndim = ndim;
    uint64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) { t.sizes[i] = shape[i]; t.strides[i] = (int64_t)stride; stride *= (uint64_t)shape[i]; }
    return t;
}

/* Address space for a tensor of `shape` that nothing may touch (PROT_NONE: any access is a
 * crash), or NULL where its bytes pass 2^42 (or 2^63: the library must refuse it). */
static void* untouchable(int dtype, int ndim, const int64_t* shape, size_t* reserved) {
    unsigned __int128 bytes = dtype_size(dtype);
    for (int i = 0; i < ndim; i++) bytes *= (unsigned __int128)(shape[i] < 0 ? 0 : shape[i]);
    *reserved = 0;
    if (bytes == 0 || bytes > ((unsigned __int128)1 << 42)) return NULL;
    void* p = mmap(NULL, (size_t)bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *reserved = (size_t)bytes;
    return p;
}

/* An update of no tokens, then its dispatch and combine with every output of its right shape (the
 * receive buffer's: up to 2^62 rows of 2^31 elements) over address space that nothing may touch:
 * a step of no rows reads and writes no row, so the calls succeed without touching them (a crash
 * otherwise), or refuse a tensor too large to address (epInvalidArgument). */
static void empty_step(State* s, const epGroupInfo_t* info) {
    const int R = info->ranks, K = info->topK;
    int fp8 = info->fp8Scales, passThrough = fp8 && info->fp8Source == epFP8PassThrough;
    int64_t none[2] = {0, K}, rows[2] = {0, info->hidden}, words[2] = {0, fp8 ? fp8_scale_words(fp8, info->hidden) : 0};
    int scaleType = fp8 == epFP8Float32Block128 ? epFloat32 : epInt32;
    epTensor_t idx[MAX_R], x[MAX_R], w[MAX_R], sc[MAX_R], y[MAX_R], out[MAX_R][5];
    void* space[MAX_R][5];
    size_t spaceBytes[MAX_R][5];
    epUpdateInputs_t up[MAX_R];
    epDispatchInputs_t din[MAX_R];
    epDispatchOutputs_t dout[MAX_R];
    epCombineInputs_t cin[MAX_R];
    epCombineOutputs_t cout[MAX_R];
    int ll = info->algorithm == epAlgorithmLowLatency, em = info->layout == epLayoutExpertMajor, padded = info->layout == epLayoutExpertMajorPadded;
    int rn = info->receiveRoutingNdim, reserved = 1;
    const int types[5] = {info->receiveElementType, epInt32, epFloat32, scaleType, info->elementType};
    const int ndims[5] = {info->receiveNdim, rn, rn, info->receiveScalesNdim, info->receiveNdim};
    const int64_t* shapes[5] = {info->receiveShape, info->receiveRoutingShape, info->receiveRoutingShape, info->receiveScalesShape, info->receiveShape};
    for (int r = 0; r < R; r++) {
        idx[r] = epMakeTensor(NULL, epInt32, 2, none, -1);
        x[r] = epMakeTensor(NULL, (epDataType_t)(passThrough ? epFloat8E4M3 : info->elementType), 2, rows, -1);
        w[r] = epMakeTensor(NULL, epFloat32, 2, none, -1);
        sc[r] = epMakeTensor(NULL, (epDataType_t)scaleType, 2, words, -1);
        y[r] = epMakeTensor(NULL, (epDataType_t)info->elementType, 2, rows, -1);
        /* received tokens, topkIdx, topkWeights, scales; expert outputs */
        for (int i = 0; i < 5; i++) {
            space[r][i] = ndims[i] ? untouchable(types[i], ndims[i], shapes[i], &spaceBytes[r][i]) : NULL;
            if (ndims[i] && !space[r][i]) reserved = 0;
            out[r][i] = huge_tensor(space[r][i], types[i], ndims[i], shapes[i]);
        }
        up[r] = (epUpdateInputs_t){sizeof up[r], &idx[r]};
        din[r] = (epDispatchInputs_t){sizeof din[r], &x[r], ll && em ? NULL : &w[r], passThrough ? &sc[r] : NULL};
        memset(&dout[r], 0, sizeof dout[r]);
        dout[r].structSize = sizeof dout[r];
        dout[r].tokens = &out[r][0];
        if (rn) { dout[r].topkIdx = &out[r][1]; dout[r].topkWeights = &out[r][2]; }
        if (fp8) dout[r].scales = &out[r][3];
        cin[r] = (epCombineInputs_t){sizeof cin[r], &out[r][4], ll && em ? &w[r] : padded ? &out[r][2] : NULL, NULL};
        cout[r] = (epCombineOutputs_t){sizeof cout[r], &y[r], NULL};
    }
    current_op = "epGroupUpdateAll (no tokens)";
    epResult_t rc = epGroupUpdateAll(s->group, up, NULL, NULL);
    check_status("epGroupUpdateAll", rc, epGetLastErrorMessage());
    if (rc != epSuccess && rc != epTimeout) FAIL("an update of no tokens -> %s: %s", epGetErrorString(rc), epGetLastErrorMessage());
    if (rc == epSuccess && reserved) {
        current_op = "epGroupDispatchAll (no tokens)";
        rc = epGroupDispatchAll(s->group, din, dout, NULL, NULL);
        TRACE("epGroupDispatchAll(no tokens, huge outputs) -> %s %s", epGetErrorString(rc), epGetLastErrorMessage());
        check_status("epGroupDispatchAll", rc, epGetLastErrorMessage());
        if (rc != epSuccess && rc != epInvalidArgument && rc != epTimeout) FAIL("a dispatch of no tokens -> %s: %s", epGetErrorString(rc), epGetLastErrorMessage());
        if (rc == epSuccess && info->elementType != epUInt8) {
            current_op = "epGroupCombineAll (no tokens)";
            rc = epGroupCombineAll(s->group, cin, cout, NULL, NULL);
            TRACE("epGroupCombineAll(no tokens, huge inputs) -> %s %s", epGetErrorString(rc), epGetLastErrorMessage());
            check_status("epGroupCombineAll", rc, epGetLastErrorMessage());
            if (rc != epSuccess && rc != epInvalidArgument && rc != epTimeout) FAIL("a combine of no tokens -> %s: %s", epGetErrorString(rc), epGetLastErrorMessage());
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 5; i++) if (space[r][i]) munmap(space[r][i], spaceBytes[r][i]);
}

/* Address space for a tensor of `shape` whose untouched pages cost nothing (zeros), or NULL past 2^42 bytes. */
static void* sparse(int dtype, int ndim, const int64_t* shape, size_t* reserved) {
    unsigned __int128 bytes = dtype_size(dtype);
    for (int i = 0; i < ndim; i++) bytes *= (unsigned __int128)(shape[i] < 0 ? 0 : shape[i]);
    *reserved = 0;
    if (bytes == 0 || bytes > ((unsigned __int128)1 << 42)) return NULL;
    void* p = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *reserved = (size_t)bytes;
    return p;
}

/* A step of a few tokens on a bound config (Bmax, hidden or capacity at its largest) whose
 * receive buffers are sparse reservations: the rows land in zones up to terabytes apart. Checked
 * against the model: the layout info, every received row, and the combine (the received rows as
 * the expert outputs) bit for bit. Not FP8 nor uint8 (one format is enough here). */
static void sparse_step(epGroup_t group, const epGroupConfig_t* c, const epGroupInfo_t* info) {
    if (info->fp8Scales || info->elementType == epUInt8 || info->experts > 65536 || info->hidden > 4096) return;
    State* s = calloc(1, sizeof *s);
    s->algorithm = info->algorithm; s->layout = info->layout; s->R = info->ranks; s->E = info->experts; s->L = info->localExperts;
    s->K = info->topK; s->H = info->hidden; s->elementType = info->elementType; s->esize = s->isize = s->wsize = dtype_size(info->elementType);
    s->Bmax = info->maxTokensPerRank; s->capacity = info->receiveCapacity; s->overflow = c->overflow;
    s->alignment = info->alignment < 1 ? 1 : info->alignment; s->routingNdim = info->receiveRoutingNdim;
    s->all = s->mask = s->R == 64 ? ~0ull : (1ull << s->R) - 1;
    const int R = s->R, K = s->K;
    const int64_t B = s->Bmax < 3 ? s->Bmax : 3, H = s->H;
    epTensor_t ti[MAX_R], tx[MAX_R], tw[MAX_R], tr[MAX_R], tri[MAX_R], trw[MAX_R], ty[MAX_R];
    epUpdateInputs_t up[MAX_R];
    epDispatchInputs_t din[MAX_R];
    epDispatchOutputs_t dout[MAX_R];
    epCombineInputs_t cin[MAX_R];
    epCombineOutputs_t cout[MAX_R];
    epLayoutInfo_t li[MAX_R];
    void* space[MAX_R][3] = {{0}};
    size_t spaceBytes[MAX_R][3];
    int reserved = 1;
    int64_t ks[2] = {B, K}, xs[2] = {B, H};
    for (int r = 0; r < R; r++) {
        s->tokens[r] = (int)B;
        s->idxDtype[r] = epInt32;
        buffer_make(&s->idx[r], (size_t)(B * K) * 4);
        for (int64_t t = 0; t < B; t++)
            for (int k = 0; k < K; k++) ((int32_t*)s->idx[r].data)[t * K + k] = (int32_t)((r * 5 + t * 3 + k) % s->E);
        buffer_make(&s->x[r], (size_t)(B * H) * s->esize);
        for (int64_t i = 0; i < B * H; i++) {
            if (s->esize == 4) ((float*)s->x[r].data)[i] = (float)((int)(next_random() % 2001) - 1000) / 64.0f;
            else ((uint16_t*)s->x[r].data)[i] &= 0xBFFF;
        }
        buffer_make(&s->w[r], (size_t)(B * K) * 4);
        for (int64_t i = 0; i < B * K; i++) ((float*)s->w[r].data)[i] = (float)(next_random() % 1000) / 256.0f;
        buffer_make(&s->y[r], (size_t)(B * H) * s->esize);
        space[r][0] = sparse(s->elementType, info->receiveNdim, info->receiveShape, &spaceBytes[r][0]);
        if (s->routingNdim) {
            space[r][1] = sparse(epInt32, s->routingNdim, info->receiveRoutingShape, &spaceBytes[r][1]);
            space[r][2] = sparse(epFloat32, s->routingNdim, info->receiveRoutingShape, &spaceBytes[r][2]);
            if (!space[r][1] || !space[r][2]) reserved = 0;
        }
        if (!space[r][0]) reserved = 0;
        ti[r] = epMakeTensor(s->idx[r].data, epInt32, 2, ks, -1);
        tx[r] = epMakeTensor(s->x[r].data, (epDataType_t)s->elementType, 2, xs, -1);
        tw[r] = epMakeTensor(s->w[r].data, epFloat32, 2, ks, -1);
        ty[r] = epMakeTensor(s->y[r].data, (epDataType_t)s->elementType, 2, xs, -1);
        tr[r] = huge_tensor(space[r][0], s->elementType, info->receiveNdim, info->receiveShape);
        tri[r] = huge_tensor(space[r][1], epInt32, s->routingNdim, info->receiveRoutingShape);
        trw[r] = huge_tensor(space[r][2], epFloat32, s->routingNdim, info->receiveRoutingShape);
        up[r] = (epUpdateInputs_t){sizeof up[r], &ti[r]};
        din[r] = (epDispatchInputs_t){sizeof din[r], &tx[r], &tw[r], NULL};
        memset(&dout[r], 0, sizeof dout[r]);
        dout[r].structSize = sizeof dout[r];
        dout[r].tokens = &tr[r];
        if (s->routingNdim) { dout[r].topkIdx = &tri[r]; dout[r].topkWeights = &trw[r]; }
        s->counters[r] = malloc((size_t)(layout_array_len(s) + 1) * 8);
        layout_info_struct(s, r, &li[r]);
        dout[r].layoutInfo = &li[r];
        cin[r] = (epCombineInputs_t){sizeof cin[r], &tr[r], s->layout == epLayoutExpertMajor ? &tw[r] : s->layout == epLayoutExpertMajorPadded ? &trw[r] : NULL, NULL};
        cout[r] = (epCombineOutputs_t){sizeof cout[r], &ty[r], NULL};
    }
    s->group = group;
    epResult_t rc = epTimeout;
    StepModel m = {0};
    Plan p = {0};
    if (reserved) {
        step_record(s, &m, 1);
        plan_build(s, &m, &p);
        current_op = "epGroupUpdateAll (sparse)";
        rc = epGroupUpdateAll(group, up, NULL, NULL);
        TRACE("%s(B %lld) -> %s %s", current_op, (long long)B, epGetErrorString(rc), epGetLastErrorMessage());
        check_status("epGroupUpdateAll", rc, epGetLastErrorMessage());
        if (rc != epTimeout && rc != (p.overflow ? epOverflow : epSuccess))
            FAIL("-> %s, the model says %s: %s", epGetErrorString(rc), p.overflow ? "epOverflow" : "epSuccess", epGetLastErrorMessage());
    }
    if (rc == epSuccess) {
        current_op = "epGroupDispatchAll (sparse)";
        rc = epGroupDispatchAll(group, din, dout, NULL, NULL);
        TRACE("%s -> %s %s", current_op, epGetErrorString(rc), epGetLastErrorMessage());
        check_status("epGroupDispatchAll", rc, epGetLastErrorMessage());
        if (rc != epSuccess && rc != epTimeout) FAIL("refused right arguments: %s", epGetLastErrorMessage());
    }
    if (rc == epSuccess) {
        const int64_t rowBytes = H * (int64_t)s->esize;
        for (int d = 0; d < R; d++) {
            check_info(s, &p, d, &li[d]);
            for (int src = 0; src < R; src++)
                for (int t = 0; t < B; t++)
                    for (int k = 0; k < K; k++) {
                        int e = expert_of(s, &m, src, t, k);
                        if (e < 0 || e / s->L != d || p.pairRow[src][t * R + d] < 0) continue; /* (dropped) */
                        int64_t row = expert_major(s) ? p.selRow[src][t * K + k] : p.pairRow[src][t * R + d];
                        if (memcmp((const uint8_t*)space[d][0] + row * rowBytes, s->x[src].data + t * rowBytes, (size_t)rowBytes) != 0)
                            FAIL("rank %d: received row %lld is not token %d of rank %d", d, (long long)row, t, src);
                    }
        }
        current_op = "epGroupCombineAll (sparse)";
        rc = epGroupCombineAll(group, cin, cout, NULL, NULL);
        TRACE("%s -> %s %s", current_op, epGetErrorString(rc), epGetLastErrorMessage());
        check_status("epGroupCombineAll", rc, epGetLastErrorMessage());
        if (rc != epSuccess && rc != epTimeout) FAIL("refused right arguments: %s", epGetLastErrorMessage());
        const uint8_t *eo[MAX_R], *weights[MAX_R];
        for (int r = 0; r < R; r++) {
            eo[r] = space[r][0];
            weights[r] = s->layout == epLayoutExpertMajor ? s->w[r].data : space[r][2];
        }
        for (int r = 0; r < R && rc == epSuccess; r++) check_combine(s, &m, &p, r, 1, eo, weights, NULL, s->y[r].data, NULL);
    }
    plan_free(&p);
    for (int r = 0; r < R; r++) {
        free(m.idx[r]);
        for (int i = 0; i < 3; i++) if (space[r][i]) munmap(space[r][i], spaceBytes[r][i]);
        free_step_buffers(s, r);
        free(s->counters[r]);
    }
    free(s);
}

/* Created and asked (epGroupGetInfo was checked), then every call that needs no receive buffer:
 * status, mask, an update of a few tokens where the host's step metadata is small, a dispatch
 * without outputs (refused), layout info, deactivate and clean; then destroyed. */
static void info_only(State* s, const epGroupConfig_t* c, const epGroupInfo_t* info) {
    const int R = info->ranks, K = info->topK, E = info->experts;
    current_op = "epGroupCheckStatus";
    epResult_t rc = epGroupCheckStatus(s->group);
    check_status("epGroupCheckStatus", rc, epGetLastErrorMessage());
    if (rc != epSuccess) FAIL("epGroupCheckStatus: %s", epGetLastErrorMessage());
    current_op = "epGroupGetActiveRanks";
    uint64_t mask = 0, all = R == 64 ? ~0ull : (1ull << R) - 1;
    rc = epGroupGetActiveRanks(s->group, &mask);
    if (rc != epSuccess || mask != all) FAIL("epGroupGetActiveRanks -> %s, mask %llx", epGetErrorString(rc), (unsigned long long)mask);
    int64_t B = info->maxTokensPerRank < 2 ? info->maxTokensPerRank : 2;
    if (host_step_bytes(c, (double)B) <= 64.0 * (1 << 20)) {
        current_op = "epGroupUpdateAll";
        int32_t* idx = malloc((size_t)(R * B * K) * 4 + 4);
        epTensor_t tensors[MAX_R];
        epUpdateInputs_t updates[MAX_R];
        int64_t shape[2] = {B, K};
        for (int r = 0; r < R; r++) {
            for (int64_t t = 0; t < B; t++)
                for (int k = 0; k < K; k++) idx[(r * B + t) * K + k] = (int32_t)((r + t * 7 + k) % E);
            tensors[r] = epMakeTensor(idx + r * B * K, epInt32, 2, shape, -1);
            updates[r] = (epUpdateInputs_t){sizeof(epUpdateInputs_t), &tensors[r]};
        }
        rc = epGroupUpdateAll(s->group, updates, NULL, NULL);
        TRACE("epGroupUpdateAll(B %lld) -> %s %s", (long long)B, epGetErrorString(rc), epGetLastErrorMessage());
        check_status("epGroupUpdateAll", rc, epGetLastErrorMessage());
        int mayOverflow = info->algorithm == epAlgorithmHighThroughput && c->overflow == epOverflowFail;
        if (rc != epSuccess && !(rc == epOverflow && mayOverflow) && rc != epTimeout)
            FAIL("epGroupUpdateAll refused right arguments: %s", epGetLastErrorMessage());
        current_op = "epGroupDispatchAll";
        epDispatchInputs_t din[MAX_R];
        memset(din, 0, sizeof din);
        for (int r = 0; r < R; r++) din[r].structSize = sizeof din[r];
        rc = epGroupDispatchAll(s->group, din, NULL, NULL, NULL);
        check_status("epGroupDispatchAll", rc, epGetLastErrorMessage());
        if (rc != epInvalidArgument && rc != epTimeout) FAIL("epGroupDispatchAll without outputs -> %s", epGetErrorString(rc));
        free(idx);
        if (rc != epTimeout) empty_step(s, info);
        if (rc != epTimeout) sparse_step(s->group, c, info);
    }
    if (info->localExperts <= 65536) {
        current_op = "epGroupGetLayoutInfo";
        int64_t L = info->localExperts, n = 2 * L + R + L * R;
        int64_t* arrays = malloc((size_t)n * 8);
        epLayoutInfo_t li = {sizeof li, arrays, arrays + L, arrays + 2 * L, arrays + 2 * L + R, 0, 0};
        rc = epGroupGetLayoutInfo(s->group, R - 1, &li);
        check_status("epGroupGetLayoutInfo", rc, epGetLastErrorMessage());
        free(arrays);
    }
    current_op = "epGroupDeactivateRank";
    rc = epGroupDeactivateRank(s->group, R - 1);
    check_status("epGroupDeactivateRank", rc, epGetLastErrorMessage());
    if (rc != epSuccess) FAIL("epGroupDeactivateRank(%d): %s", R - 1, epGetLastErrorMessage());
    current_op = "epGroupCleanRanks";
    rc = epGroupCleanRanks(s->group, ~0ull);
    check_status("epGroupCleanRanks", rc, epGetLastErrorMessage());
    if (rc != epSuccess) FAIL("epGroupCleanRanks: %s", epGetLastErrorMessage());
    current_op = "teardown";
    rc = epGroupDestroy(s->group);
    if (rc != epSuccess) FAIL("epGroupDestroy: %s", epGetLastErrorMessage());
}

/* ---------------------------------------------------------------------------------------- */
/* One input                                                                                */

static int setup_done = 0;

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (!setup_done) {
        const char* bugs = getenv("EP_FUZZ_KNOWN_BUGS");
        if (bugs && bugs[0] == '0') known_bugs = 0;
        const char* tracing = getenv("EP_FUZZ_TRACE");
        trace = tracing && tracing[0] == '1';
        /* EP_FUZZ_SELF_TEST=1: a violation on the first input (checks that a failure fails CI). */
        const char* selfTest = getenv("EP_FUZZ_SELF_TEST");
        if (selfTest && selfTest[0] == '1') FAIL("EP_FUZZ_SELF_TEST is set: a deliberate failure");
        setup_done = 1;
    }
    Reader in = {data, size};
    rng_state = size;
    for (size_t i = 0; i < size && i < 16; i++) rng_state = rng_state * 131 + data[i];

    State* s = calloc(1, sizeof *s);
    epGroupConfig_t config;
    ConfigExpectation expect = decode_config(&in, &config);
    int expectValid = expect.expectValid;
    current_op = "epGroupCreate";
    uint8_t bk = u8(&in);
    epBackendConfig_t backend = {sizeof backend, epBackendHost, 0, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
    const epBackendConfig_t* backendPointer = (bk & 1) ? &backend : NULL;
    if (bk >= 250) { backend.structSize = (bk & 1) ? 4 : 0; backendPointer = &backend; expectValid = 0; }
    else if (bk >= 246) { backend.backend = (epBackend_t)(bk - 240); backendPointer = &backend; expectValid = 0; }
    epResult_t rc = epGroupCreate(bk == 245 ? NULL : &config, backendPointer, &s->group);
    if (bk == 245) expectValid = 0;
    check_status("epGroupCreate", rc, epGetLastErrorMessage());
    TRACE("epGroupCreate(R %d E %d K %d H %lld dtype %d Bmax %lld N %lld fp8 %d/%d, expected %d) -> %s %s", config.ranks, config.experts,
          config.topK, (long long)config.hidden, config.elementType, (long long)config.maxTokensPerRank, (long long)config.maxReceivedTokensPerRank,
          config.fp8Scales, config.fp8Source, expectValid, epGetErrorString(rc), epGetLastErrorMessage());
    if (rc != epSuccess) {
        if (expectValid == 1) FAIL("epGroupCreate refused a valid config: %s", epGetLastErrorMessage());
        if (expectValid == -1 && rc != epInvalidArgument) FAIL("epGroupCreate -> %s: %s", epGetErrorString(rc), epGetLastErrorMessage());
        if (s->group != NULL) FAIL("epGroupCreate failed but set the group");
        free(s);
        return 0;
    }
    if (expectValid == 0) FAIL("epGroupCreate accepted an invalid config (bytes %zu)", size);

    epGroupInfo_t info;
    memset(&info, 0, sizeof info);
    info.structSize = sizeof info;
    current_op = "epGroupGetInfo";
    rc = epGroupGetInfo(s->group, &info);
    check_status("epGroupGetInfo", rc, epGetLastErrorMessage());
    if (rc != epSuccess) FAIL("epGroupGetInfo: %s", epGetLastErrorMessage());
    check_info_fields(&config, &info);
    if (config_bytes(&config) > BUDGET) { /* a bound: too large to hold its buffers */
        info_only(s, &config, &info);
        free(s);
        return 0;
    }
    s->algorithm = info.algorithm;
    s->layout = info.layout;
    s->R = info.ranks;
    s->E = info.experts;
    s->L = info.localExperts;
    s->K = info.topK;
    s->H = info.hidden;
    s->elementType = info.elementType;
    s->esize = dtype_size(info.elementType);
    s->Bmax = info.maxTokensPerRank;
    s->capacity = info.receiveCapacity;
    s->overflow = config.overflow;
    s->timeoutSeconds = config.timeoutSeconds;
    s->alignment = info.alignment < 1 ? 1 : info.alignment;
    s->recvNdim = info.receiveNdim;
    s->routingNdim = info.receiveRoutingNdim;
    memcpy(s->recvShape, info.receiveShape, sizeof s->recvShape);
    memcpy(s->routingShape, info.receiveRoutingShape, sizeof s->routingShape);
    s->fp8 = info.fp8Scales;
    s->fp8Source = info.fp8Source;
    s->scaleType = s->fp8 == epFP8Float32Block128 ? epFloat32 : epInt32;
    s->scaleWords = s->fp8 ? fp8_scale_words(s->fp8, s->H) : 0;
    s->scalesNdim = info.receiveScalesNdim;
    memcpy(s->scalesShape, info.receiveScalesShape, sizeof s->scalesShape);
    s->wsize = s->fp8 ? 1 : s->esize;
    s->isize = s->fp8 && s->fp8Source == epFP8PassThrough ? 1 : s->esize;
    TRACE("group: algorithm %d layout %d R %d E %d K %d H %lld dtype %d Bmax %lld capacity %lld overflow %d alignment %d fp8 %d/%d",
          s->algorithm, s->layout, s->R, s->E, s->K, (long long)s->H, s->elementType, (long long)s->Bmax, (long long)s->capacity,
          s->overflow, s->alignment, s->fp8, s->fp8Source);
    s->all = s->mask = (s->R == 64) ? ~0ull : ((1ull << s->R) - 1);
    for (int r = 0; r < s->R; r++) {
        uint8_t rankByte = u8(&in);
        s->recvIdxDtype[r] = (rankByte & 1) ? epInt64 : epInt32;
        /* FP8 rows: e4m3, or uint8 holding the codes */
        s->recvType[r] = !s->fp8 ? s->elementType : (rankByte & 2) ? epUInt8 : epFloat8E4M3;
        s->inputType[r] = s->isize != 1 || !s->fp8 ? s->elementType : (rankByte & 4) ? epUInt8 : epFloat8E4M3;
        int64_t rows = elements_of(s->recvNdim, s->recvShape);
        buffer_make(&s->recv[r], (size_t)rows * s->wsize);
        if (s->fp8) {
            buffer_make(&s->eo[r], (size_t)rows * s->esize);
            buffer_make(&s->recvScales[r], (size_t)elements_of(s->scalesNdim, s->scalesShape) * 4);
        }
        if (s->routingNdim > 0) {
            int64_t n = elements_of(s->routingNdim, s->routingShape);
            buffer_make(&s->recvIdx[r], (size_t)n * dtype_size(s->recvIdxDtype[r]));
            buffer_make(&s->recvW[r], (size_t)n * 4);
            buffer_make(&s->gradIn[r], (size_t)n * 4);
            float* g = (float*)s->gradIn[r].data;
            for (int64_t i = 0; i < n; i++) g[i] = (float)(next_random() % 512) / 128.0f;
        }
        s->counters[r] = malloc((size_t)(layout_array_len(s) + 1) * 8);
        s->tokens[r] = 0;
        s->idxDtype[r] = epInt32;
        buffer_make(&s->idx[r], 0);
        buffer_make(&s->x[r], 0);
        buffer_make(&s->w[r], 0);
        buffer_make(&s->scalesIn[r], 0);
        buffer_make(&s->y[r], 0);
        buffer_make(&s->gradOut[r], 0);
    }
    if (s->elementType != epUInt8 && s->esize == 4) { /* finite expert outputs */
        for (int r = 0; r < s->R; r++) {
            Buffer* eo = expert_outputs(s, r);
            for (size_t i = 0; i < eo->bytes / 4; i++) ((float*)eo->data)[i] = (float)(int)(next_random() % 100);
        }
    }

    /* The call sequence. */
    for (int op = 0; op < 24 && in.n > 0; op++) {
        uint8_t o = u8(&in);
        switch (o % 16) {
        case 0: case 1: case 2: collective(&in, s, CALL_UPDATE); break;
        case 3: case 4: case 5:
            if ((o & 0xF0) == 0xF0) stacked(&in, s, 0); /* the stacked dispatch (update included) */
            else collective(&in, s, CALL_DISPATCH);
            break;
        case 6: case 7: case 8:
            if ((o & 0xF0) == 0xF0) stacked(&in, s, 1);
            else collective(&in, s, CALL_COMBINE);
            break;
        case 9: { /* deactivate a rank (sometimes one out of range) */
            current_op = "epGroupDeactivateRank";
            int rank = (int)(u8(&in) % (s->R + 1)) - ((o & 0x80) ? 1 : 0);
            rc = epGroupDeactivateRank(s->group, rank);
            TRACE("epGroupDeactivateRank(%d) -> %s", rank, epGetErrorString(rc));
            check_status("epGroupDeactivateRank", rc, epGetLastErrorMessage());
            if (!s->groupDestroyed && rank >= 0 && rank < s->R && rc != epSuccess) FAIL("deactivate(%d): %s", rank, epGetLastErrorMessage());
            if ((rank < 0 || rank >= s->R || s->groupDestroyed) && rc != epInvalidArgument) FAIL("deactivate(%d) -> %s", rank, epGetErrorString(rc));
            if (rc == epSuccess) {
                uint64_t before = s->mask;
                s->mask &= ~(1ull << rank);
                if (s->mask != before) mask_changed(s);
                resync_mask(s);
                if (s->mask & (1ull << rank)) FAIL("rank %d still active after deactivate", rank);
            }
            break;
        }
        case 10: { /* clean some ranks */
            current_op = "epGroupCleanRanks";
            uint8_t mb = u8(&in);
            uint64_t mask = mb >= 240 ? ~0ull : (uint64_t)mb & s->all;
            rc = epGroupCleanRanks(s->group, mask);
            TRACE("epGroupCleanRanks(%llx) -> %s", (unsigned long long)mask, epGetErrorString(rc));
            check_status("epGroupCleanRanks", rc, epGetLastErrorMessage());
            if (rc == epSuccess) {
                mask_changed(s); /* clean restarts every rank's step numbering */
                resync_mask(s);
                if ((s->mask & mask) != (mask & s->all))
                    FAIL("clean(%llx) left mask %llx", (unsigned long long)mask, (unsigned long long)s->mask);
            } else if (s->groupDestroyed && rc != epInvalidArgument) {
                FAIL("clean on a destroyed group -> %s", epGetErrorString(rc));
            }
            break;
        }
        case 11: { /* layout info of a rank */
            current_op = "epGroupGetLayoutInfo";
            int rank = (int)(u8(&in) % (s->R + 1));
            epLayoutInfo_t li;
            layout_info_struct(s, 0, &li);
            if (o & 0x80) li.structSize = 8;
            rc = epGroupGetLayoutInfo(s->group, rank, &li);
            check_status("epGroupGetLayoutInfo", rc, epGetLastErrorMessage());
            if (rc != epSuccess && !layout_info_untouched(s, 0, &li)) FAIL("epGroupGetLayoutInfo -> %s wrote the info", epGetErrorString(rc));
            break;
        }
        case 12: { /* active ranks, status */
            current_op = "epGroupCheckStatus";
            rc = epGroupCheckStatus(s->group);
            check_status("epGroupCheckStatus", rc, epGetLastErrorMessage());
            if (!s->groupDestroyed && rc != epSuccess) FAIL("epGroupCheckStatus on the host: %s", epGetLastErrorMessage());
            current_op = "epGroupGetActiveRanks";
            rc = epGroupGetActiveRanks(s->group, (o & 0x80) ? NULL : &(uint64_t){0});
            check_status("epGroupGetActiveRanks", rc, epGetLastErrorMessage());
            break;
        }
        case 13: { /* per-rank handle calls, one thread per rank */
            uint8_t k = u8(&in);
            if (!s->groupDestroyed || s->handles[0]) per_rank(&in, s, (CallKind)(k % 3));
            break;
        }
        case 14: { /* destroy the handles; a call on one of them must then be refused */
            current_op = "epHandleDestroy";
            if (!s->handles[0] || (o & 0x80) == 0) break;
            for (int r = 0; r < s->R; r++) {
                DESTROY_CHECKED("epHandleDestroy", rc, epHandleDestroy(s->handles[r]));
                if (rc != epSuccess) FAIL("epHandleDestroy: %s", epGetLastErrorMessage());
            }
            epUpdateInputs_t none = {sizeof none, NULL};
            rc = epHandleUpdate(s->handles[0], &none, NULL, NULL);
            check_status("epHandleUpdate", rc, epGetLastErrorMessage());
            if (rc != epInvalidArgument || !strstr(epGetLastErrorMessage(), "handle")) FAIL("a destroyed handle -> %s: %s", epGetErrorString(rc), epGetLastErrorMessage());
            rc = epHandleDestroy(s->handles[0]);
            if (rc != epInvalidArgument) FAIL("destroying a handle twice -> %s", epGetErrorString(rc));
            memset(s->handles, 0, sizeof s->handles);
            s->handleStep.valid = 0;
            break;
        }
        case 15: { /* destroy the group (its handles keep it alive) */
            current_op = "epGroupDestroy";
            if ((o & 0xC0) != 0xC0 || s->groupDestroyed) break;
            DESTROY_CHECKED("epGroupDestroy", rc, epGroupDestroy(s->group));
            if (rc != epSuccess) FAIL("epGroupDestroy: %s", epGetLastErrorMessage());
            s->groupDestroyed = 1;
            break;
        }
        }
    }

    current_op = "teardown";
    for (int r = 0; r < s->R; r++)
        if (s->handles[r]) {
            rc = epHandleDestroy(s->handles[r]);
            if (rc != epSuccess) FAIL("epHandleDestroy at the end: %s", epGetLastErrorMessage());
        }
    if (!s->groupDestroyed) {
        rc = epGroupDestroy(s->group);
        if (rc != epSuccess) FAIL("epGroupDestroy at the end: %s", epGetLastErrorMessage());
    } else {
        rc = epGroupDestroy(s->group);
        if (rc != epInvalidArgument) FAIL("destroying a group twice -> %s", epGetErrorString(rc));
    }
    for (int r = 0; r < s->R; r++) {
        free_step_buffers(s, r);
        buffer_free(&s->eo[r]);
        buffer_free(&s->recvScales[r]);
        free(s->counters[r]);
        free(s->groupStep.idx[r]);
        free(s->handleStep.idx[r]);
        buffer_free(&s->recv[r]);
        buffer_free(&s->recvIdx[r]);
        buffer_free(&s->recvW[r]);
        buffer_free(&s->gradIn[r]);
    }
    free(s);
    return 0;
}
