"""The exceptions of expert_parallel. Every one is an :class:`ExpertParallelError`."""

import re

from . import _abi


class ExpertParallelError(Exception):
    """An error of the library or of its Python layer.

    ``status`` is the C ABI's ``epResult_t`` value (see include/expert_parallel.h); ``status_name``
    its name. The message names the argument, the value and the bound.
    """

    status: int = _abi.INTERNAL_ERROR
    status_name: str = "epInternalError"
    # No __init__ of its own: torch.compile's tracer then reports one raised in a traced region
    # by name and message (an __init__ calling super() is one it cannot trace).


class InvalidArgumentError(ExpertParallelError, ValueError, TypeError):
    """A wrong argument: dtype, shape, device, contiguity, a configuration field or a routing entry."""

    status = _abi.INVALID_ARGUMENT
    status_name = "epInvalidArgument"


class InvalidUsageError(ExpertParallelError, RuntimeError):
    """A call out of order (combine with a handle of an earlier step) or one the group does not offer."""

    status = _abi.INVALID_USAGE
    status_name = "epInvalidUsage"


class NotCopyableError(InvalidUsageError, TypeError):
    """A copy or pickle of an object that owns the library's state (a group, a handle): a
    ``TypeError`` too, as Python's own refusals to pickle are."""


class ReceiveOverflowError(ExpertParallelError, RuntimeError):
    """More rows would reach a rank than its receive buffer holds (HT, overflow="fail")."""

    status = _abi.OVERFLOW
    status_name = "epOverflow"


class RankTimeoutError(ExpertParallelError, TimeoutError):
    """A rank waited past the group's timeout; the late ranks are now masked inactive."""

    status = _abi.TIMEOUT
    status_name = "epTimeout"


class PeerFailedError(ExpertParallelError, RuntimeError):
    """Another rank rejected its call, so this rank did nothing either."""

    status = _abi.PEER_FAILED
    status_name = "epPeerFailed"


class InactiveRankError(ExpertParallelError, RuntimeError):
    """The rank is masked inactive; clean it first."""

    status = _abi.INACTIVE_RANK
    status_name = "epInactiveRank"


class CudaError(ExpertParallelError, RuntimeError):
    """A CUDA driver or NVRTC call failed, or no driver or device was found."""

    status = _abi.CUDA_ERROR
    status_name = "epCudaError"


class NcclError(ExpertParallelError, RuntimeError):
    """An NCCL call failed, or NCCL (libnccl.so.2) could not be loaded."""

    status = _abi.NCCL_ERROR
    status_name = "epNcclError"


class OutOfMemoryError(ExpertParallelError, MemoryError):
    """A buffer the group's configuration needs could not be allocated (or cannot exist: its size
    overflows the address space). The message names the buffer, its shape and its bytes; it is
    also a :class:`MemoryError`."""


class _CheckedOutOfMemoryError(OutOfMemoryError, InvalidArgumentError):
    """A buffer the library found, before allocating it, that cannot fit (a configuration whose
    host routing metadata exceeds the host's memory, say): the C status is epInvalidArgument and
    the message reads "out of memory: <buffer> needs N bytes ...". Both an
    :class:`OutOfMemoryError` and an :class:`InvalidArgumentError`."""

    status = _abi.INVALID_ARGUMENT
    status_name = "epInvalidArgument"


class LibraryNotFoundError(ExpertParallelError, ImportError):
    """libexpert_parallel.so was not found (see expert_parallel.library_path)."""


_CLASSES = {
    _abi.INVALID_ARGUMENT: InvalidArgumentError,
    _abi.INVALID_USAGE: InvalidUsageError,
    _abi.OVERFLOW: ReceiveOverflowError,
    _abi.TIMEOUT: RankTimeoutError,
    _abi.PEER_FAILED: PeerFailedError,
    _abi.INACTIVE_RANK: InactiveRankError,
    _abi.CUDA_ERROR: CudaError,
    _abi.NCCL_ERROR: NcclError,
}

_STATUS_NAMES = {
    _abi.SUCCESS: "epSuccess",
    _abi.INVALID_ARGUMENT: "epInvalidArgument",
    _abi.INVALID_USAGE: "epInvalidUsage",
    _abi.OVERFLOW: "epOverflow",
    _abi.TIMEOUT: "epTimeout",
    _abi.PEER_FAILED: "epPeerFailed",
    _abi.INACTIVE_RANK: "epInactiveRank",
    _abi.CUDA_ERROR: "epCudaError",
    _abi.NCCL_ERROR: "epNcclError",
    _abi.INTERNAL_ERROR: "epInternalError",
}


# The library's names of the group's settings, as the package's keywords name them (a message of
# the C layer names epGroupConfig_t's fields and enumerators: "topK = 40; must be ≤ experts (4)",
# "FP8 scale mode epFP8E8M0Block32"), and its element types (epDataType_t's names: "elementType =
# epUInt8") as the package's dtype strings.
_SETTING_NAMES = [("maxReceivedTokensPerRank", "max_recv_tokens"), ("maxTokensPerRank", "max_tokens"), ("topK", "top_k"),
                  ("elementType", "dtype"), ("timeoutSeconds", "timeout"), ("fp8Scales", "fp8"), ("fp8Source", "fp8_source"), ("epLayoutExpertMajorPadded", "'expert_major_padded'"),
                  ("epLayoutExpertMajor", "'expert_major'"), ("epLayoutRankMajor", "'rank_major'"), ("epLayoutFlat", "'flat'"),
                  ("epFP8Float32Block128", "'float32'"), ("epFP8UE8M0Block128", "'ue8m0'"), ("epFP8E8M0Block32", "'e8m0'"),
                  ("epFP8Quantize", "'quantize'"), ("epFP8PassThrough", "'pass_through'"),
                  ("epAlgorithmLowLatency", "'ll'"), ("epAlgorithmHighThroughput", "'ht'")] + \
                 [(_abi.DTYPE_C_NAMES[code], name) for code, name in _abi.DTYPE_NAMES.items()]
_SETTINGS = re.compile(r"\b(" + "|".join(name for name, _ in _SETTING_NAMES) + r")\b")
_SETTING_WORDS = dict(_SETTING_NAMES)

# The fields of the structs a group's creation passes besides its epGroupConfig_t (epGroupCreate's
# `backend`, epGroupCreateNCCL's `ncclRank`, and their epGPUTuning_t), as the keywords name them:
# "ncclRank.initTimeoutSeconds = -1.0" is init_timeout=-1.0, "tuning.rowPieces = 9" tuning['row_pieces'].
_CREATE_FIELDS = {"rank": "rank", "device": "device", "multiprocessors": "multiprocessors",
                  "initTimeoutSeconds": "init_timeout"}
_TUNING_KNOBS = {"pipelineDepth": "pipeline_depth", "rowsInFlight": "rows_in_flight", "rowPieces": "row_pieces",
                 "blocksPerMultiprocessor": "blocks_per_multiprocessor", "updateChunkTokens": "update_chunk_tokens",
                 "fusedUpdate": "fused_update", "launchGrid": "full_grid", "launches": "serial_launches"}
_CREATE = re.compile(r"\b(?:(?:ncclRank|backend)\.)?tuning\.(" + "|".join(_TUNING_KNOBS) + r")\b"
                     r"|\b(?:ncclRank|backend)\.(" + "|".join(_CREATE_FIELDS) + r")\b")


def _create_name(match):
    if match.group(1):
        return f"tuning[{_TUNING_KNOBS[match.group(1)]!r}]"
    return _CREATE_FIELDS[match.group(2)]


def python_names(message: str) -> str:
    """`message` with the group settings it names as the package's keywords name them."""
    # (C's 0 for an automatic receive capacity, and its NULL, are the keywords' None.)
    message = _SETTINGS.sub(lambda m: _SETTING_WORDS[m.group(1)], message)
    message = _CREATE.sub(_create_name, message)
    for c, python in (("must be 0 for LL", "must be None for LL"), ("(or 0 for automatic)", "(or None for automatic)"),
                      ("must be NULL", "must be None"), ("phase epPhaseSendOnly", "send_only=True"),
                      # The entry points a message asks for, as the group's methods.
                      ("call epGroupComplete for", "complete()"), ("call epComplete for", "complete()"),
                      ("epGroupComplete needs", "complete() needs"), ("epComplete needs", "complete() needs"),
                      ("(epGroupCleanRanks)", "(clean())"), ("epGroupCleanRanks was called", "clean() was called"),
                      ("epGroupCheckStatus names it", "check() names it"), ("this call: epForward", "this call: forward"),
                      ("this call: epBackward", "this call: backward"), ("(config.ranks)", "(ranks)")):
        message = message.replace(c, python)
    return message


# The C call structs' names of the routing and expert outputs a group's data path passed for its
# caller ("call.topkIdx[0][1] = 8", "inputs.topkIdx", "topkIdx token 0 names expert 3 twice"), as
# its keywords name them.
_ARGUMENTS = re.compile(r"\b(?:(?:call|inputs|input)\.)?(topkIdx|topkWeights|expertOutputs)\b")
# A per-rank list's entry ("inputs[1].topkIdx": topk_idx[1]).
_LIST_ARGUMENTS = re.compile(r"\binputs\[(\d+)\]\.(topkIdx|topkWeights|expertOutputs)\b")
_ENTRY = re.compile(r"\b((?:topk_idx|topk_weights)(?:\[rank \d+\])?)\[(\d+)\]\[(\d+)\](?!\[)")
_ARGUMENT_WORDS = {"topkIdx": "topk_idx", "topkWeights": "topk_weights", "expertOutputs": "expert_outputs"}


# A collective call's rank r names entry r of its arrays ("rank 1: ... inputs[1].topkIdx"), also
# in the device's status ("inputs[1].topkIdx[0][1]", no "rank r: " before it).
_RANK_PREFIX = re.compile(r"\brank (\d+): ")
_RANK_ENTRY = re.compile(r"\binputs\[(\d+)\]\.(topkIdx|topkWeights)(?=\[\d+\]\[\d+\](?!\[))")


def argument_names(message: str) -> str:
    """`message` of a group's own C call with its arguments named as the group's methods name them
    (the raw entry points' messages keep the C struct's fields, which their callers set)."""
    # The failing rank's own entry: its rank is the message's "rank r: ".
    prefix = _RANK_PREFIX.search(message)
    if prefix:
        message = _LIST_ARGUMENTS.sub(lambda m: m.group(2) if m.group(1) == prefix.group(1) else m.group(0), message)
    # Another rank's routing entry (a peer's, the device status's): "[rank r][token t, column c]".
    message = _RANK_ENTRY.sub(r"\2[rank \1]", message)
    message = _LIST_ARGUMENTS.sub(lambda m: f"{_ARGUMENT_WORDS[m.group(2)]}[{m.group(1)}]", message)
    message = _ARGUMENTS.sub(lambda m: _ARGUMENT_WORDS[m.group(1)], message)
    # A rank's routing entry: "[token, column]" (its rank is the message's "rank r:"; a stacked
    # array's index is then [r, token, column]).
    return _ENTRY.sub(r"\1[token \2, column \3]", message)


# A data-path call's tensors as the C call structs name them: a stacked call's field
# ("call.inputTokens"), a per-rank call's rank r entry ("outputs[1].tokens"), one rank's
# ("output.tokens"); ".data" / ".address" is the tensor's memory.
_CALL_FIELD = re.compile(r"\b(?:call\.(\w+)|(inputs|outputs)\[(\d+)\]\.(\w+)|(input|output)\.(\w+))(?:\.(?:data|address)\b)?")
# An address the stacked calls refuse for its alignment ("call.inputTokens.data = 94873283600900;
# must be a multiple of 8 bytes").
_UNALIGNED = re.compile(r"\.(?:data|address) = (\d+); must be a multiple of (\d+) bytes")


def _unaligned(match, kind=None):
    """The words of an address refused for its alignment, for arrays of `kind` ("torch",
    "numpy", None: either): where the caller reads the address, and how to copy the view."""
    address, multiple = int(match.group(1)), match.group(2)
    if kind == "torch":
        where, copy = f"data_ptr() = {address:#x}", ".clone()"
    elif kind == "numpy":
        where, copy = f"address {address:#x} (__array_interface__['data'][0])", ".copy()"
    else:
        where, copy = f"address {address:#x}", "a torch tensor's .clone(), a NumPy array's .copy()"
    return (f": {where}; must be a multiple of {multiple} bytes (a view that starts inside an element group of its storage: "
            f"pass a copy, {copy})")


def call_names(message: str, fields: "dict[str, str]", kind: "str | None" = None) -> str:
    """`message` of a group's data-path call with the tensors of its C call structs named as the
    group's method names them. `fields` maps a stacked call's field ("inputTokens") or a per-rank
    call's "inputs.F" / "outputs.F" to the name ("xs", "out tokens"); a per-rank entry r gets
    "[r]" after it (or in place of "{}" in the name). Fields it does not hold stay as they are
    (argument_names renames the routing's). `kind`: the call's arrays ("torch", "numpy"; None:
    not known), as an address refused for its alignment is described."""
    message = _UNALIGNED.sub(lambda match: _unaligned(match, kind), message)

    def rename(match):
        stacked, array, index, field, one, one_field = match.groups()
        if stacked:
            name, entry = fields.get(stacked), ""
        elif array:
            name, entry = fields.get(f"{array}.{field}"), f"[{index}]"
        else:
            name, entry = fields.get(f"{one}s.{one_field}"), ""
        if name is None:
            return match.group(0)
        return name.format(entry) if "{}" in name else name + entry

    return _CALL_FIELD.sub(rename, message)


def _call_fields(*pairs):
    """A call_names table: each (name, stacked field, per-rank field) as two entries."""
    table = {}
    for name, stacked, per_rank in pairs:
        if stacked:
            table[stacked] = name
        if per_rank:
            table[per_rank] = name
    return table


_SLOT = "the group's {what}{{}} (its buffer slot, where this call writes)"
#: call_names tables of the groups' calls: the dispatch's inputs (a VirtualGroup's xs, an
#: NCCLGroup's x), its outputs (the caller's out= or the group's buffer slot), a combine's.
DISPATCH_XS = _call_fields(("xs", "inputTokens", "inputs.tokens"), ("scales", "scales", "inputs.scales"))
DISPATCH_X = _call_fields(("x", "inputTokens", "inputs.tokens"), ("scales", "scales", "inputs.scales"))
DISPATCH_OUT = _call_fields(("out tokens", "receivedTokens", "outputs.tokens"), ("out topk_idx", "receivedTopkIdx", "outputs.topkIdx"),
                            ("out topk_weights", "receivedTopkWeights", "outputs.topkWeights"),
                            ("out scales", "receivedScales", "outputs.scales"),
                            ("out expert_counts", "expertCounts", "outputs.expertCounts"),
                            ("the group's expert_source_counts{}", "expertSourceCounts", "outputs.expertSourceCounts"))
DISPATCH_SLOT = _call_fields(*[(_SLOT.format(what=what), stacked, per_rank) for what, stacked, per_rank in (
    ("received tokens", "receivedTokens", "outputs.tokens"), ("received topk_idx", "receivedTopkIdx", "outputs.topkIdx"),
    ("received topk_weights", "receivedTopkWeights", "outputs.topkWeights"), ("received scales", "receivedScales", "outputs.scales"),
    ("expert_counts", "expertCounts", "outputs.expertCounts"),
    ("expert_source_counts", "expertSourceCounts", "outputs.expertSourceCounts"))])
COMBINE_OUT = _call_fields(("out", "combinedTokens", "outputs.tokens"), ("out gradients", "topkWeightGradients", "outputs.topkWeightGradients"),
                           ("weight_gradients", "weightGradients", "inputs.weightGradients"),
                           ("expert_outputs", None, "inputs.expertOutputs"))
COMBINE_SLOT = _call_fields((_SLOT.format(what="combined tokens"), "combinedTokens", "outputs.tokens"),
                            (_SLOT.format(what="topk_weight_gradients"), "topkWeightGradients", "outputs.topkWeightGradients"),
                            ("weight_gradients", "weightGradients", "inputs.weightGradients"),
                            ("expert_outputs", None, "inputs.expertOutputs"))


def from_status(status: int, message: str) -> ExpertParallelError:
    """The exception for a failed C call (its message naming the group's settings as the
    package's keywords do)."""
    message = python_names(message)
    cls = _CLASSES.get(status, ExpertParallelError)
    if status == _abi.INVALID_ARGUMENT and ": out of memory: " in message:
        cls = _CheckedOutOfMemoryError   # EPError.outOfMemory, which has no status of its own
    error = cls(message)
    if error.status != status:   # a status with no class of its own
        error.status, error.status_name = status, _STATUS_NAMES.get(status, f"epResult_t {status}")
    return error
