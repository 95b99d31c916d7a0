"""A DeepSeek-style MoE block over expert parallelism with expert_parallel.torch.

The block: a router (softmax scores over E routed experts, top-k, the chosen scores renormalised
and scaled), E SwiGLU experts spread over R ranks (L = E / R per rank), and an optional shared
expert every token goes through. Tokens travel to their experts' ranks with the group's dispatch
and come back with its combine; autograd runs the backward pass through the same steps (a
backward combine, then a backward dispatch), so the gradients reach the tokens, the router and
every expert.

The R ranks are virtual: one process drives all of them, on the CPU backend or on one GPU, with
the tokens and expert weights stacked over the ranks (``[R, B, H]``, expert e = r * L + l on rank
r). The script checks the block's forward and backward against the same block computed densely
on one device (every token through its top-k experts, no dispatch) and exits 1 when they differ:

    python examples/moe_layer.py                          # CPU backend, float32, LL expert-major
    python examples/moe_layer.py --layout flat --compile  # HT flat, under torch.compile(fullgraph=True)
    python examples/moe_layer.py --device cuda:0 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))   # the package, from a checkout

import expert_parallel as ep                  # noqa: E402
from expert_parallel.torch import Dispatched, Exchange  # noqa: E402

ALGORITHMS = {"expert_major": "ll", "rank_major": "ll", "flat": "ht", "expert_major_padded": "ht"}
#: the largest difference from the dense reference, relative to the reference's largest value
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def swiglu(rows: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, up: str, down: str) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) in float32; `up` and `down` are the einsums of the projections."""
    rows = rows.float()
    hidden = F.silu(torch.einsum(up, rows, w1.float())) * torch.einsum(up, rows, w3.float())
    return torch.einsum(down, hidden, w2.float())


class MoEBlock(nn.Module):
    """The block over `exchange`'s group: ``forward(x [R, B, H]) -> [R, B, H]``."""

    def __init__(self, exchange: Exchange, ffn: int, shared_ffn: Optional[int] = None, route_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        group = exchange.group
        self.exchange, self.route_scale = exchange, route_scale
        self.ranks, self.local, self.top_k, hidden = group.ranks, group.local_experts, group.top_k, group.hidden
        experts = group.experts
        g = torch.Generator().manual_seed(seed)

        def weight(*shape: int, fan_in: int, kind: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=g) / fan_in ** 0.5).to(kind))

        self.gate = weight(hidden, experts, fan_in=hidden, kind=torch.float32)   # routing stays in float32
        self.w1 = weight(experts, hidden, ffn, fan_in=hidden)
        self.w3 = weight(experts, hidden, ffn, fan_in=hidden)
        self.w2 = weight(experts, ffn, hidden, fan_in=ffn)
        self.shared = None
        if shared_ffn:
            self.shared = nn.ParameterList([weight(hidden, shared_ffn, fan_in=hidden), weight(hidden, shared_ffn, fan_in=hidden),
                                            weight(shared_ffn, hidden, fan_in=shared_ffn)])

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """top-k experts per token and their weights (renormalised softmax scores)."""
        scores = torch.softmax(x.float() @ self.gate, dim=-1)
        weights, idx = scores.topk(self.top_k, dim=-1)
        return idx, weights / weights.sum(-1, keepdim=True) * self.route_scale

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.shared
        return swiglu(x, w1, w3, w2, "...h,hf->...f", "...f,fh->...h")

    def experts(self, sent: Dispatched) -> torch.Tensor:
        """Rank r's local experts on the rows it received, shaped like ``sent.tokens``."""
        r, l = self.ranks, self.local
        w1, w3, w2 = (w.reshape(r, l, *w.shape[1:]) for w in (self.w1, self.w3, self.w2))   # [R, L, ...]
        layout = self.exchange.layout
        if layout == "expert_major":   # zone l of rank r holds expert r * L + l's rows
            return swiglu(sent.tokens, w1, w3, w2, "rlnh,rlhf->rlnf", "rlnf,rlfh->rlnh").to(sent.tokens.dtype)
        # One row per (token, rank) or per selection: every local expert on every row, mixed by the
        # row's share of each (a grouped GEMM would run each expert on its rows only).
        rows = sent.tokens.reshape(r, -1, sent.tokens.shape[-1])
        outputs = swiglu(rows, w1, w3, w2, "rnh,rlhf->rlnf", "rlnf,rlfh->rlnh")          # [R, L, n, H]
        ids = sent.topk_idx.reshape(r, rows.shape[1], -1)                           # local expert ids, -1: none
        share = (ids.unsqueeze(-1) == torch.arange(l, device=ids.device)).float()   # [R, n, K', L]
        if layout != "expert_major_padded":    # padded: combine applies the per-row weights
            share = share * sent.topk_weights.reshape(ids.shape).unsqueeze(-1)
        mixed = torch.einsum("rlnh,rnl->rnh", outputs, share.sum(2))
        return mixed.to(sent.tokens.dtype).reshape(sent.tokens.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.route(x)
        sent = self.exchange.dispatch(x, idx, weights)
        y = self.exchange.combine(self.experts(sent), sent)
        if self.shared is not None:
            y = (y.float() + self.shared_expert(x)).to(x.dtype)
        return y

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on one device in float32: every token through its top-k experts."""
        idx, weights = self.route(x)
        outputs = swiglu(x, self.w1, self.w3, self.w2, "rbh,ehf->rbef", "rbef,efh->rbeh")   # [R, B, E, H]
        chosen = outputs.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, outputs.shape[-1]))
        y = (chosen * weights.unsqueeze(-1)).sum(2)
        if self.shared is not None:
            y = y + self.shared_expert(x)
        return y


def compare(block: MoEBlock, x: torch.Tensor, backend: Optional[str] = None, seed: int = 1) -> Dict[str, float]:
    """The largest difference between the block over the group and the dense block, relative to
    the dense value's largest magnitude: the output, and the gradients of the input and of every
    parameter for the loss sum(y * probe). `backend`: run the block under
    ``torch.compile(fullgraph=True, backend=backend)`` (None: eagerly)."""
    forward = block if backend is None else torch.compile(block, fullgraph=True, backend=backend)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    results = []
    for run in (forward, block.dense):
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        y = run(leaf)
        (y.float() * probe).sum().backward()
        results.append({"output": y.detach().float(), "grad x": leaf.grad.float(),
                        **{f"grad {name}": p.grad.float() for name, p in block.named_parameters()}})
    got, want = results
    return {name: ((got[name] - want[name]).abs().max() / want[name].abs().max().clamp(min=1e-30)).item()
            for name in want}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (the CPU backend) or cuda:N (virtual ranks on one GPU)")
    parser.add_argument("--layout", default="expert_major", choices=sorted(ALGORITHMS))
    parser.add_argument("--dtype", default=None, choices=["f32", "bf16", "f16"], help="default: f32 on the CPU, bf16 on a GPU")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=16)
    parser.add_argument("--shared-ffn", type=int, default=24, help="0: no shared expert")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per rank")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="run the block under torch.compile(fullgraph=True) (default backend: inductor)")
    args = parser.parse_args(argv)

    dtype_name = args.dtype or ("f32" if args.device == "cpu" else "bf16")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
    group = ep.VirtualGroup(ranks=args.ranks, experts=args.experts, hidden=args.hidden, top_k=args.top_k,
                            max_tokens=args.tokens, dtype=dtype_name, device=args.device,
                            algorithm=ALGORITHMS[args.layout], layout=args.layout,
                            alignment=4 if args.layout == "expert_major_padded" else 1)
    with Exchange(group) as exchange:
        block = MoEBlock(exchange, ffn=args.ffn, shared_ffn=args.shared_ffn or None, dtype=dtype).to(args.device)
        x = torch.randn(args.ranks, args.tokens, args.hidden, generator=torch.Generator().manual_seed(7))
        differences = compare(block, x.to(dtype).to(args.device), backend=args.compile)
    tolerance = TOLERANCES[dtype]
    for name, value in differences.items():
        print(f"{name:>10}: {value:.2e}")
    worst = max(differences.values())
    print(f"{'ok' if worst <= tolerance else 'FAILED'}: largest relative difference {worst:.2e} "
          f"(tolerance {tolerance:.0e}, {args.layout}, {dtype_name}, {args.device}{f', compiled ({args.compile})' if args.compile else ''})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
