"""VirtualGroup (CPU backend) dispatch and combine against the dense reference: forward and
backward, every layout and dtype, both entry forms, out= arrays, handles of their own and live
steps interleaved, send-only calls, random call sequences, top_k 32."""

import pytest
import torch

from dense_reference import (
    seeded, draw_case, LAYOUTS, TDTYPE, draw_shape, draw_inputs, make_group, to_numpy, entry, per_rank,
    expected_dispatch, check_dispatch, expert_outputs, expected_combine, close, CASES)
import expert_parallel as ep


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("algorithm,layout,dtype", CASES)
def test_forward_dispatch_combine_random(algorithm, layout, dtype, fast, monkeypatch):
    monkeypatch.setenv("EP_TORCH_FAST", fast)
    rng, g = seeded(CASES.index((algorithm, layout, dtype)) * 7 + int(fast))
    for trial in range(6):
        shape = draw_shape(rng, layout, dtype)
        stacked = trial % 2 == 0
        numpy = trial % 3 == 1
        index_type = torch.int32 if trial % 4 == 3 else torch.int64
        R, B = shape["ranks"], shape["max_tokens"]
        counts = [B if stacked else rng.randint(0, B) for _ in range(R)]
        if stacked and trial % 4 == 2:
            counts = [rng.randint(0, B)] * R
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts, minus_one_rate=rng.choice([0.0, 0.2, 0.6]))
        group = make_group(shape, algorithm, layout, dtype, buffer_slots=rng.randint(1, 3))
        w_arg = entry(ws, stacked, numpy)
        out = group.dispatch(entry(xs, stacked, numpy), entry(idxs, stacked, numpy, index_type), w_arg)
        check_dispatch(shape, layout, group, out, xs, idxs, ws, dtype)
        scale = torch.rand(R, shape["experts"] // R, generator=g) + 0.5
        y_in = expert_outputs(shape, layout, out, dtype, scale)
        y_arg = y_in if not numpy else to_numpy(y_in)
        if not stacked:
            y_arg = list(y_arg)
        y = per_rank(group.combine(y_arg, out.handle), R, dtype)
        want = expected_combine(shape, xs, idxs, ws, dtype, scale)
        for r in range(R):
            close(y[r], want[r], dtype, f"{layout} {dtype} trial {trial} rank {r} {shape}")
        # bit-reproducible: the same step again gives the same bits
        out2 = group.dispatch(entry(xs, stacked, numpy), entry(idxs, stacked, numpy, index_type), w_arg)
        check_dispatch(shape, layout, group, out2, xs, idxs, ws, dtype)
        if stacked and not numpy:
            built = ep._fast.torch_fast_module() is not None   # (scripts/build-torch-fast; EP_TORCH_FAST=0: None)
            assert (group._fast_spec is not None) == built   # the C++ path took the second call where built
        y2 = per_rank(group.combine(y_arg, out2.handle), R, dtype)
        for r in range(R):
            assert torch.equal(y[r].view(torch.uint8) if y[r].numel() else y[r], y2[r].view(torch.uint8) if y2[r].numel() else y2[r])
        group.close()


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_out_arrays_and_interleaved_handles(algorithm, layout, fast, monkeypatch):
    monkeypatch.setenv("EP_TORCH_FAST", fast)
    rng, g = seeded(11 + LAYOUTS.index((algorithm, layout)))
    for trial in range(4):
        dtype = rng.choice(["f32", "bf16", "f16"])
        shape = draw_shape(rng, layout, dtype)
        R, B = shape["ranks"], shape["max_tokens"]
        slots = rng.randint(1, 3)
        group = make_group(shape, algorithm, layout, dtype, buffer_slots=slots)
        stacked = trial % 2 == 0
        steps = []
        for j in range(3):
            counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
            xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
            h = group.handle()
            use_out = j == 1
            kw = {}
            if use_out:
                recv = group.recv_shape
                td = TDTYPE[dtype]
                L = shape["experts"] // R
                if stacked:
                    routing_shape = (R,) + tuple(group.recv_routing_shape) if group.recv_routing_shape is not None else None
                    outs = (torch.zeros((R,) + tuple(recv), dtype=td),
                            None if routing_shape is None else torch.zeros(routing_shape, dtype=torch.int32),
                            None if routing_shape is None else torch.zeros(routing_shape, dtype=torch.float32),
                            torch.full((R, L), -5, dtype=torch.int32))
                else:
                    routing_shape = tuple(group.recv_routing_shape) if group.recv_routing_shape is not None else None
                    outs = ([torch.zeros(tuple(recv), dtype=td) for _ in range(R)],
                            None if routing_shape is None else [torch.zeros(routing_shape, dtype=torch.int32) for _ in range(R)],
                            None if routing_shape is None else [torch.zeros(routing_shape, dtype=torch.float32) for _ in range(R)],
                            [torch.full((L,), -5, dtype=torch.int32) for _ in range(R)])
                kw["out"] = outs
            out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False), handle=h, **kw)
            check_dispatch(shape, layout, group, out, xs, idxs, ws, dtype,
                           counts_given=(torch.stack(kw["out"][3]) if not stacked else kw["out"][3]) if use_out else None)
            y_in = expert_outputs(shape, layout, out, dtype).clone()   # (a copy: a later dispatch may reuse the slot)
            steps.append((h, out, y_in, xs, idxs, ws))
        # combine in another order than dispatched; with one slot, the earlier steps' slot rows were overwritten
        for h, out, y_in, xs, idxs, ws in reversed(steps):
            y_arg = y_in if stacked else list(y_in)
            later = sum(1 for (hh, o, *_) in steps[steps.index(next(st for st in steps if st[0] is h)) + 1:] if hh.slot >= 0)
            if layout == "expert_major_padded" and h.slot >= 0 and later >= slots:
                # its per-slot weights were overwritten: refused by name
                with pytest.raises(ep.InvalidUsageError, match="handle"):
                    group.combine(y_arg, h)
                h.release()
                continue
            ycomb = group.combine(y_arg, h)
            y = per_rank(ycomb, R, dtype)
            want = expected_combine(shape, xs, idxs, ws, dtype)
            for r in range(R):
                close(y[r], want[r], dtype, f"{layout} trial {trial} rank {r}")
            h.release()
        group.close()


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_backward_dispatch_and_combine(algorithm, layout):
    rng, g = seeded(101 + LAYOUTS.index((algorithm, layout)))
    for trial in range(5):
        dtype = ["f32", "bf16", "f16", "f32", "bf16"][trial]
        shape = draw_shape(rng, layout, dtype)
        R, B = shape["ranks"], shape["max_tokens"]
        stacked = trial % 2 == 0
        counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, algorithm, layout, dtype)
        h = group.handle()
        group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False), handle=h)
        # backward dispatch: the token gradients go where the tokens went
        grads = [torch.randn(b, shape["hidden"], generator=g).to(TDTYPE[dtype]) for b in counts]
        back = group.dispatch(entry(grads, stacked, False), None, entry(ws, stacked, False), handle=h, direction="backward")
        check_dispatch(shape, layout, group, back, grads, idxs, ws, dtype)
        # backward combine: the rows summed per token, unweighted; HT returns the weight gradients
        rows = torch.stack(per_rank(back.tokens, R, dtype)).clone()
        kw = {}
        if algorithm == "ht":
            wg = torch.randn((R,) + tuple(group.recv_routing_shape), generator=g)
            kw["weight_gradients"] = wg if stacked else list(wg)
        res = group.combine(rows if stacked else list(rows), h, direction="backward", **kw)
        if algorithm == "ht":
            res, wgrads = res
            wgrads = per_rank(wgrads, R, dtype)
        y = per_rank(res, R, dtype)
        for s in range(R):
            valid = (idxs[s] >= 0)
            if layout == "expert_major_padded":
                L = shape["experts"] // R
                rows_seen = valid.sum(-1, keepdim=True).float()
            else:
                # one row per (token, destination rank)
                L = shape["experts"] // R
                dest = torch.where(valid, idxs[s] // L, torch.full_like(idxs[s], -1))
                rows_seen = torch.tensor([[len({int(d) for d in row if d >= 0})] for row in dest], dtype=torch.float32).reshape(-1, 1)
                if layout == "expert_major":
                    rows_seen = valid.sum(-1, keepdim=True).float()
            close(y[s], grads[s].float() * rows_seen, dtype, f"backward combine {layout} rank {s}")
        if algorithm == "ht":
            expected = expected_dispatch(shape, layout, grads, idxs, ws)[0]
            for s in range(R):
                want = torch.zeros(counts[s], shape["top_k"])
                for d in range(R):
                    for pos, ss, t, ids, _ in expected[d]:
                        if ss != s:
                            continue
                        if layout == "flat":
                            for k, l in enumerate(ids):
                                if l >= 0:
                                    want[t, k] = wg[d][pos][k]
                        else:
                            L = shape["experts"] // R
                            for k in range(shape["top_k"]):
                                if int(idxs[s][t, k]) == d * L + ids:
                                    want[t, k] = wg[d][pos]
                assert torch.equal(wgrads[s], want), (layout, s, wgrads[s], want)
        h.release()
        group.close()


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_send_only_and_hook(algorithm, layout):
    rng, g = seeded(201 + LAYOUTS.index((algorithm, layout)))
    for trial in range(3):
        dtype = rng.choice(["f32", "bf16"])
        shape = draw_shape(rng, layout, dtype)
        R, B = shape["ranks"], shape["max_tokens"]
        stacked = trial != 1
        counts = [B] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, algorithm, layout, dtype)
        out = group.dispatch(entry(xs, stacked, False), entry(idxs, stacked, False), entry(ws, stacked, False), send_only=True)
        out.hook()
        check_dispatch(shape, layout, group, out, xs, idxs, ws, dtype)
        y_in = expert_outputs(shape, layout, out, dtype)
        res, hook = group.combine(y_in if stacked else list(y_in), out.handle, send_only=True)
        hook()
        want = expected_combine(shape, xs, idxs, ws, dtype)
        y = per_rank(res, R, dtype)
        for r in range(R):
            close(y[r], want[r], dtype, f"send_only {layout} rank {r}")
        group.close()


def test_combine_out_and_weights_given_to_combine():
    for seed in range(60):
        rng, g, alg, lay, dtype = draw_case(3000, seed)
        shape = draw_shape(rng, lay, dtype, max_local=4, max_tokens=6)
        R, B = shape["ranks"], shape["max_tokens"]
        stacked, numpy = rng.random() < 0.5, rng.random() < 0.4
        launch = rng.choice(["single", "per_rank"])
        counts = [rng.randint(0, B)] * R if stacked else [rng.randint(0, B) for _ in range(R)]
        xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
        group = make_group(shape, alg, lay, dtype, buffer_slots=rng.randint(1, 3))
        kw = {"handle": group.handle()} if rng.random() < 0.5 else {}
        out = group.dispatch(entry(xs, stacked, numpy), entry(idxs, stacked, numpy), entry(ws, stacked, numpy), launch=launch, **kw)
        check_dispatch(shape, lay, group, out, xs, idxs, ws, dtype)
        y_in = expert_outputs(shape, lay, out, dtype)
        ws2, ckw = ws, {}
        if lay == "expert_major" and rng.random() < 0.5:
            ws2 = [torch.rand(b, shape["top_k"], generator=g) for b in counts]
            ckw["topk_weights"] = entry(ws2, stacked, numpy)
        td = TDTYPE[dtype]
        if stacked:
            o = torch.full((R, counts[0], shape["hidden"]), 3, dtype=td)
            oarg = to_numpy(o) if numpy else o
        else:
            o = [torch.full((b, shape["hidden"]), 3, dtype=td) for b in counts]
            oarg = [to_numpy(t) for t in o] if numpy else o
        y_arg = to_numpy(y_in) if numpy else y_in
        if not stacked:
            y_arg = list(y_arg)
        res = group.combine(y_arg, out.handle, out=oarg, launch=launch, **ckw)
        want = expected_combine(shape, xs, idxs, ws2, dtype)
        for got in (per_rank(oarg, R, dtype), per_rank(res, R, dtype)):
            for r in range(R):
                close(got[r], want[r], dtype, f"combine out seed {seed} rank {r}")
        group.close()


def test_random_call_sequences():
    for seed in range(40):
        rng, g, alg, lay, dtype = draw_case(4000, seed)
        shape = draw_shape(rng, lay, dtype, max_local=3, max_ranks=4, max_tokens=4)
        R, B = shape["ranks"], shape["max_tokens"]
        slots = rng.randint(1, 3)
        group = make_group(shape, alg, lay, dtype, buffer_slots=slots)
        live, own_gen, dispatch_no = [], 0, 0
        for op in range(12):
            act = rng.choice(["d", "d", "c", "c", "bd"]) if live else "d"
            if act == "d":
                stacked, numpy = rng.random() < 0.5, rng.random() < 0.3
                itype = rng.choice([torch.int32, torch.int64])
                counts = [rng.randint(0, B)] * R if stacked else [rng.randint(0, B) for _ in range(R)]
                xs, idxs, ws = draw_inputs(g, shape, dtype, counts)
                own = rng.random() < 0.3
                send_only = rng.random() < 0.2
                kw = {} if own else {"handle": group.handle()}
                out = group.dispatch(entry(xs, stacked, numpy), entry(idxs, stacked, numpy, itype), entry(ws, stacked, numpy),
                                     send_only=send_only, **kw)
                if send_only:
                    out.hook()
                dispatch_no += 1
                check_dispatch(shape, lay, group, out, xs, idxs, ws, dtype)
                own_gen += own
                live.append(dict(h=out.handle, own=own, gen=own_gen, no=dispatch_no, y=expert_outputs(shape, lay, out, dtype).clone(),
                                 xs=xs, idxs=idxs, ws=ws, stacked=stacked, numpy=numpy))
            elif act == "c":
                st = live.pop(rng.randrange(len(live)))
                stale_own = st["own"] and st["gen"] != own_gen
                stale_slot = lay == "expert_major_padded" and dispatch_no - st["no"] >= slots
                y_arg = to_numpy(st["y"]) if rng.random() < 0.3 else st["y"]
                if not st["stacked"]:
                    y_arg = list(y_arg)
                if stale_own or stale_slot:
                    with pytest.raises(ep.InvalidUsageError, match="handle"):
                        group.combine(y_arg, st["h"])
                    continue
                y = per_rank(group.combine(y_arg, st["h"]), R, dtype)
                want = expected_combine(shape, st["xs"], st["idxs"], st["ws"], dtype)
                for r in range(R):
                    close(y[r], want[r], dtype, f"sequence seed {seed} op {op} rank {r}")
                if not st["own"]:
                    st["h"].release()
            else:
                st = rng.choice(live)
                if st["own"] and st["gen"] != own_gen:
                    continue
                grads = [torch.randn(x.shape[0], shape["hidden"], generator=g).to(TDTYPE[dtype]) for x in st["xs"]]
                back = group.dispatch(entry(grads, st["stacked"], False), None, entry(st["ws"], st["stacked"], False),
                                      handle=st["h"], direction="backward")
                dispatch_no += 1
                check_dispatch(shape, lay, group, back, grads, st["idxs"], st["ws"], dtype)
                st["no"] = dispatch_no
        group.close()


def test_top_k_32_every_layout():
    g = torch.Generator().manual_seed(7)
    for i, (alg, lay) in enumerate(LAYOUTS):
        shape = dict(ranks=4, experts=64, hidden=6, top_k=32, max_tokens=3, alignment=3 if lay == "expert_major_padded" else 1)
        xs, idxs, ws = draw_inputs(g, shape, "f32", [3, 0, 2, 1], minus_one_rate=0.1)
        group = make_group(shape, alg, lay, "f32")
        out = group.dispatch(xs, idxs, ws)
        check_dispatch(shape, lay, group, out, xs, idxs, ws, "f32")
        y = group.combine(list(expert_outputs(shape, lay, out, "f32")), out.handle)
        for r, want in enumerate(expected_combine(shape, xs, idxs, ws, "f32")):
            close(y[r], want, "f32", f"top_k 32 {lay} rank {r}")
        group.close()
