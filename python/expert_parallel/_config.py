"""A group's configuration from keyword arguments (each checked and named), and the facts the
library reports about a group once made (shapes of its buffers)."""

import ctypes
import math
import numbers
import sys

from . import _abi, _arrays
from ._library import call
from .errors import InvalidArgumentError, InvalidUsageError, OutOfMemoryError

INT32 = 2**31 - 1
INT64 = 2**63 - 1


def shown(value):
    """`value` (an int) as a message shows it: its digits, or for one too long to print (Python
    refuses ints of more than 4300 digits as text) its sign and bits."""
    if value.bit_length() <= 256:
        return str(value)
    return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"


def cuda_ordinal(device, text):
    """N of a device named 'cuda:N' (`text`: str(device)), or None for any other text. N is ASCII
    digits (int() refuses "²") and at most INT32: the C field is 32 bits, and cuda:4294967296 would
    wrap to device 0 (int() of over 4300 digits raises a ValueError of its own)."""
    digits = text[5:]
    if not (text.startswith("cuda:") and digits.isascii() and digits.isdigit()):
        return None
    if len(digits) > 10 or int(digits) > INT32:
        raise InvalidArgumentError(f"device={device!r}: its ordinal must be in [0, {INT32}]")
    return int(digits)


def process_group_place(dist, process_group, name):
    """(rank, size) of this process in torch.distributed's `process_group` (the argument `name`),
    checked: torch.distributed initialised, a process group (torch's ValueError "Group ... is not
    registered" named no argument), this process one of its ranks."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidUsageError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    try:
        rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
    except (ValueError, RuntimeError, TypeError, AttributeError) as error:
        raise InvalidArgumentError(f"{name}: {process_group!r:.100} is not a torch.distributed process group ({error})") from None
    if rank < 0:
        raise InvalidArgumentError(f"{name}: this process is not one of its {size} ranks; pass a group it belongs to")
    return rank, size


def integer(value, name, low, high):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidArgumentError(f"{name}={value!r}; must be an integer")
    try:
        value = value.__index__()
    except TypeError:   # a tensor or array of several values (or of floats) has __index__ too
        raise InvalidArgumentError(f"{name}: a {type(value).__name__} that is not one integer; must be an integer") from None
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name}={shown(value)}; must be in [{low}, {high}]")
    return value


def choice(value, name, choices):
    """The C value of option `name` (a string key of `choices`)."""
    if not isinstance(value, str) or value not in choices:
        kind = "" if isinstance(value, str) else f" (type {type(value).__name__})"
        raise InvalidArgumentError(
            f"{name}={value!r}{kind}; must be one of {', '.join(repr(c) for c in choices)} (a str)")
    return choices[value]


def type_name(value):
    """The type of `value` as an error names it: a builtin's plain name (``str``), any other's with
    its module (``numpy.bool``: NumPy's bool scalar is named plain "bool", so a refused
    ``np.False_`` read "(type bool); must be True or False")."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def flags(**values):
    """Raises the error naming the first of `values` that is not a bool (``send_only="false"``
    would otherwise read as true)."""
    for name, value in values.items():
        if type(value) is not bool:
            raise InvalidArgumentError(f"{name}={value!r} (type {type_name(value)}); must be True or False")


def seconds(value, name):
    # (Any real number: NumPy's float32 too, as integer options take NumPy's integers; not a bool.)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r}; must be a number of seconds")
    try:
        return float(value)
    except OverflowError:   # an int (or Fraction) past a float's range: no bound could hold it
        what = shown(value) if isinstance(value, int) else f"a {type(value).__name__} too large for a float"
        raise InvalidArgumentError(f"{name}={what}; must be a number of seconds of at most {sys.float_info.max:g}") from None


def group_config(*, ranks, experts, hidden, top_k, max_tokens, algorithm, layout, alignment, dtype, max_recv_tokens,
                 overflow, timeout, fp8=None, fp8_source="quantize"):
    """The epGroupConfig_t of the settings and its element type; the library checks the bounds."""
    algorithm_value = choice(algorithm, "algorithm", _abi.ALGORITHMS)
    if layout is None:
        layout = "expert_major" if algorithm == "ll" else "flat"
    layout_value = choice(layout, "layout", _abi.LAYOUTS)
    if layout == "expert_major_padded":   # in the library's words (its C ABI runs 0 as 1; above 1024 to 2^31 - 1: its own)
        alignment = integer(alignment, "alignment", -math.inf, math.inf)
        if not 1 <= alignment <= INT32:
            raise InvalidArgumentError(f"alignment = {shown(alignment)}; must be in 1...1024")
    element = _arrays.element_type(dtype)
    config = _abi.new(
        _abi.GroupConfig,
        algorithm=algorithm_value, layout=layout_value,
        alignment=integer(alignment, "alignment", 0, INT32),   # (the other layouts: 0 or 1, the library says)
        ranks=integer(ranks, "ranks", 0, INT32), experts=integer(experts, "experts", 0, INT32),
        topK=integer(top_k, "top_k", 0, INT32), hidden=integer(hidden, "hidden", 0, INT64),
        elementType=element, maxTokensPerRank=integer(max_tokens, "max_tokens", 0, INT64),
        maxReceivedTokensPerRank=0 if max_recv_tokens is None else integer(max_recv_tokens, "max_recv_tokens", 1, INT64),
        overflow=choice(overflow, "overflow", _abi.OVERFLOW_POLICIES), timeoutSeconds=seconds(timeout, "timeout"),
        fp8Scales=0 if fp8 is None else choice(fp8, "fp8", {k: v for k, v in _abi.FP8_SCALES.items() if k}),
        fp8Source=choice(fp8_source, "fp8_source", _abi.FP8_SOURCES))
    return config, element


def describe(target, group, algorithm, element):
    """Sets the group's facts as attributes of `target` (a group object) from epGroupGetInfo."""
    info = _abi.new(_abi.GroupInfo)
    call("epGroupGetInfo", group, ctypes.byref(info))
    target.ranks = info.ranks
    target.experts = info.experts
    target.local_experts = info.localExperts
    target.top_k = info.topK
    target.hidden = info.hidden
    target.max_tokens = info.maxTokensPerRank
    target.algorithm = algorithm
    target.layout = _abi.LAYOUT_NAMES[info.layout]
    target.alignment = info.alignment
    target.dtype = _abi.DTYPE_NAMES[element]
    #: shape of the dispatch ``tokens`` output and the combine ``expert_outputs`` input (per rank)
    target.recv_shape = tuple(info.receiveShape[:info.receiveNdim])
    #: shape of the dispatch ``topk_idx``/``topk_weights`` outputs (None for LL expert-major)
    target.recv_routing_shape = tuple(info.receiveRoutingShape[:info.receiveRoutingNdim]) or None
    #: FP8 groups: the scale mode ("float32", "ue8m0", "e8m0") and source ("quantize", "pass_through")
    target.fp8 = {v: k for k, v in _abi.FP8_SCALES.items()}[info.fp8Scales]
    target.fp8_source = {v: k for k, v in _abi.FP8_SOURCES.items()}[info.fp8Source]
    target._recv_element = info.receiveElementType
    #: shape of the dispatch ``scales`` output per rank (FP8 groups; None otherwise): float32
    #: scales, or int32 words of four exponent bytes
    target.recv_scales_shape = tuple(info.receiveScalesShape[:info.receiveScalesNdim]) or None
    target._scale_type = _abi.F32 if target.fp8 == "float32" else _abi.I32
    # what dispatch reads: e4m3 rows for an FP8 pass-through group, else the element type
    target._input_element = _abi.E4M3 if target.fp8_source == "pass_through" and target.fp8 else element


def check_buffers(target, copies):
    """Raises :class:`OutOfMemoryError` when the buffers a dispatch of `target` (a described group)
    allocates, `copies` of each (one per rank it drives), cannot exist: more bytes than any address
    space holds. Sizes that exist but do not fit in memory fail when allocated, also named."""
    buffers = [("the receive buffer (dispatch tokens, combine expert_outputs)", target.recv_shape, target._element)]
    if target.recv_routing_shape is not None:
        buffers.append(("the received topk_idx", target.recv_routing_shape, _abi.I32))
        buffers.append(("the received topk_weights", target.recv_routing_shape, _abi.F32))
    total = 0
    for name, shape, element in buffers:
        count = math.prod(shape) * _abi.DTYPE_SIZES[element]
        total += count * copies
        if count > INT64:
            raise OutOfMemoryError(
                f"{name}: {list(shape)} {_abi.DTYPE_NAMES[element]} needs "
                f"{_arrays.describe_bytes(count)} per rank; no buffer can exceed {INT64} bytes: lower max_tokens or "
                "hidden (HT: set max_recv_tokens)")
    if total > INT64:
        raise OutOfMemoryError(
            f"the dispatch outputs of {copies} ranks need {_arrays.describe_bytes(total)}; no process can hold more than "
            f"{INT64} bytes: lower max_tokens or hidden (HT: set max_recv_tokens)")


_TUNING = {"pipeline_depth": "pipelineDepth", "rows_in_flight": "rowsInFlight", "row_pieces": "rowPieces",
           "blocks_per_multiprocessor": "blocksPerMultiprocessor", "update_chunk_tokens": "updateChunkTokens",
           "fused_update": "fusedUpdate", "full_grid": "launchGrid", "serial_launches": "launches"}
# The boolean knobs: the C field's value for False and for True (1 and 2 are the field's explicit
# choices, 0 its default; full_grid=True is launchGrid 2, every SM's blocks).
_SWITCHES = {"fused_update": (2, 1), "full_grid": (1, 2), "serial_launches": (1, 2)}


def tuning(value):
    """The epGPUTuning_t of ``tuning=``: None (defaults) or a dict of ``pipeline_depth``
    (1...8), ``rows_in_flight`` (1...16), ``row_pieces``, ``blocks_per_multiprocessor`` (1 or
    2), ``update_chunk_tokens`` (HT: tokens each update block counts, default 256) and
    ``fused_update`` (LL: a bool; True: the stacked dispatch's update runs in its launch; left out:
    so for a VirtualGroup and an NCCLGroup of one rank, not at an NCCL rank with peers, whose one
    launch would hold every SM's dispatch blocks until the slowest peer's counts arrive)
    and ``full_grid`` (a bool, default False: dispatch and combine launch only the blocks the
    step's tokens need; True launches every SM's) and ``serial_launches`` (a bool, default False:
    the step kernels go as programmatic dependent launches where the GPU and driver can; True
    makes them plain launches); the library checks each against its bounds for the group."""
    result = _abi.GPUTuning()
    if value is None:
        return result
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"tuning={value!r} (type {type(value).__name__}); must be a dict of {sorted(_TUNING)} or None")
    for key, number in value.items():
        if key not in _TUNING:
            raise InvalidArgumentError(f"tuning[{key!r}]: not a tuning knob; must be one of {sorted(_TUNING)}")
        if key in _SWITCHES:
            if not isinstance(number, bool):
                raise InvalidArgumentError(f"tuning[{key!r}]={number!r} (type {type_name(number)}); must be True or False")
            setattr(result, _TUNING[key], _SWITCHES[key][number])
            continue
        setattr(result, _TUNING[key], integer(number, f"tuning[{key!r}]", 1, INT32))
    return result
