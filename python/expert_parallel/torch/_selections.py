"""Where each selection of a step lands in the LL layouts, computed from the routing with tensor
operations (so torch.compile traces it into the backward graph).

The engine's HT backward combine returns the weight gradients itself; LL's carries no weights,
so the two gradients that need a selection's receive row are found here, from the order
dispatch guarantees (docs/architecture.md): a zone holds its rows by source rank, then source
token. Every rank is assumed active (a masked rank changes the rows): the ops refuse a group
with a masked rank (_registry.Entry.require_active)."""

from __future__ import annotations

from typing import Tuple

import torch

from ..errors import InvalidArgumentError


def ll_rows(topk_idx: torch.Tensor, ranks: int, local_experts: int, max_tokens: int,
            layout: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every selection (s, t, c) of a stacked ``[R, B, K]`` routing: the destination rank, the
    row in that rank's receive buffer (its leading dimensions flattened: expert-major
    ``l * R * Bmax + position in zone``, rank-major ``s * Bmax + position among s's tokens``) and
    whether the selection exists (expert != -1). Rows and ranks of missing selections are 0."""
    r, b, k = topk_idx.shape
    idx = topk_idx.long()
    valid = idx >= 0
    expert = idx.clamp(min=0)
    dest = expert // local_experts
    ones = valid.to(torch.int64)
    if layout == "expert_major":
        flat = expert.reshape(r * b, k)
        chosen = torch.zeros(r * b, ranks * local_experts, dtype=torch.int64, device=idx.device)
        chosen = chosen.scatter_add(1, flat, ones.reshape(r * b, k))
        before = chosen.cumsum(0) - chosen                   # earlier (rank, token) rows per expert
        position = before.gather(1, flat).reshape(r, b, k)
        row = (expert % local_experts) * (ranks * max_tokens) + position
    elif layout == "rank_major":
        goes = torch.zeros(r, b, ranks, dtype=torch.int64, device=idx.device).scatter_add(2, dest, ones)
        goes = (goes > 0).to(torch.int64)                    # token (s, t) sends a row to rank d
        position = (goes.cumsum(1) - goes).gather(2, dest)
        source = torch.arange(r, device=idx.device).reshape(r, 1, 1)
        row = source * max_tokens + position
    else:
        raise InvalidArgumentError(f"layout={layout!r}; only the LL layouts need selection rows")
    zero = torch.zeros_like(row)
    return torch.where(valid, dest, zero), torch.where(valid, row, zero), valid
