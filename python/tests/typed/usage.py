"""What users write against the package's public API, as its docs show it: checked by mypy
(test_typing.py), never run (it is not a test module). The package ships py.typed, so a user's type checker reads these
signatures: each call here must type-check as written (a stacked tensor where a per-rank
argument is taken, a torch stream and event, a handle used as a context manager...)."""

from typing import List, Optional

import numpy as np
import torch

import expert_parallel as ep
from expert_parallel.compat.deep_ep import Buffer, Config, EventOverlap, install_as_deep_ep, run_ranks
from expert_parallel.torch import Dispatched, Exchange


def virtual_group_calls(stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32",
                            algorithm="ll", layout="expert_major", device="cpu", overflow="fail")
    xs = [np.full((1, 8), 1.0, np.float32), np.full((1, 8), 2.0, np.float32)]
    topk_idx = [np.array([[0, 3]], np.int32)] * 2
    topk_weights = [np.array([[0.25, 0.5]], np.float32)] * 2
    out = group.dispatch(xs, topk_idx, topk_weights)
    counters: List[int] = list(out.layout[0].expert_counters)
    y = group.combine(out.tokens, out.handle)
    print(counters, y[1][0, 0])

    # Stacked [R, B, ...] tensors: the fast path.
    x, idx, w = torch.zeros(2, 2, 8), torch.zeros(2, 2, 2, dtype=torch.int32), torch.zeros(2, 2, 2)
    stacked = group.dispatch(x, idx, w)
    combined = group.combine(stacked.received, stacked.handle, out=torch.empty(2, 2, 8))
    print(combined, stacked.expert_counts, stacked.topk_idx, stacked.topk_weights)

    # Several live handles, overlap, a backward dispatch.
    h = group.handle()
    sent = group.dispatch(x, idx, w, handle=h, stream=stream, wait_event=event, record_event=True, send_only=True)
    if sent.hook is not None:
        sent.hook()
    print(sent.event)
    group.combine(sent.received, h, stream=stream)
    back = group.dispatch(x, None, w, handle=h, direction="backward")
    print(back.tokens)
    h.release()
    with group.handle() as step:
        group.combine(group.dispatch(x, idx, w, handle=step).received, step)
    group.complete(stream=stream)

    # Masks, checks, closing.
    active: List[int] = group.active_ranks
    group.deactivate(1)
    group.clean([1])
    group.clean()
    group.check()
    group.synchronize()
    print(active, group.ranks, group.layout, group.recv_shape, group.buffer_slots)
    group.close()


def nccl_group_calls(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, expert_outputs: torch.Tensor) -> None:
    group = ep.NCCLGroup.from_process_group(experts=256, hidden=7168, top_k=8, max_tokens=128, dtype="bf16")
    out = group.dispatch(x, topk_idx, topk_weights)
    y: torch.Tensor = group.combine(expert_outputs, out.handle)
    group.update(topk_idx)
    print(y, out.expert_outputs, out.layout)
    group.check()
    group.close()


def exchange_calls(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    group = ep.VirtualGroup(ranks=4, experts=16, hidden=64, top_k=4, max_tokens=32, dtype="bf16",
                            algorithm="ht", layout="flat", device="cuda:0")
    exchange = Exchange(group, zero_fill=False)
    sent: Dispatched = exchange.dispatch(x, topk_idx, topk_weights)
    y = exchange.combine(sent.tokens * 2, sent)
    exchange.close()
    return y


def deep_ep_calls(x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
    install_as_deep_ep()
    buffers = Buffer.virtual(4, device="cpu")

    def rank(buffer: Buffer) -> torch.Tensor:
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx[buffer.rank], 16)
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x[buffer.rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx[buffer.rank], topk_weights=weights[buffer.rank],
            config=Config(24, 6, 256))
        assert isinstance(event, EventOverlap)
        return buffer.combine(recv_x, handle)[0]

    combined = run_ranks(buffers, rank)
    return combined[0] if combined else None


def deep_ep_low_latency_calls(group: torch.distributed.ProcessGroup, x: torch.Tensor, topk_idx: torch.Tensor,
                              topk_weights: torch.Tensor) -> torch.Tensor:
    """The low-latency path as vLLM and SGLang call it."""
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    buffer = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=32)
    buffer.clean_low_latency_buffer(128, 7168, 256)
    recv, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, 128, 256, use_fp8=False, async_finish=False, return_recv_hook=True)
    if hook is not None:
        hook()
    event.current_stream_wait()
    combined, event, hook = buffer.low_latency_combine(recv, topk_idx, topk_weights, handle, zero_copy=False,
                                                      async_finish=True, return_recv_hook=False)
    print(recv_count, Buffer.get_dispatch_config(8), Buffer.get_combine_config(8))
    buffer.destroy()
    result: torch.Tensor = combined
    return result


try:
    virtual_group_calls(torch.cuda.Stream(), torch.cuda.Event())
except ep.ExpertParallelError as error:
    print(error.status, error.status_name)
