"""Buffer's constructor arguments that the adapter takes and does not use (buffer sizes, RDMA
queue pairs, NVLink and fabric switches, lifetime flags), checked as DeepEP checks them: a value
DeepEP refuses (a string for a flag, a negative or unaligned byte count) is named here rather than
ignored, and every value DeepEP takes is taken."""

from __future__ import annotations

from typing import Any, Dict

from ..._config import integer
from ...errors import InvalidArgumentError
from ._errors import not_supported
from ._layout import flag

#: DeepEP's NUM_BUFFER_ALIGNMENT_BYTES: its buffers' byte counts are multiples of it
ALIGNMENT = 128
#: DeepEP's bound on a buffer's bytes: bytes / sizeof(int4) < INT_MAX
MAX_BYTES = 16 * (2**31 - 1) - 1
_INT32 = 2**31 - 1

#: The switches (pybind11 bools in DeepEP's runtime, or tested as flags in its Python) and their defaults.
FLAGS = {"allow_nvlink_for_low_latency_mode": True, "allow_mnnvl": False, "use_fabric": False, "explicitly_destroy": False,
         "enable_shrink": False}
#: Buffer's constructor keywords that Buffer.virtual takes besides its own, and ignores.
VIRTUAL_IGNORED = ("group", "num_qps_per_rank", "comm", "max_tokens_per_rank", *FLAGS)


def byte_count(value: Any, name: str) -> int:
    """`value` as a buffer's byte count: an integer in [0, MAX_BYTES], a multiple of ALIGNMENT
    (DeepEP asserts both; a float is refused by its int64 argument)."""
    count = integer(value, name, 0, MAX_BYTES)
    if count % ALIGNMENT:
        raise InvalidArgumentError(f"{name}={count}; must be a multiple of {ALIGNMENT} bytes (DeepEP's NUM_BUFFER_ALIGNMENT_BYTES)")
    return count


def checked(num_nvl_bytes: Any, num_rdma_bytes: Any, low_latency_mode: Any, num_qps_per_rank: Any = 24,
            **switches: Any) -> "tuple[int, int, bool]":
    """(num_nvl_bytes, num_rdma_bytes, low_latency_mode) checked, and the other arguments with
    them: byte counts (:func:`byte_count`), flags (a bool, or 0 / 1), ``num_qps_per_rank`` an
    integer ≥ 0, ≥ 1 in low-latency mode (DeepEP asserts it there, where its RDMA uses them)."""
    nvl, rdma = byte_count(num_nvl_bytes, "num_nvl_bytes"), byte_count(num_rdma_bytes, "num_rdma_bytes")
    low_latency = flag(low_latency_mode, "low_latency_mode")
    qps = integer(num_qps_per_rank, "num_qps_per_rank", 0, _INT32)
    if low_latency and qps < 1:
        raise InvalidArgumentError(f"num_qps_per_rank={qps}; must be ≥ 1 with low_latency_mode=True (DeepEP's queue pairs per rank)")
    for name, value in switches.items():
        flag(value, name)
    return nvl, rdma, low_latency


def virtual_ignored(num_nvl_bytes: Any, num_rdma_bytes: Any, low_latency_mode: Any,
                    ignored: Dict[str, Any]) -> "tuple[int, int, bool]":
    """:func:`checked` for Buffer.virtual, whose other keywords (`ignored`) must be Buffer's
    constructor keywords, each checked as Buffer checks it (a misspelt one was taken and ignored)."""
    for name in ignored:
        if name not in VIRTUAL_IGNORED:
            raise InvalidArgumentError(f"Buffer.virtual() got an unexpected keyword argument {name!r}; it takes ranks, device, "
                                       "timeout and Buffer's constructor keywords (num_nvl_bytes, num_rdma_bytes, low_latency_mode, "
                                       + ", ".join(VIRTUAL_IGNORED) + ")")
    if ignored.get("comm") is not None:
        raise not_supported("comm", ignored["comm"], "virtual ranks meet in this process: pass no comm")
    if ignored.get("max_tokens_per_rank") is not None:
        integer(ignored["max_tokens_per_rank"], "max_tokens_per_rank", 1, _INT32)
    return checked(num_nvl_bytes, num_rdma_bytes, low_latency_mode, ignored.get("num_qps_per_rank", 24),
                   **{name: ignored[name] for name in FLAGS if name in ignored})
