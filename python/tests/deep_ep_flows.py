"""The DeepEP flows the compat tests run, on any device: each takes the ranks' Buffers (one thread
per rank, or the one Buffer of a torch.distributed rank) and inputs, and returns what every rank
saw, on the CPU, for comparison with deep_ep_reference."""

from typing import Any, Dict, List

import torch

import deep_ep_reference as ref
from expert_parallel.compat.deep_ep import Buffer, run_ranks


def virtual_buffers(ranks: int, **settings):
    """R virtual-rank Buffers for a module's tests (a generator for a fixture): destroyed after."""
    buffers = Buffer.virtual(ranks, **settings)
    yield buffers
    for b in buffers:
        b.destroy()


def on_ranks(buffers: List[Buffer], function) -> List[Any]:
    """`function(buffer)` on every rank: a thread each for virtual ranks, directly for one."""
    if len(buffers) == 1:
        return [function(buffers[0])]
    return run_ranks(buffers, function, timeout=120)


def cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: cpu(v) for k, v in value.items()}
    return value


def intranode(buffers: List[Buffer], xs, idx, ws, experts: int, *, alignment: int = 1, async_finish: bool = False,
              ranks: int = None) -> List[Dict[str, Any]]:
    """get_dispatch_layout → dispatch → experts → combine (with weights), then the backward pass:
    a cached dispatch of gradients and a combine of their results with weight gradients."""
    device = buffers[0].device
    ranks = ranks or buffers[0].group_size

    def rank_flow(buffer: Buffer) -> Dict[str, Any]:
        r = buffer.rank
        x, i, w = xs[r].to(device), idx[r].to(device), ws[r].to(device)
        per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(i, experts, async_finish=async_finish)
        event.current_stream_wait()
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=i, topk_weights=w, expert_alignment=alignment,
            previous_event=event, async_finish=async_finish)
        event.current_stream_wait()
        y = ref.expert_function(recv_x, r)
        combined, combined_w, event = buffer.combine(y, handle, topk_weights=recv_w, async_finish=async_finish)
        event.current_stream_wait()
        # Backward: combine's gradient goes out by a cached dispatch, dispatch's comes back by combine.
        grad = (x.float() * 2).to(x.dtype)
        back = buffer.dispatch(grad, handle=handle, async_finish=async_finish)
        back[5].current_stream_wait()
        grad_w = recv_w * 3
        grad_x, grad_topk, event = buffer.combine(back[0], handle, topk_weights=grad_w)
        return cpu(dict(layout=(per_rank, per_rdma, per_expert, in_rank), recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w,
                        counts=counts, combined=combined, combined_w=combined_w, back=back[:5], grad_x=grad_x,
                        grad_topk=grad_topk, num_recv=handle.num_recv_tokens))

    return on_ranks(buffers, rank_flow)


def low_latency(buffers: List[Buffer], xs, idx, ws, experts: int, max_tokens: int, *, hook: bool = False,
                async_finish: bool = False) -> List[Dict[str, Any]]:
    """Two micro-batches: dispatch both (with hooks: send, then receive), run the experts, combine
    both (into ``out=`` for the second)."""
    device = buffers[0].device
    local = experts // buffers[0].group_size

    def rank_flow(buffer: Buffer) -> Dict[str, Any]:
        r = buffer.rank
        x, i, w = xs[r].to(device), idx[r].to(device), ws[r].to(device)
        stats = torch.zeros(local, dtype=torch.int32, device=device)
        first = buffer.low_latency_dispatch(x, i, max_tokens, experts, cumulative_local_expert_recv_stats=stats,
                                            use_fp8=False, async_finish=async_finish, return_recv_hook=hook)
        second = buffer.low_latency_dispatch(x.flip(0), i.flip(0), max_tokens, experts, use_fp8=False,
                                             async_finish=async_finish, return_recv_hook=hook)
        for recv_x, count, handle, event, receive in (first, second):
            if hook:
                receive()
            event.current_stream_wait()
        seen = [(cpu(d[0]).clone(), cpu(d[1]).clone()) for d in (first, second)]
        y1 = ref.ll_expert_function(first[0], r, local)
        y2 = ref.ll_expert_function(second[0], r, local)
        combined, event, receive = buffer.low_latency_combine(y1, i, w, first[2], async_finish=async_finish,
                                                              return_recv_hook=hook)
        if hook:
            receive()
        event.current_stream_wait()
        out = torch.empty_like(x)
        again, event, receive = buffer.low_latency_combine(y2, i.flip(0), w.flip(0), second[2], out=out, return_recv_hook=hook)
        if hook:
            receive()
        return cpu(dict(received=seen, combined=combined, flipped=again, same_out=again.data_ptr() == out.data_ptr(),
                        stats=stats))

    return on_ranks(buffers, rank_flow)


def ranked(results, only=None):
    """(rank, result) pairs: every rank's results, or (`only`) the one result of rank `only` (a
    torch.distributed rank's own)."""
    return [(only, results[0])] if only is not None else list(enumerate(results))


def check_intranode(results, xs, idx, ws, experts: int, alignment: int = 1, only=None) -> None:
    """Asserts every rank's intranode results (`only`: that rank's) equal the reference's, bit for bit."""
    ranks = len(xs)
    tokens = [x.shape[0] for x in xs]
    want = ref.ht_dispatch(xs, idx, ws, experts, alignment)
    for r, got in ranked(results, only):
        per_rank, per_rdma, per_expert, in_rank = got["layout"]
        w_rank, w_expert, w_in = ref.layout(idx[r], experts, ranks)
        assert per_rdma is None
        assert torch.equal(per_rank, w_rank) and torch.equal(per_expert, w_expert) and torch.equal(in_rank, w_in), r
        assert torch.equal(got["recv_x"], want[r]["x"]), f"rank {r} recv_x"
        assert got["recv_idx"].dtype == torch.int64 and torch.equal(got["recv_idx"], want[r]["idx"]), f"rank {r} recv_topk_idx"
        assert torch.equal(got["recv_w"], want[r]["w"]), f"rank {r} recv_topk_weights"
        assert got["counts"] == want[r]["counts"], f"rank {r} counts"
        assert got["num_recv"] == want[r]["x"].shape[0]
    ys = [ref.expert_function(w["x"], r) for r, w in enumerate(want)]
    combined = ref.ht_combine(want, ys, tokens, xs[0].dtype)
    combined_w = ref.ht_combine_weights(want, [w["w"] for w in want], tokens, idx[0].shape[1])
    grads = [(x.float() * 2).to(x.dtype) for x in xs]
    grad_x = ref.ht_combine(want, [ref.ht_dispatch(grads, idx, ws, experts)[d]["x"] for d in range(ranks)], tokens, xs[0].dtype)
    grad_topk = ref.ht_combine_weights(want, [w["w"] * 3 for w in want], tokens, idx[0].shape[1])
    for r, got in ranked(results, only):
        assert torch.equal(got["combined"], combined[r]), f"rank {r} combined_x"
        assert torch.equal(got["combined_w"], combined_w[r]), f"rank {r} combined_topk_weights"
        assert torch.equal(got["combined_w"], torch.where(idx[r] >= 0, ws[r], 0.0))
        back = got["back"]
        assert back[1:] == (None, None, None, None) and not isinstance(back[0], tuple)
        assert torch.equal(back[0], want[r]["x"].float().mul(2).to(xs[0].dtype)), f"rank {r} cached dispatch"
        assert torch.equal(got["grad_x"], grad_x[r]), f"rank {r} backward combine"
        assert torch.equal(got["grad_topk"], grad_topk[r]), f"rank {r} weight gradients"


def check_low_latency(results, xs, idx, ws, experts: int, max_tokens: int, only=None) -> None:
    """Asserts every rank's low-latency results (`only`: that rank's) equal the reference's, bit for bit."""
    ranks = len(xs)
    local = experts // ranks
    flipped = [x.flip(0) for x in xs], [i.flip(0) for i in idx], [w.flip(0) for w in ws]
    wants = [ref.ll_dispatch(xs, idx, experts, max_tokens), ref.ll_dispatch(flipped[0], flipped[1], experts, max_tokens)]
    for r, got in ranked(results, only):
        for (recv_x, count), want in zip(got["received"], wants):
            assert recv_x.shape == (local, ranks * max_tokens, xs[0].shape[1])
            assert count.dtype == torch.int32 and count.tolist() == want[r]["counts"], f"rank {r} recv_count"
            for e, c in enumerate(want[r]["counts"]):
                assert torch.equal(recv_x[e, :c], want[r]["x"][e, :c]), f"rank {r} expert {e}"
        assert got["stats"].tolist() == wants[0][r]["counts"]
        assert got["same_out"]
    combined = ref.ll_combine(xs, idx, ws, experts, xs[0].dtype)
    again = ref.ll_combine(*flipped, experts, xs[0].dtype)
    for r, got in ranked(results, only):
        assert torch.equal(got["combined"], combined[r]), f"rank {r} combined_x"
        assert torch.equal(got["flipped"], again[r]), f"rank {r} second micro-batch"
