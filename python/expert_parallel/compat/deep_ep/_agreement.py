"""An all-gather of one picklable value per rank over a torch.distributed process group whose
wait is bounded: a rank whose call failed its own checks before the all-gather never comes to
it, and its peers get :class:`expert_parallel.RankTimeoutError` after ``timeout`` seconds (at least
MINIMUM_SECONDS) rather than the process group's own timeout (10 to 30 minutes)."""

from __future__ import annotations

import pickle
import time
from typing import Any, List

from ...errors import RankTimeoutError

#: The least wait: ranks may reach a shape's first call seconds apart (loading, compiling) without
#: anything being wrong.
MINIMUM_SECONDS = 60.0


def _device(process_group: Any) -> Any:
    """Where the gathered tensors live: the CPU for a gloo group (or one with a gloo part), the
    current CUDA device for an NCCL group."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(process_group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _wait(work: Any, deadline: float, timeout: float, what: str) -> None:
    """Polls `work` until it completes or `deadline` passes."""
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RankTimeoutError(
                f"{what}: a peer rank did not come within timeout={timeout} s (its call may have failed before this "
                "point, or it made another call); the process group has a collective left pending and cannot be "
                "used for this Buffer's calls any more")
        time.sleep(0.0005)
    work.wait()


def warm_up(process_group: Any) -> None:
    """One collective over `process_group` while every rank is known to be there (the Buffer's
    construction, collective in DeepEP too): an NCCL group sets up its communicator in its first
    collective, inside the call, where no deadline of ours can bound it; after this, the
    agreements' waits are only for the ranks."""
    import torch
    import torch.distributed as dist

    if dist.get_world_size(process_group) > 1:
        dist.all_reduce(torch.zeros(1, dtype=torch.int64, device=_device(process_group)), group=process_group)


def all_gather(process_group: Any, value: Any, timeout: float, what: str) -> List[Any]:
    """Every rank's `value`, in rank order, waiting at most max(`timeout`, MINIMUM_SECONDS)
    seconds; `what` names the agreement in a timeout's message."""
    import torch
    import torch.distributed as dist

    size = dist.get_world_size(process_group)
    if size == 1:
        return [value]
    device = _device(process_group)
    payload = pickle.dumps(value)
    timeout = max(timeout, MINIMUM_SECONDS)
    deadline = time.monotonic() + timeout
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    mine = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    _wait(dist.all_gather(lengths, mine, group=process_group, async_op=True), deadline, timeout, what)
    counts = [int(n.item()) for n in lengths]
    longest = max(counts)
    buffers = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(size)]
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    _wait(dist.all_gather(buffers, padded.to(device), group=process_group, async_op=True), deadline, timeout, what)
    return [pickle.loads(bytes(b[:n].cpu().numpy())) for b, n in zip(buffers, counts)]
