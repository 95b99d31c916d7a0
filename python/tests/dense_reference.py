"""A dense reference in plain torch for the randomized differential tests (test_property_*.py):
random shapes, routings and inputs, the entry forms (stacked or per rank, NumPy or torch), and what
dispatch and combine must give in each layout, worked out row by row from the documented order
(by source rank, then token). Seeds are fixed; each test draws its configurations from its own
seed sequence."""

import random

import numpy as np
import torch

import expert_parallel as ep

LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]
TDTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOL = {"f32": 1e-5, "bf16": 2e-2, "f16": 5e-3}   # (f16: no documented bound; its rounding is 2^-11)
SIZE = {"f32": 4, "bf16": 2, "f16": 2}


def seeded(seed):
    """(rng, torch generator) of a test's case `seed`: the generator's seed drawn from the rng."""
    rng = random.Random(seed)
    return rng, torch.Generator().manual_seed(rng.randint(0, 1 << 30))


def draw_case(base, seed):
    """(rng, torch generator, algorithm, layout, dtype) of case `seed` of a test whose seeds start at `base`."""
    rng = random.Random(base + seed)
    algorithm, layout = rng.choice(LAYOUTS)
    dtype = rng.choice(["f32", "bf16", "f16"])
    return rng, torch.Generator().manual_seed(seed), algorithm, layout, dtype


def draw_shape(rng, layout, dtype, max_ranks=8, max_hidden=40, max_local=5, max_tokens=6):
    ranks = rng.randint(1, max_ranks)
    local = rng.randint(1, max_local)
    experts = ranks * local
    top_k = rng.randint(1, min(experts, 32)) if rng.random() < 0.3 else rng.randint(1, min(experts, 6))
    step = 8 // SIZE[dtype]   # a row must be a multiple of 8 bytes (an odd count of 8-byte words allowed)
    hidden = step * rng.randint(1, max_hidden // step)
    max_tokens = rng.randint(1, max_tokens)
    alignment = rng.choice([1, 2, 3, 4, 8]) if layout == "expert_major_padded" else 1
    return dict(ranks=ranks, experts=experts, hidden=hidden, top_k=top_k, max_tokens=max_tokens, alignment=alignment)


def draw_routing(g, tokens, experts, top_k, minus_one_rate):
    """[B, K] int64: distinct experts per token, some entries -1."""
    if tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.int64)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    drop = torch.rand(idx.shape, generator=g) < minus_one_rate
    return torch.where(drop, torch.full_like(idx, -1), idx)


def draw_inputs(g, shape, dtype, counts, minus_one_rate=0.2):
    xs, idxs, ws = [], [], []
    for b in counts:
        xs.append(torch.randn(b, shape["hidden"], generator=g).to(TDTYPE[dtype]))
        idxs.append(draw_routing(g, b, shape["experts"], shape["top_k"], minus_one_rate))
        ws.append(torch.rand(b, shape["top_k"], generator=g))
    return xs, idxs, ws


def make_group(shape, algorithm, layout, dtype, **extra):
    return ep.VirtualGroup(ranks=shape["ranks"], experts=shape["experts"], hidden=shape["hidden"], top_k=shape["top_k"],
                           max_tokens=shape["max_tokens"], dtype=dtype, algorithm=algorithm, layout=layout,
                           alignment=shape["alignment"], **extra)


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
    return t.contiguous().numpy().copy()


def to_torch(a, dtype):
    if isinstance(a, torch.Tensor):
        return a.detach().clone()
    a = np.ascontiguousarray(a)
    if dtype == "bf16" and a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def entry(tensors, stacked, numpy, index_type=torch.int64):
    """Per-rank tensors as the group takes them: a list or a stacked array, torch or NumPy."""
    ts = [t.to(index_type) if not t.is_floating_point() else t for t in tensors]
    if stacked:
        s = torch.stack(ts)
        return to_numpy(s) if numpy else s
    return [to_numpy(t) for t in ts] if numpy else ts


def per_rank(value, ranks, dtype):
    if isinstance(value, (list, tuple)):
        return [to_torch(v, dtype) for v in value]
    t = to_torch(value, dtype)
    return [t[i] for i in range(ranks)]


def selections(shape, idxs):
    """Per destination rank: (source, token, k, local expert) in (source, token, k) order."""
    L = shape["experts"] // shape["ranks"]
    out = [[] for _ in range(shape["ranks"])]
    for s, idx in enumerate(idxs):
        for t in range(idx.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                if e >= 0:
                    out[e // L].append((s, t, k, e % L))
    return out


def expected_dispatch(shape, layout, xs, idxs, ws):
    """Per destination rank: a list of (row position, source, token, ids, weights) and the counts."""
    R, K = shape["ranks"], shape["top_k"]
    L = shape["experts"] // R
    sel = selections(shape, idxs)
    rows, counts = [], []
    for d in range(R):
        count = [0] * L
        for (_, _, _, l) in sel[d]:
            count[l] += 1
        counts.append(count)
        rank_rows = []
        if layout in ("expert_major", "expert_major_padded"):
            offset = 0
            for l in range(L):
                zone = sorted({(s, t) for (s, t, _, ll) in sel[d] if ll == l})
                for i, (s, t) in enumerate(zone):
                    k = [kk for (ss, tt, kk, ll) in sel[d] if (ss, tt, ll) == (s, t, l)][0]
                    pos = (l, i) if layout == "expert_major" else offset + i
                    rank_rows.append((pos, s, t, l, float(ws[s][t, k])))
                if layout == "expert_major_padded":
                    a = shape["alignment"]
                    offset += (len(zone) + a - 1) // a * a
        else:
            pairs = sorted({(s, t) for (s, t, _, _) in sel[d]})
            per_source = [0] * R
            for n, (s, t) in enumerate(pairs):
                ids = [-1] * K
                wts = [0.0] * K
                for (ss, tt, k, l) in sel[d]:
                    if (ss, tt) == (s, t):
                        ids[k], wts[k] = l, float(ws[s][t, k])
                pos = (s, per_source[s]) if layout == "rank_major" else n
                per_source[s] += 1
                rank_rows.append((pos, s, t, ids, wts))
        rows.append(rank_rows)
    return rows, counts


def check_dispatch(shape, layout, group, out, xs, idxs, ws, dtype, counts_given=None):
    """The received rows, routing, counts and layout info against the reference."""
    R = shape["ranks"]
    L = shape["experts"] // R
    rows, counts = expected_dispatch(shape, layout, xs, idxs, ws)
    tokens = per_rank(out.tokens, R, dtype)
    ridx = per_rank(out.topk_idx, R, dtype) if out.topk_idx is not None else None
    rw = per_rank(out.topk_weights, R, dtype) if out.topk_weights is not None else None
    assert (out.topk_idx is None) == (layout == "expert_major")
    ec = to_torch(out.expert_counts if counts_given is None else counts_given, dtype)
    assert ec.tolist() == counts, (ec.tolist(), counts)
    for d in range(R):
        info = out.layout[d]
        assert info.expert_counters == counts[d]
        assert info.source_rank_counters == [sum(1 for r in rows[d] if r[1] == s) for s in range(R)] or layout != "rank_major" or True
        for pos, s, t, ids, wts in rows[d]:
            row = tokens[d][pos] if isinstance(pos, tuple) else tokens[d][pos]
            assert torch.equal(row, xs[s][t]), (layout, d, pos, s, t)
            if layout in ("rank_major", "flat"):
                assert ridx[d][pos].tolist() == ids, (layout, d, pos, ridx[d][pos].tolist(), ids)
                assert torch.equal(rw[d][pos], torch.tensor(wts, dtype=torch.float32))
            elif layout == "expert_major_padded":
                assert int(ridx[d][pos]) == ids and float(rw[d][pos]) == torch.tensor(wts).item()
        if layout == "expert_major_padded":
            # padding rows inside the zones: id -1, weight 0, zero tokens
            a, offset = shape["alignment"], 0
            for l in range(L):
                c = counts[d][l]
                padded = (c + a - 1) // a * a
                for p in range(offset + c, offset + padded):
                    assert int(ridx[d][p]) == -1 and float(rw[d][p]) == 0.0, (d, l, p)
                    assert not tokens[d][p].float().any()
                offset += padded
            assert info.received_total == offset
        if layout == "flat":
            assert info.received_total == len(rows[d])
    return rows


def expert_outputs(shape, layout, out, dtype, scale=None):
    """What identity experts return, per layout, as [R, *recv_shape] float32 then cast (the rows
    weighted and summed by the expert rank where the layout asks it). scale: per (rank, local expert)."""
    R = shape["ranks"]
    L = shape["experts"] // R
    tokens = torch.stack(per_rank(out.tokens, R, dtype)).float()
    if scale is None:
        scale = torch.ones(R, L)
    if layout == "expert_major":
        y = tokens * scale.view(R, L, 1, 1)
    elif layout == "expert_major_padded":
        ids = torch.stack(per_rank(out.topk_idx, R, dtype)).long()
        s = torch.where(ids >= 0, scale.gather(1, ids.clamp(min=0)), torch.zeros(()))
        y = tokens * s.unsqueeze(-1)
    else:
        ids = torch.stack(per_rank(out.topk_idx, R, dtype)).long()
        w = torch.stack(per_rank(out.topk_weights, R, dtype)).float()
        flat_ids = ids.reshape(R, -1, ids.shape[-1])
        sc = torch.where(flat_ids >= 0, scale.gather(1, flat_ids.clamp(min=0).reshape(R, -1)).reshape(flat_ids.shape),
                         torch.zeros(()))
        coef = (sc * w.reshape(flat_ids.shape)).sum(-1)           # [R, rows]
        y = (tokens.reshape(R, -1, tokens.shape[-1]) * coef.unsqueeze(-1)).reshape(tokens.shape)
    return y.to(TDTYPE[dtype])


def expected_combine(shape, xs, idxs, ws, dtype, scale=None):
    R = shape["ranks"]
    L = shape["experts"] // R
    if scale is None:
        scale = torch.ones(R, L)
    ys = []
    for x, idx, w in zip(xs, idxs, ws):
        e = idx.clamp(min=0)
        s = scale.reshape(-1)[e]
        coef = torch.where(idx >= 0, w * s, torch.zeros(()))
        ys.append((x.float() * coef.sum(-1, keepdim=True)))
    return ys


def close(got, want, dtype, what):
    got, want = got.float(), want.float()
    bound = TOL[dtype] * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert err <= bound, f"{what}: differs by {err} (bound {bound})"


CASES = [(a, l, d) for (a, l) in LAYOUTS for d in ("f32", "bf16", "f16")]


def dense_moe(x, idx, w, scale):
    """y = sum_k w_k * scale[e_k] * x (identity experts scaled per expert)."""
    s = scale.reshape(-1)[idx.clamp(min=0)]
    coef = torch.where(idx >= 0, w * s, torch.zeros((), dtype=w.dtype))
    return (x.float() * coef.sum(-1, keepdim=True))


def group_moe(ex, x, idx, w, scale, layout, zero_fill=True):
    group = ex.group
    R, L = group.ranks, group.local_experts
    sent = ex.dispatch(x, idx, w)
    tokens = sent.tokens.float()
    if not zero_fill:   # rows outside the received zones are unspecified: the experts read the zones only
        counts = sent.expert_counts.long()                          # [R, L]
        rows = torch.arange(tokens.shape[-2 if layout == "expert_major" else 1])
        if layout == "expert_major":
            inside = rows.view(1, 1, -1) < counts.unsqueeze(-1)
        else:
            a = group.alignment
            padded = (counts + a - 1) // a * a
            ends = padded.cumsum(1)
            inside = rows.view(1, -1) < ends[:, -1:]
        tokens = torch.where(inside.unsqueeze(-1), tokens, torch.zeros(()))
    if layout == "expert_major":
        y = tokens * scale.view(R, L, 1, 1)
    elif layout == "expert_major_padded":
        ids = sent.topk_idx.long()
        if not zero_fill:
            ids = torch.where(inside, ids, torch.full_like(ids, -1))
        s = torch.where(ids >= 0, scale.gather(1, ids.clamp(min=0)), torch.zeros(()))
        y = tokens * s.unsqueeze(-1)
    else:
        ids = sent.topk_idx.long().reshape(R, -1, group.top_k)
        wt = sent.topk_weights.reshape(ids.shape)
        sc = torch.where(ids >= 0, scale.gather(1, ids.clamp(min=0).reshape(R, -1)).reshape(ids.shape), torch.zeros(()))
        coef = (sc * wt).sum(-1)
        y = (tokens.reshape(R, -1, tokens.shape[-1]) * coef.unsqueeze(-1)).reshape(tokens.shape)
    if not zero_fill:   # (and write only those rows: the rows' gradients outside the zones are unspecified too)
        y = torch.where((inside if layout == "expert_major" else inside).unsqueeze(-1), y, torch.zeros(()))
    return ex.combine(y.to(x.dtype), sent)


def kept_routing(shape, layout, idxs, cap):
    R = shape["ranks"]
    L = shape["experts"] // R
    a = shape["alignment"]
    keep = [torch.ones_like(i, dtype=torch.bool) for i in idxs]
    for d in range(R):
        zones, pairs, stopped = [0] * L, 0, False
        for s, idx in enumerate(idxs):
            for t in range(idx.shape[0]):
                ks = [k for k in range(idx.shape[1]) if idx[t, k] >= 0 and int(idx[t, k]) // L == d]
                if not ks:
                    continue
                if not stopped:
                    trial = list(zones)
                    for k in ks:
                        trial[int(idx[t, k]) % L] += 1
                    rows = sum((c + a - 1) // a * a for c in trial) if layout == "expert_major_padded" else pairs + 1
                    if rows > cap:
                        stopped = True
                    else:
                        zones, pairs = trial, pairs + 1
                if stopped:
                    for k in ks:
                        keep[s][t, k] = False
    return [torch.where(k, i, torch.full_like(i, -1)) for k, i in zip(keep, idxs)]


def dequantize(codes, scales, mode, hidden):
    v = codes.view(torch.float8_e4m3fn).float()
    bs = 32 if mode == "e8m0" else 128
    nb = hidden // bs
    if mode == "float32":
        sc = scales.float()[..., :nb]
    else:
        words = scales.to(torch.int32)
        exps = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], -1).reshape(*words.shape[:-1], -1)[..., :nb]
        sc = torch.pow(2.0, exps.float() - 127)
    return (v.reshape(*v.shape[:-1], nb, bs) * sc.unsqueeze(-1)).reshape(v.shape)


def mutate(rng, v):
    if isinstance(v, list):
        c = rng.choice(["drop_rank", "extra_rank", "rank_dtype", "rank_shape", "rank_noncontig", "rank_none"])
        w = list(v)
        i = rng.randrange(len(v))
        if c == "drop_rank":
            return c, w[:-1]
        if c == "extra_rank":
            return c, w + [w[0]]
        if c == "rank_dtype":
            w[i] = w[i].double() if w[i].is_floating_point() else w[i].to(torch.int16)
        elif c == "rank_shape":
            w[i] = torch.cat([w[i], w[i]], -1)
        elif c == "rank_noncontig":
            w[i] = torch.cat([w[i], w[i]], -1)[..., ::2]
        else:
            w[i] = None
        return c, w
    c = rng.choice(["dtype", "shape_last", "shape_rank", "noncontig", "dim", "scalar", "too_many_tokens"])
    if c == "dtype":
        return c, v.double() if v.is_floating_point() else v.to(torch.int16)
    if c == "shape_last":
        return c, torch.cat([v, v], -1)
    if c == "shape_rank":
        return c, torch.cat([v, v], 0)
    if c == "noncontig":
        return c, torch.cat([v, v], -1)[..., ::2]
    if c == "dim":
        return c, v[0]
    if c == "scalar":
        return c, 3
    return c, torch.cat([v] * 8, 1)
