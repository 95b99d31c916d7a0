"""DeepEP's documented semantics in plain PyTorch, for the tests of expert_parallel.compat.deep_ep:
inputs whose arithmetic is exact (small integers, weights in quarters), and the results the
intranode and low-latency calls must give."""

from typing import List

import torch


def make_inputs(seed: int, tokens: List[int], experts: int, hidden: int, top_k: int, dtype=torch.bfloat16,
                minus_one_rate: float = 0.15):
    """Per rank: tokens ``[B, H]`` (integers in [-8, 8]), routing ``[B, K]`` int64 (distinct experts,
    some -1) and weights ``[B, K]`` float32 (quarters in [0.25, 2])."""
    g = torch.Generator().manual_seed(seed)
    xs, idx, ws = [], [], []
    for b in tokens:
        xs.append(torch.randint(-8, 9, (b, hidden), generator=g).to(dtype))
        rows = [torch.randperm(experts, generator=g)[:top_k] for _ in range(b)]
        routing = torch.stack(rows) if rows else torch.zeros((0, top_k), dtype=torch.int64)
        drop = torch.rand(routing.shape, generator=g) < minus_one_rate
        idx.append(torch.where(drop, -1, routing).to(torch.int64))
        ws.append(torch.randint(1, 9, (b, top_k), generator=g).float() / 4)
    return xs, idx, ws


def layout(topk_idx: torch.Tensor, experts: int, ranks: int):
    """(tokens per rank, tokens per expert, is_token_in_rank) of one rank's routing."""
    local = experts // ranks
    b = topk_idx.shape[0]
    in_rank = torch.zeros((b, ranks), dtype=torch.bool)
    per_expert = torch.zeros(experts, dtype=torch.int32)
    for t in range(b):
        for e in topk_idx[t].tolist():
            if e >= 0:
                in_rank[t, e // local] = True
                per_expert[e] += 1
    return in_rank.sum(0).to(torch.int32), per_expert, in_rank


def ht_dispatch(xs, idx, ws, experts: int, alignment: int = 1):
    """Per destination rank: received rows, local ids (-1 elsewhere), weights (0 there), rows per
    local expert rounded up to `alignment`, and each row's (source rank, token)."""
    ranks = len(xs)
    local = experts // ranks
    result = []
    for d in range(ranks):
        rows, ids, weights, sources = [], [], [], []
        for s in range(ranks):
            for t in range(xs[s].shape[0]):
                experts_t = idx[s][t]
                mine = (experts_t >= d * local) & (experts_t < (d + 1) * local)
                if mine.any():
                    rows.append(xs[s][t])
                    ids.append(torch.where(mine, experts_t - d * local, -1))
                    weights.append(torch.where(mine, ws[s][t], 0.0))
                    sources.append((s, t))
        h, k = xs[0].shape[1], idx[0].shape[1]
        x = torch.stack(rows) if rows else torch.zeros((0, h), dtype=xs[0].dtype)
        i = torch.stack(ids) if ids else torch.zeros((0, k), dtype=torch.int64)
        w = torch.stack(weights) if weights else torch.zeros((0, k))
        counts = [int((i == e).sum()) for e in range(local)]
        counts = [(c + alignment - 1) // alignment * alignment for c in counts]
        result.append(dict(x=x, idx=i, w=w, counts=counts, sources=sources))
    return result


def ht_combine(received, ys, tokens: List[int], dtype):
    """Per source rank: the sum, over the ranks it was sent to, of that rank's row (float32, one
    rounding to `dtype`)."""
    h = ys[0].shape[1]
    sums = [torch.zeros((b, h)) for b in tokens]
    for d, got in enumerate(received):
        for row, (s, t) in enumerate(got["sources"]):
            sums[s][t] += ys[d][row].float()
    return [total.to(dtype) for total in sums]


def ht_combine_weights(received, grads, tokens: List[int], top_k: int):
    """Per source rank: the sum of the ranks' received-weight rows (DeepEP's combined_topk_weights)."""
    sums = [torch.zeros((b, top_k)) for b in tokens]
    for d, got in enumerate(received):
        for row, (s, t) in enumerate(got["sources"]):
            sums[s][t] += grads[d][row]
    return sums


def expert_function(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """A stand-in for the experts of `rank`: exact in bf16 for the inputs above."""
    return (rows.float() * (rank + 1)).to(rows.dtype)


def ll_dispatch(xs, idx, experts: int, max_tokens: int):
    """Per destination rank: the rows ``[L, R*Bmax, H]`` per local expert in (source rank, token)
    order (zeros past the count), the counts ``[L]`` and each row's (source rank, token)."""
    ranks = len(xs)
    local = experts // ranks
    h = xs[0].shape[1]
    result = []
    for d in range(ranks):
        rows = torch.zeros((local, ranks * max_tokens, h), dtype=xs[0].dtype)
        counts, sources = [], []
        for e in range(local):
            expert = d * local + e
            zone = [(s, t) for s in range(ranks) for t in range(xs[s].shape[0]) if expert in idx[s][t].tolist()]
            for row, (s, t) in enumerate(zone):
                rows[e, row] = xs[s][t]
            counts.append(len(zone))
            sources.append(zone)
        result.append(dict(x=rows, counts=counts, sources=sources))
    return result


def ll_expert_function(rows: torch.Tensor, rank: int, local: int) -> torch.Tensor:
    """Local expert e of `rank` multiplies by its global id + 1."""
    scale = torch.arange(rank * local + 1, (rank + 1) * local + 1, dtype=torch.float32, device=rows.device).view(local, 1, 1)
    return (rows.float() * scale).to(rows.dtype)


def ll_combine(xs, idx, ws, experts: int, dtype):
    """Per rank: sum over k of w[t, k] * (the expert's output of token t), for ids that are not -1."""
    out = []
    for x, i, w in zip(xs, idx, ws):
        total = torch.zeros(x.shape)
        for k in range(i.shape[1]):
            valid = i[:, k] >= 0
            total += torch.where(valid, w[:, k], 0.0)[:, None] * x.float() * (i[:, k].float() + 1)[:, None]
        out.append(total.to(dtype))
    return out
