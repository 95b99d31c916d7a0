"""Exchange with autograd against the dense reference's gradients (torch.autograd), the C++ fast
path on and off: live steps interleaved, zero_fill on and off, HT drop, int32 / int64 routing,
some inputs requiring grad."""

import gc

import pytest
import torch

from dense_reference import (
    seeded, draw_case, LAYOUTS, draw_shape, draw_inputs, make_group, close, dense_moe, group_moe, kept_routing)
from expert_parallel.torch import Exchange


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_exchange_autograd_against_dense(algorithm, layout, fast, monkeypatch):
    monkeypatch.setenv("EP_TORCH_FAST", fast)
    rng, g = seeded(301 + LAYOUTS.index((algorithm, layout)) + 17 * int(fast))
    for trial in range(4):
        dtype = ["f32", "bf16", "f16", "f32"][trial]
        shape = draw_shape(rng, layout, dtype)
        R, B = shape["ranks"], shape["max_tokens"]
        b = rng.randint(0, B)
        xs, idxs, ws = draw_inputs(g, shape, dtype, [b] * R, minus_one_rate=0.25)
        group = make_group(shape, algorithm, layout, dtype)
        ex = Exchange(group)
        scale = (torch.rand(R, shape["experts"] // R, generator=g) + 0.5)
        probe = torch.randn(R, b, shape["hidden"], generator=g)

        def run(fn, x, w, sc):
            x = x.clone().requires_grad_(True)
            w = w.clone().requires_grad_(True)
            sc = sc.clone().requires_grad_(True)
            y = fn(x, w, sc)
            (y.float() * probe).sum().backward()
            return y.detach().float(), x.grad.float(), w.grad.float(), sc.grad.float()

        x, idx, w = torch.stack(xs), torch.stack(idxs), torch.stack(ws)
        got = run(lambda x, w, sc: group_moe(ex, x, idx, w, sc, layout), x, w, scale)
        want = run(lambda x, w, sc: dense_moe(x.float(), idx, w, sc), x.float(), w, scale)
        for name, a, c in zip(("y", "grad x", "grad w", "grad scale"), got, want):
            close(a, c, dtype, f"{layout} {dtype} {name} {shape} b={b}")
        got2 = run(lambda x, w, sc: group_moe(ex, x, idx, w, sc, layout), x, w, scale)
        for a, c in zip(got, got2):
            assert torch.equal(a, c)
        ex.close()
        group.close()
        gc.collect()


def test_exchange_interleaved_steps_zero_fill_drop_and_partial_grads():
    for seed in range(50):
        rng, g, alg, lay, dtype = draw_case(5000, seed)
        shape = draw_shape(rng, lay, dtype, max_local=4, max_tokens=5)
        R, B = shape["ranks"], shape["max_tokens"]
        extra = {}
        if alg == "ht" and rng.random() < 0.4:
            extra = dict(max_recv_tokens=rng.randint(1, R * B), overflow="drop")
        zf = rng.random() < 0.6 or lay in ("rank_major", "flat")
        itype = rng.choice([torch.int32, torch.int64])
        need = [rng.random() < 0.7 for _ in range(3)]
        if not any(need):
            need[0] = True
        group = make_group(shape, alg, lay, dtype, **extra)
        ex = Exchange(group, zero_fill=zf)
        scale = torch.rand(R, shape["experts"] // R, generator=g) + 0.5
        steps = []
        for _ in range(rng.randint(1, 3)):
            b = rng.randint(0, B)
            xs, idxs, ws = draw_inputs(g, shape, dtype, [b] * R, minus_one_rate=0.25)
            x, idx, w = torch.stack(xs), torch.stack(idxs).to(itype), torch.stack(ws)
            midx = kept_routing(shape, lay, list(idx.long()), extra["max_recv_tokens"]) if extra else list(idx.long())
            leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, scale), need)]
            y = group_moe(ex, *leaves[:1], idx, *leaves[1:], lay, zero_fill=zf)
            steps.append((leaves, y, torch.randn(R, b, shape["hidden"], generator=g), x, torch.stack(midx), w))
        for leaves, y, probe, x, midx, w in reversed(steps):
            wanted = [t for t, r in zip(leaves, need) if r]
            got = torch.autograd.grad((y.float() * probe).sum(), wanted, allow_unused=True)
            ref_leaves = [t.clone().requires_grad_(r) for t, r in zip((x.float(), w, scale), need)]
            yd = dense_moe(ref_leaves[0], midx, ref_leaves[1], ref_leaves[2])
            want = torch.autograd.grad((yd * probe).sum(), [t for t, r in zip(ref_leaves, need) if r], allow_unused=True)
            close(y.detach(), yd.detach(), dtype, f"exchange seed {seed} y")
            for a, c in zip(got, want):
                a = torch.zeros(()) if a is None else a
                c = torch.zeros(()) if c is None else c
                if a.shape != c.shape:
                    a, c = a.expand_as(c) if a.dim() == 0 else a, c.expand_as(a) if c.dim() == 0 else c
                close(a, c, dtype, f"exchange seed {seed} {lay} grad")
        ex.close()
        group.close()
