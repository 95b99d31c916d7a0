"""expert_parallel: Mixture-of-Experts dispatch and combine between ranks.

ctypes bindings of libexpert_parallel.so (the C ABI of the ExpertParallel Swift library, see
include/expert_parallel.h). The library is found through $EP_LIBRARY (the file or its folder),
next to this package, or in the source checkout's .build/release/::

    import expert_parallel as ep
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32")
    out = group.dispatch(xs, topk_idx, topk_weights)   # lists of per-rank arrays
    y = group.combine(expert_outputs, out.handle)

One rank per process over NCCL (each process one GPU, torch.distributed initialised)::

    group = ep.NCCLGroup.from_process_group(experts=256, hidden=7168, top_k=8, max_tokens=128)
    out = group.dispatch(x, topk_idx, topk_weights)    # this rank's received tensors
    y = group.combine(expert_outputs, out.handle)

A group may be shared between threads: each call holds the group's lock (``group.lock``).
"""

from ._library import library_path
from ._version import __version__
from .errors import (
    CudaError,
    ExpertParallelError,
    InactiveRankError,
    InvalidArgumentError,
    InvalidUsageError,
    LibraryNotFoundError,
    NcclError,
    NotCopyableError,
    OutOfMemoryError,
    PeerFailedError,
    RankTimeoutError,
    ReceiveOverflowError,
)
from .group import DispatchResult, Handle, LayoutInfo, VirtualGroup
from .nccl_group import NCCLGroup, nccl_unique_id

__all__ = [
    "VirtualGroup",
    "NCCLGroup",
    "nccl_unique_id",
    "DispatchResult",
    "Handle",
    "LayoutInfo",
    "library_path",
    "ExpertParallelError",
    "InvalidArgumentError",
    "InvalidUsageError",
    "NotCopyableError",
    "ReceiveOverflowError",
    "RankTimeoutError",
    "PeerFailedError",
    "InactiveRankError",
    "CudaError",
    "NcclError",
    "OutOfMemoryError",
    "LibraryNotFoundError",
    "__version__",
]
