"""Refusals and limits against the dense reference: named errors (never a crash) for wrong and
mutated arguments, masked ranks, HT capacity (drop and fail), FP8 rows that dequantise to the
source."""

import random

import pytest
import torch

from dense_reference import (
    draw_case, LAYOUTS, TDTYPE, draw_shape, draw_inputs, make_group, to_torch, entry, per_rank,
    expected_dispatch, check_dispatch, expert_outputs, expected_combine, close, kept_routing,
    dequantize, mutate)
from expert_parallel.torch import Exchange
import expert_parallel as ep


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_refusals_are_named_errors(algorithm, layout, fast, monkeypatch):
    monkeypatch.setenv("EP_TORCH_FAST", fast)
    rng = random.Random(401 + LAYOUTS.index((algorithm, layout)))
    g = torch.Generator().manual_seed(5)
    for trial in range(3):
        shape = draw_shape(rng, layout, "f32", max_ranks=4)
        shape["top_k"] = max(2, shape["top_k"])
        if shape["experts"] < 2:
            shape["experts"] = 2 * shape["ranks"]
        R, B = shape["ranks"], shape["max_tokens"]
        group = make_group(shape, algorithm, layout, "f32")
        xs, idxs, ws = draw_inputs(g, shape, "f32", [B] * R, minus_one_rate=0.0)
        x, idx, w = torch.stack(xs), torch.stack(idxs), torch.stack(ws)
        for stacked in (True, False):
            def call(x_, idx_, w_):
                if stacked:
                    return group.dispatch(x_, idx_, w_)
                return group.dispatch(list(x_), list(idx_), list(w_))
            bad = idx.clone()
            bad[R - 1, B - 1, 1] = bad[R - 1, B - 1, 0]   # a repeated expert
            with pytest.raises(ep.InvalidArgumentError, match="topk_idx"):
                call(x, bad, w)
            bad = idx.clone()
            bad[0, 0, 0] = shape["experts"]
            with pytest.raises(ep.InvalidArgumentError, match="topk_idx"):
                call(x, bad, w)
            bad = idx.clone()
            bad[0, 0, 0] = -2
            with pytest.raises(ep.InvalidArgumentError, match="topk_idx"):
                call(x, bad, w)
            with pytest.raises(ep.InvalidArgumentError, match="xs"):
                call(x[..., :-1] if shape["hidden"] > 2 else x.double(), idx, w)
            with pytest.raises(ep.InvalidArgumentError, match="topk_idx"):
                call(x, idx[..., :-1], w)
            with pytest.raises(ep.InvalidArgumentError, match="topk_weights"):
                call(x, idx, w.double())
            big = torch.zeros(R, B + 1, shape["hidden"])
            with pytest.raises(ep.InvalidArgumentError):
                call(big, torch.full((R, B + 1, shape["top_k"]), -1), torch.zeros(R, B + 1, shape["top_k"]))
        # a good step still works after the refusals
        out = group.dispatch(x, idx, w)
        check_dispatch(shape, layout, group, out, xs, idxs, ws, "f32")
        group.close()


def test_masked_ranks_against_the_reference():
    for seed in range(40):
        rng = random.Random(1000 + seed)
        alg, lay = rng.choice(LAYOUTS)
        dtype = rng.choice(["f32", "bf16"])
        g = torch.Generator().manual_seed(seed)
        shape = draw_shape(rng, lay, dtype, max_local=4, max_tokens=5)
        if shape["ranks"] < 2:
            shape["ranks"], shape["experts"] = 2, shape["experts"] * 2
        R, B = shape["ranks"], shape["max_tokens"]
        L = shape["experts"] // R
        stacked = rng.random() < 0.5
        counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, alg, lay, dtype, buffer_slots=rng.randint(1, 3))
        dead = sorted(rng.sample(range(R), rng.randint(1, R - 1)))
        for d in dead:
            group.deactivate(d)
        assert group.active_ranks == [r for r in range(R) if r not in dead]
        midx = [torch.where((i >= 0) & torch.isin(i // L, torch.tensor(dead)), torch.full_like(i, -1), i) for i in idxs]
        midx = [torch.full_like(i, -1) if s in dead else i for s, i in enumerate(midx)]
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        check_dispatch(shape, lay, group, out, xs, midx, ws, dtype)
        y_in = expert_outputs(shape, lay, out, dtype)
        y = per_rank(group.combine(y_in if stacked else list(y_in), out.handle), R, dtype)
        want = expected_combine(shape, xs, midx, ws, dtype)
        for r in range(R):
            if r not in dead:
                close(y[r], want[r], dtype, f"seed {seed} rank {r}")
        if R > 1:
            with pytest.raises(ep.InactiveRankError):
                Exchange(group).dispatch(torch.zeros(R, 1, shape["hidden"], dtype=TDTYPE[dtype]),
                                         torch.full((R, 1, shape["top_k"]), -1), torch.zeros(R, 1, shape["top_k"]))
        group.clean()
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        check_dispatch(shape, lay, group, out, xs, idxs, ws, dtype)
        group.close()


def test_ht_drop_and_fail_against_the_reference():
    for seed in range(50):
        rng = random.Random(2000 + seed)
        lay = rng.choice(["flat", "expert_major_padded"])
        dtype = rng.choice(["f32", "bf16"])
        g = torch.Generator().manual_seed(seed)
        shape = draw_shape(rng, lay, dtype, max_local=4, max_tokens=6)
        R, B = shape["ranks"], shape["max_tokens"]
        stacked = rng.random() < 0.5
        counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        cap = rng.randint(1, R * B)
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, "ht", lay, dtype, max_recv_tokens=cap, overflow="drop")
        midx = kept_routing(shape, lay, idxs, cap)
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        check_dispatch(shape, lay, group, out, xs, midx, ws, dtype)
        offered = [sum(1 for s in range(R) for t in range(counts[s]) if any(int(e) >= 0 and int(e) // (shape["experts"] // R) == d
                                                                              for e in idxs[s][t])) for d in range(R)]
        for d in range(R):
            assert out.layout[d].dropped_tokens == offered[d] - sum(out.layout[d].source_rank_counters)
        y_in = expert_outputs(shape, lay, out, dtype)
        y = per_rank(group.combine(y_in if stacked else list(y_in), out.handle), R, dtype)
        want = expected_combine(shape, xs, midx, ws, dtype)
        for r in range(R):
            close(y[r], want[r], dtype, f"drop seed {seed} rank {r}")
        failing = make_group(shape, "ht", lay, dtype, max_recv_tokens=cap, overflow="fail")
        overflow = any(not torch.equal(a, b) for a, b in zip(midx, idxs))
        if overflow:
            with pytest.raises(ep.ReceiveOverflowError):
                failing.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        else:
            failing.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        group.close()
        failing.close()


def test_fp8_dispatch_rows_dequantise_to_the_source():
    for seed in range(30):
        rng, g, alg, lay, dtype = draw_case(6000, seed)
        mode = rng.choice(["float32", "ue8m0", "e8m0"])
        shape = draw_shape(rng, lay, dtype, max_ranks=4, max_local=3, max_tokens=4)
        shape["hidden"] = (32 if mode == "e8m0" else 128) * rng.randint(1, 3)
        R, B = shape["ranks"], shape["max_tokens"]
        stacked = rng.random() < 0.5
        counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, alg, lay, dtype, fp8=mode)
        with pytest.raises(ep.InvalidArgumentError):
            Exchange(group)
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        rows, counts_want = expected_dispatch(shape, lay, xs, idxs, ws)
        assert to_torch(out.expert_counts, dtype).tolist() == counts_want
        tokens, scales = per_rank(out.tokens, R, dtype), per_rank(out.scales, R, dtype)
        for d in range(R):
            for pos, s, t, _, _ in rows[d]:
                err = (dequantize(tokens[d][pos], scales[d][pos], mode, shape["hidden"]) - xs[s][t].float()).abs().max().item()
                assert err <= 0.07 * xs[s][t].float().abs().max().item() + 1e-6, (seed, d, pos, err)
        group.close()


@pytest.mark.parametrize("fast", ["1", "0"])
def test_mutated_dispatch_arguments_are_named(fast, monkeypatch):
    monkeypatch.setenv("EP_TORCH_FAST", fast)
    names = ["xs", "topk_idx", "topk_weights"]
    for seed in range(150):
        rng, g, alg, lay, dtype = draw_case(7000, seed)
        shape = draw_shape(rng, lay, dtype, max_local=3, max_ranks=4, max_tokens=4)
        shape["max_tokens"] = max(2, shape["max_tokens"])
        R, B = shape["ranks"], shape["max_tokens"]
        stacked = rng.random() < 0.5
        counts = [B] * R if stacked else [rng.randint(2, B) for _ in range(R)]
        group = make_group(shape, alg, lay, dtype)
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts, minus_one_rate=0.0)
        args = [entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False)]
        if rng.random() < 0.5:
            group.dispatch(*args)   # (warm: slots and the in-line paths' caches made)
        which = rng.randrange(3)
        what, args[which] = mutate(rng, args[which])
        with pytest.raises(ep.ExpertParallelError) as caught:
            group.dispatch(*args)
        assert isinstance(caught.value, (ep.InvalidArgumentError, ep.InvalidUsageError)), (seed, what)
        if what not in ("drop_rank", "extra_rank", "shape_rank"):
            assert names[which] in str(caught.value), (seed, what, str(caught.value))
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False))
        check_dispatch(shape, lay, group, out, xs, idxs, ws, dtype)   # a refused call changed nothing
        group.close()
