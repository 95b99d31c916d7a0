"""A Megatron-style MoE token dispatcher over expert_parallel.compat.deep_ep (DeepEP's Buffer API).

The dispatcher follows Megatron-LM's flex dispatcher with DeepEP: ``setup_metadata`` takes the
router's top-k experts and probabilities, ``dispatch`` sends the tokens (an autograd function
whose backward pass is a combine), the received rows are permuted by local expert, the experts
run, the rows are restored and weighted, and ``combine`` brings them home (its backward pass is
a cached dispatch). Run it on the CPU with R virtual ranks, one thread each:

    EP_LIBRARY=/path/libexpert_parallel.so PYTHONPATH=python python3 examples/megatron_dispatcher.py

It checks every rank's outputs and gradients against a dense single-process computation.
"""

from __future__ import annotations

import argparse
from typing import Any, List, Tuple

import torch

from expert_parallel.compat.deep_ep import Buffer, run_ranks


class _Dispatch(torch.autograd.Function):
    """DeepEP dispatch; its gradient goes back by combine."""

    @staticmethod
    def forward(ctx: Any, buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                num_experts: int) -> Tuple[Any, ...]:
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, torch.tensor(counts), handle

    @staticmethod
    def backward(ctx: Any, grad_x: torch.Tensor, _idx: Any, grad_w: torch.Tensor, *_: Any) -> Tuple[Any, ...]:
        grad_w = torch.zeros_like(grad_w) if grad_w is None else grad_w.contiguous()
        x, w, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=grad_w)
        return None, x, None, w, None


class _Combine(torch.autograd.Function):
    """DeepEP combine; its gradient goes back by a cached dispatch with the same handle."""

    @staticmethod
    def forward(ctx: Any, buffer: Buffer, x: torch.Tensor, handle: Any) -> torch.Tensor:
        ctx.buffer, ctx.handle = buffer, handle
        return buffer.combine(x, handle)[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        return None, ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)[0], None


class DeepEPDispatcher:
    """Megatron's dispatcher shape: setup_metadata → dispatch → permute → experts → restore → combine."""

    def __init__(self, buffer: Buffer, num_experts: int) -> None:
        self.buffer, self.num_experts = buffer, num_experts
        self.num_local_experts = num_experts // buffer.group_size

    def setup_metadata(self, topk_idx: torch.Tensor, probs: torch.Tensor) -> None:
        self.topk_idx, self.probs = topk_idx, probs

    def dispatch(self, hidden: torch.Tensor) -> torch.Tensor:
        recv_x, self.recv_idx, self.recv_probs, self.tokens_per_expert, self.handle = _Dispatch.apply(
            self.buffer, hidden, self.topk_idx, self.probs, self.num_experts)
        return recv_x

    def permute(self, recv_x: torch.Tensor) -> torch.Tensor:
        """One row per (received token, local expert), grouped by expert (Megatron's permute)."""
        rows, ks = torch.nonzero(self.recv_idx >= 0, as_tuple=True)
        order = torch.argsort(self.recv_idx[rows, ks] * recv_x.shape[0] + rows, stable=True)
        self.rows, self.ks = rows[order], ks[order]
        return recv_x[self.rows]

    def restore(self, expert_out: torch.Tensor, rows: int) -> torch.Tensor:
        """Each received token's expert rows weighted by its probabilities and summed (unpermute)."""
        weighted = expert_out * self.recv_probs[self.rows, self.ks].unsqueeze(1)
        return torch.zeros((rows, expert_out.shape[1]), dtype=expert_out.dtype).index_add(0, self.rows, weighted)

    def combine(self, hidden: torch.Tensor) -> torch.Tensor:
        return _Combine.apply(self.buffer, hidden, self.handle)


def experts_forward(permuted: torch.Tensor, counts: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    """Each local expert's linear layer on its zone of the permuted rows."""
    pieces = torch.split(permuted, counts.tolist())
    return torch.cat([piece @ w for piece, w in zip(pieces, weights)]) if pieces else permuted


def main(ranks: int = 4, experts: int = 8, hidden: int = 32, top_k: int = 2, tokens: int = 24, seed: int = 0) -> float:
    """Runs the MoE layer on `ranks` virtual ranks; returns the largest difference from the dense
    computation over outputs and gradients (raises when it is not small)."""
    g = torch.Generator().manual_seed(seed)
    expert_weights = [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5 for _ in range(experts)]
    xs = [torch.randn(tokens + r, hidden, generator=g) for r in range(ranks)]
    logits = [torch.randn(x.shape[0], experts, generator=g) for x in xs]
    local = experts // ranks

    def layer(buffer: Buffer) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = buffer.rank
        x = xs[r].clone().requires_grad_()
        probs, topk_idx = torch.softmax(logits[r], dim=1).topk(top_k, dim=1)
        probs = probs.detach().requires_grad_()
        mine = [w.clone().requires_grad_() for w in expert_weights[r * local:(r + 1) * local]]
        dispatcher = DeepEPDispatcher(buffer, experts)
        dispatcher.setup_metadata(topk_idx, probs)
        recv_x = dispatcher.dispatch(x)
        permuted = dispatcher.permute(recv_x)
        counts = torch.bincount(dispatcher.recv_idx[dispatcher.rows, dispatcher.ks], minlength=local)
        assert counts.tolist() == dispatcher.tokens_per_expert.tolist()
        out = dispatcher.combine(dispatcher.restore(experts_forward(permuted, counts, mine), recv_x.shape[0]))
        (out * torch.arange(hidden)).sum().backward()   # every rank's backward: a cached dispatch, then a combine
        return out.detach(), x.grad, probs.grad

    buffers = Buffer.virtual(ranks)
    results = run_ranks(buffers, layer, timeout=120)
    worst = 0.0
    for r, (out, grad_x, grad_probs) in enumerate(results):
        x = xs[r].clone().requires_grad_()
        probs, topk_idx = torch.softmax(logits[r], dim=1).topk(top_k, dim=1)
        probs = probs.detach().requires_grad_()
        dense = sum(probs[:, k:k + 1] * torch.stack([x[t] @ expert_weights[int(topk_idx[t, k])] for t in range(x.shape[0])])
                    for k in range(top_k))
        (dense * torch.arange(hidden)).sum().backward()
        for got, want in ((out, dense.detach()), (grad_x, x.grad), (grad_probs, probs.grad)):
            worst = max(worst, float((got - want).abs().max()))
    for b in buffers:
        b.destroy()
    if worst > 1e-3:
        raise AssertionError(f"the dispatcher differs from the dense layer by {worst}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    options = parser.parse_args()
    difference = main(options.ranks, options.experts, options.hidden, options.top_k, options.tokens)
    print(f"ok: {options.ranks} ranks, outputs and gradients within {difference:.2e} of the dense layer")
