"""A tiny MoE with linear experts, two ways: over a group with expert_parallel.torch (the
experts run on the received rows of every layout) and densely on one device (every token
through its top-k experts). The torch tests compare them: values and gradients."""

import torch

from expert_parallel.torch import Exchange


def routing(seed, ranks, tokens, experts, top_k, hidden, dtype=torch.float32, minus_one_rate=0.15):
    """Stacked inputs: x [R, B, H], topk_idx [R, B, K] int64 (distinct experts, some -1),
    topk_weights [R, B, K] float32, expert maps [E, H, H]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(ranks * tokens)])
    idx = torch.where(torch.rand(idx.shape, generator=g) < minus_one_rate, torch.full_like(idx, -1), idx)
    x = torch.randn(ranks, tokens, hidden, generator=g).to(dtype)
    weights = torch.rand(ranks, tokens, top_k, generator=g)
    maps = (torch.randn(experts, hidden, hidden, generator=g) / hidden ** 0.5).to(dtype)
    return x, idx.reshape(ranks, tokens, top_k), weights, maps


def expert_coefficients(exchange: Exchange, sent):
    """[R, rows, L]: how much of local expert l's output each received row takes."""
    group = exchange.group
    r, l = group.ranks, group.local_experts
    experts = torch.arange(l, device=sent.tokens.device)
    if exchange.layout == "expert_major":   # zone l is expert l
        rows = group.recv_shape[1]
        return torch.eye(l, device=sent.tokens.device).repeat_interleave(rows, 0).expand(r, -1, -1)
    idx = sent.topk_idx.reshape(r, -1, *sent.topk_idx.shape[len(group.recv_shape):])
    if exchange.layout == "expert_major_padded":   # one id per row; combine applies the weights
        return (idx.unsqueeze(-1) == experts).float()
    weights = sent.topk_weights.reshape(idx.shape)
    return ((idx.unsqueeze(-1) == experts).float() * weights.unsqueeze(-1)).sum(-2)


def over_group(exchange: Exchange, x, idx, weights, maps):
    """The MoE through the group: dispatch, the linear experts on the received rows, combine."""
    group = exchange.group
    r, l, h = group.ranks, group.local_experts, group.hidden
    sent = exchange.dispatch(x, idx, weights)
    rows = sent.tokens.reshape(r, -1, h)
    local = maps.reshape(r, l, h, h)
    outputs = torch.einsum("rnh,rlhk->rnlk", rows.float(), local.float())
    mixed = (outputs * expert_coefficients(exchange, sent).unsqueeze(-1)).sum(2)
    return exchange.combine(mixed.to(x.dtype).reshape(sent.tokens.shape), sent)


def dense(x, idx, weights, maps):
    """Every token through its experts on one device: y[s, t] = sum_c w[s, t, c] x[s, t] @ M[e]."""
    chosen = maps[idx.clamp(min=0)].float()                          # [R, B, K, H, H]
    outputs = torch.einsum("rbh,rbkhj->rbkj", x.float(), chosen)
    weights = torch.where(idx >= 0, weights, torch.zeros_like(weights))
    return (outputs * weights.unsqueeze(-1)).sum(2).to(x.dtype)
