"""A handle passed to another Buffer than the one whose dispatch returned it (vLLM and SGLang keep
a Buffer per path, so a handle can cross over) is named, for every call that takes one: it ran on
the other Buffer's group outside this Buffer's lock, and once that Buffer was destroyed failed with
"the group is closed", naming neither the handle nor the Buffer."""

import pytest
import torch

import expert_parallel as ep
from expert_parallel.compat.deep_ep import Buffer, run_ranks

R, E, H, K, B = 2, 4, 16, 2, 3


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(R, B, H)
    idx = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(B)]) for _ in range(R)])
    return x, idx, torch.rand(R, B, K)


def _ll_handles(buffers, x, idx):
    return run_ranks(buffers, lambda b: b.low_latency_dispatch(x[b.rank], idx[b.rank], 4, E, use_fp8=False))


def _ht_handles(buffers, x, idx, w):
    def flow(b):
        r = b.rank
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx[r], E)
        return b.dispatch(x[r], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=idx[r], topk_weights=w[r])
    return run_ranks(buffers, flow)


@pytest.mark.parametrize("destroyed", [False, True])
def test_a_handle_of_another_buffer_is_named(destroyed):
    x, idx, w = _inputs()
    mine, other = Buffer.virtual(R, device="cpu", timeout=10), Buffer.virtual(R, device="cpu", timeout=10)
    ll = _ll_handles(other, x, idx)
    ht = _ht_handles(other, x, idx, w)
    if destroyed:
        for b in other:
            b.destroy()
    calls = {
        "low_latency_combine": lambda b: b.low_latency_combine(ll[b.rank][0], idx[b.rank], w[b.rank], ll[b.rank][2]),
        "get_next_low_latency_combine_buffer": lambda b: b.get_next_low_latency_combine_buffer(ll[b.rank][2]),
        "combine": lambda b: b.combine(ht[b.rank][0], ht[b.rank][4]),
        "dispatch": lambda b: b.dispatch(x[b.rank], handle=ht[b.rank][4]),
    }
    for name, call in calls.items():
        with pytest.raises(ep.InvalidArgumentError, match=r"^handle: from another Buffer's (low_latency_)?dispatch; "
                                                          r"this Buffer \(Buffer\(rank=0"):
            run_ranks(mine, call)
    # Its own handles still work, after the refusals (the ranks stayed in step).
    own = _ll_handles(mine, x, idx)
    ys = run_ranks(mine, lambda b: b.low_latency_combine(own[b.rank][0], idx[b.rank], w[b.rank], own[b.rank][2])[0])
    for r in range(R):
        torch.testing.assert_close(ys[r], (x[r][:, None, :] * w[r][:, :, None]).sum(1), rtol=1e-6, atol=1e-6)
    for b in mine + ([] if destroyed else other):
        b.destroy()
