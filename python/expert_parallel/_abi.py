"""ctypes mirrors of include/expert_parallel.h (ABI version 4).

Every struct starts with ``structSize``; :func:`new` fills it. The sizes are checked against
the C compiler's in tests/test_c_abi.py.
"""

import ctypes
from ctypes import POINTER, c_char_p, c_double, c_int32, c_int64, c_size_t, c_uint64, c_void_p

ABI_VERSION = 8
MAX_DIMS = 4
NCCL_UNIQUE_ID_BYTES = 128

# epResult_t
SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_USAGE = 2
OVERFLOW = 3
TIMEOUT = 4
PEER_FAILED = 5
INACTIVE_RANK = 6
CUDA_ERROR = 7
NCCL_ERROR = 8
INTERNAL_ERROR = 9

# epDataType_t
BF16, F16, F32, I32, I64, U8, E4M3 = range(7)
DTYPE_NAMES = {BF16: "bf16", F16: "f16", F32: "f32", I32: "i32", I64: "i64", U8: "u8", E4M3: "e4m3"}
DTYPE_C_NAMES = {BF16: "epBFloat16", F16: "epFloat16", F32: "epFloat32", I32: "epInt32", I64: "epInt64", U8: "epUInt8",
                 E4M3: "epFloat8E4M3"}
DTYPE_SIZES = {BF16: 2, F16: 2, F32: 4, I32: 4, I64: 8, U8: 1, E4M3: 1}
# epFP8Scales_t, epFP8Source_t
FP8_SCALES = {None: 0, "float32": 1, "ue8m0": 2, "e8m0": 3}
FP8_BLOCKS = {"float32": 128, "ue8m0": 128, "e8m0": 32}
FP8_SOURCES = {"quantize": 0, "pass_through": 1}

# epAlgorithm_t
ALGORITHMS = {"ll": 0, "ht": 1}
# epLayout_t
LAYOUTS = {"expert_major": 1, "rank_major": 2, "flat": 3, "expert_major_padded": 4}
LAYOUT_NAMES = {v: k for k, v in LAYOUTS.items()}
# epOverflowPolicy_t
OVERFLOW_POLICIES = {"fail": 0, "drop": 1}
# epPassDirection_t
DIRECTIONS = {"forward": 0, "backward": 1}
# epBackend_t
BACKEND_HOST, BACKEND_VIRTUAL_GPU, BACKEND_NCCL_RANK = 0, 1, 2
# epLaunchMode_t
LAUNCH_MODES = {"single": 0, "per_rank": 1}
# epCallPhase_t
PHASE_WHOLE, PHASE_SEND_ONLY = 0, 1
# epBuffer_t
BUFFER_RECEIVED_TOKENS, BUFFER_RECEIVED_TOPK_IDX, BUFFER_RECEIVED_TOPK_WEIGHTS, BUFFER_EXPERT_OUTPUTS, \
    BUFFER_WEIGHT_GRADIENTS, BUFFER_RECEIVED_SCALES = range(6)

c_enum = ctypes.c_int  # C enums with non-negative values: int-sized on every ABI we support


class Struct(ctypes.Structure):
    """An ABI struct: ``structSize`` first, filled by :func:`new`."""


def new(cls, **fields):
    value = cls(**fields)
    value.structSize = ctypes.sizeof(cls)
    return value


class Tensor(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("data", c_void_p),
        ("dtype", c_enum),
        ("ndim", c_int32),
        ("sizes", c_int64 * MAX_DIMS),
        ("strides", c_int64 * MAX_DIMS),
        ("device", c_int32),
    ]


class GroupConfig(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("algorithm", c_enum),
        ("layout", c_enum),
        ("alignment", c_int32),
        ("ranks", c_int32),
        ("experts", c_int32),
        ("topK", c_int32),
        ("hidden", c_int64),
        ("elementType", c_enum),
        ("maxTokensPerRank", c_int64),
        ("maxReceivedTokensPerRank", c_int64),
        ("overflow", c_enum),
        ("timeoutSeconds", c_double),
        ("fp8Scales", c_enum),
        ("fp8Source", c_enum),
    ]


class GPUTuning(ctypes.Structure):
    """epGPUTuning_t (inside the backend configs: no structSize)."""

    _fields_ = [("pipelineDepth", c_int32), ("rowsInFlight", c_int32), ("rowPieces", c_int32),
                ("blocksPerMultiprocessor", c_int32), ("updateChunkTokens", c_int32), ("fusedUpdate", c_int32),
                ("launchGrid", c_int32), ("launches", c_int32)]


class BackendConfig(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("backend", c_enum),
        ("device", c_int32),
        ("multiprocessors", c_int32),
        ("tuning", GPUTuning),
    ]


class GroupInfo(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("backend", c_enum),
        ("ranks", c_int32),
        ("experts", c_int32),
        ("localExperts", c_int32),
        ("topK", c_int32),
        ("hidden", c_int64),
        ("elementType", c_enum),
        ("algorithm", c_enum),
        ("layout", c_enum),
        ("alignment", c_int32),
        ("maxTokensPerRank", c_int64),
        ("receiveCapacity", c_int64),
        ("receiveNdim", c_int32),
        ("receiveShape", c_int64 * MAX_DIMS),
        ("receiveRoutingNdim", c_int32),
        ("receiveRoutingShape", c_int64 * MAX_DIMS),
        ("bufferSlots", c_int32),
        ("multiprocessors", c_int32),
        ("fp8Scales", c_enum),
        ("fp8Source", c_enum),
        ("receiveElementType", c_enum),
        ("receiveScalesNdim", c_int32),
        ("receiveScalesShape", c_int64 * MAX_DIMS),
    ]


class LayoutInfo(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("expertCounters", POINTER(c_int64)),
        ("expertOffsets", POINTER(c_int64)),
        ("sourceRankCounters", POINTER(c_int64)),
        ("expertSourceCounters", POINTER(c_int64)),
        ("receivedTotal", c_int64),
        ("droppedTokens", c_int64),
    ]


class UpdateInputs(Struct):
    _fields_ = [("structSize", c_size_t), ("topkIdx", POINTER(Tensor))]


class UpdateConfig(Struct):
    _fields_ = [("structSize", c_size_t), ("launchMode", c_enum), ("step", c_void_p)]


class DispatchInputs(Struct):
    _fields_ = [("structSize", c_size_t), ("tokens", POINTER(Tensor)), ("topkWeights", POINTER(Tensor)),
                ("scales", POINTER(Tensor))]


class DispatchOutputs(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("tokens", POINTER(Tensor)),
        ("topkIdx", POINTER(Tensor)),
        ("topkWeights", POINTER(Tensor)),
        ("layoutInfo", POINTER(LayoutInfo)),
        ("expertCounts", POINTER(Tensor)),
        ("expertSourceCounts", POINTER(Tensor)),
        ("scales", POINTER(Tensor)),
    ]


class DispatchConfig(Struct):
    _fields_ = [("structSize", c_size_t), ("direction", c_enum), ("launchMode", c_enum), ("step", c_void_p),
                ("phase", c_enum)]


class CombineInputs(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("expertOutputs", POINTER(Tensor)),
        ("topkWeights", POINTER(Tensor)),
        ("weightGradients", POINTER(Tensor)),
    ]


class CombineOutputs(Struct):
    _fields_ = [("structSize", c_size_t), ("tokens", POINTER(Tensor)), ("topkWeightGradients", POINTER(Tensor))]


class CombineConfig(Struct):
    _fields_ = [("structSize", c_size_t), ("direction", c_enum), ("launchMode", c_enum), ("step", c_void_p),
                ("phase", c_enum)]


class Stacked(ctypes.Structure):
    """epStacked_t: every rank's part of one argument in one array (no structSize: it is a field)."""

    _fields_ = [("data", c_void_p), ("dtype", c_enum), ("device", c_int32), ("rankStride", c_int64)]


class StackedDispatch(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("tokens", c_int64),
        ("topkIdx", Stacked),
        ("inputTokens", Stacked),
        ("topkWeights", Stacked),
        ("scales", Stacked),
        ("receivedTokens", Stacked),
        ("receivedTopkIdx", Stacked),
        ("receivedTopkWeights", Stacked),
        ("receivedScales", Stacked),
        ("expertCounts", Stacked),
        ("expertSourceCounts", Stacked),
        ("direction", c_enum),
        ("launchMode", c_enum),
        ("phase", c_enum),
        ("step", c_void_p),
    ]


class StackedCombine(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("expertOutputs", Stacked),
        ("topkWeights", Stacked),
        ("weightGradients", Stacked),
        ("combinedTokens", Stacked),
        ("topkWeightGradients", Stacked),
        ("direction", c_enum),
        ("launchMode", c_enum),
        ("phase", c_enum),
        ("step", c_void_p),
    ]


class NCCLUniqueId(ctypes.Structure):
    """ncclUniqueId's bytes (no structSize: its size never changes)."""

    _fields_ = [("bytes", ctypes.c_uint8 * NCCL_UNIQUE_ID_BYTES)]


class NCCLRankConfig(Struct):
    _fields_ = [
        ("structSize", c_size_t),
        ("rank", c_int32),
        ("device", c_int32),
        ("multiprocessors", c_int32),
        ("uniqueId", NCCLUniqueId),
        ("initTimeoutSeconds", c_double),
        ("tuning", GPUTuning),
    ]


# The header's structs, by C name (for the size check against the C compiler).
STRUCTS = {
    "epTensor_t": Tensor,
    "epGroupConfig_t": GroupConfig,
    "epBackendConfig_t": BackendConfig,
    "epGroupInfo_t": GroupInfo,
    "epLayoutInfo_t": LayoutInfo,
    "epUpdateInputs_t": UpdateInputs,
    "epUpdateConfig_t": UpdateConfig,
    "epDispatchInputs_t": DispatchInputs,
    "epDispatchOutputs_t": DispatchOutputs,
    "epDispatchConfig_t": DispatchConfig,
    "epCombineInputs_t": CombineInputs,
    "epCombineOutputs_t": CombineOutputs,
    "epCombineConfig_t": CombineConfig,
    "epNCCLUniqueId_t": NCCLUniqueId,
    "epGPUTuning_t": GPUTuning,
    "epNCCLRankConfig_t": NCCLRankConfig,
    "epStacked_t": Stacked,
    "epStackedDispatch_t": StackedDispatch,
    "epStackedCombine_t": StackedCombine,
}

_group = c_void_p
_stream = c_void_p

# Entry points: name -> (argument types). Every one returns epResult_t.
PROTOTYPES = {
    "epGetAbiVersion": [POINTER(c_int32)],
    "epGroupCreate": [POINTER(GroupConfig), POINTER(BackendConfig), POINTER(c_void_p)],
    "epGroupDestroy": [_group],
    "epGroupGetInfo": [_group, POINTER(GroupInfo)],
    "epGroupUpdateAll": [_group, POINTER(UpdateInputs), POINTER(UpdateConfig), _stream],
    "epGroupDispatchAll": [_group, POINTER(DispatchInputs), POINTER(DispatchOutputs), POINTER(DispatchConfig), _stream],
    "epGroupCombineAll": [_group, POINTER(CombineInputs), POINTER(CombineOutputs), POINTER(CombineConfig), _stream],
    "epGroupCheckStatus": [_group],
    "epGroupGetLayoutInfo": [_group, c_int32, POINTER(LayoutInfo)],
    "epGroupGetActiveRanks": [_group, POINTER(c_uint64)],
    "epGroupDeactivateRank": [_group, c_int32],
    "epGroupCleanRanks": [_group, c_uint64],
    "epHandleCreate": [_group, c_int32, POINTER(c_void_p)],
    "epHandleDestroy": [c_void_p],
    "epHandleUpdate": [c_void_p, POINTER(UpdateInputs), POINTER(UpdateConfig), _stream],
    "epDispatch": [c_void_p, POINTER(DispatchInputs), POINTER(DispatchOutputs), POINTER(DispatchConfig), _stream],
    "epCombine": [c_void_p, POINTER(CombineInputs), POINTER(CombineOutputs), POINTER(CombineConfig), _stream],
    "epGetNCCLUniqueId": [POINTER(NCCLUniqueId)],
    "epGroupCreateNCCL": [POINTER(GroupConfig), POINTER(NCCLRankConfig), POINTER(c_void_p)],
    "epStepCreate": [_group, POINTER(c_void_p)],
    "epStepDestroy": [c_void_p],
    "epStepGetLayoutInfo": [c_void_p, c_int32, POINTER(LayoutInfo)],
    "epGroupComplete": [_group, _stream],
    "epComplete": [c_void_p, _stream],
    "epGroupGetBuffer": [_group, c_int32, c_enum, POINTER(Tensor)],
    "epGroupCopyReceived": [_group, c_void_p, POINTER(Tensor), _stream],
    "epGroupDispatchStacked": [_group, POINTER(StackedDispatch), _stream],
    "epGroupCombineStacked": [_group, POINTER(StackedCombine), _stream],
}


def declare(library):
    """Sets the argument and result types of every entry point of `library` (a ctypes.CDLL)."""
    for name, arguments in PROTOTYPES.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = c_enum
    library.epGetErrorString.argtypes = [c_enum]
    library.epGetErrorString.restype = c_char_p
    library.epGetLastErrorMessage.argtypes = []
    library.epGetLastErrorMessage.restype = c_char_p
