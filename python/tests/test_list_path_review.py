"""Review of the per-rank-list in-line path (fb525a8..): what a differential run of random call
sequences against the base found. LL expert-major's combine reads the dispatch's topk_weights
again; the general path (_kept_weights) names them when they are no longer the dispatch's
[B, K] float32, contiguous, with their values in their memory. The in-line combine gates
(_kept_list_weights for per-rank lists, _combine_common for one stacked array) must give the
same verdict: whether such a tensor is refused must not depend on the form of the expert
outputs, and a tensor whose memory is not its values is never read as if it were."""

import re

import numpy as np
import pytest

import expert_parallel as ep
from reference import random_routing

torch = pytest.importorskip("torch")

R, E, K, H, B = 2, 4, 2, 8, 2   # (B == K: a transposed [B, K] view is [B, K] too)


def inputs(seed):
    rng = np.random.default_rng(seed)
    xs = [torch.from_numpy(rng.standard_normal((B, H)).astype(np.float32)) for _ in range(R)]
    idx = [torch.from_numpy(random_routing(rng, B, E, K)).to(torch.int32) for _ in range(R)]
    w = [torch.from_numpy(rng.random((B, K)).astype(np.float32)) for _ in range(R)]
    return xs, idx, w


def group(general=False):
    g = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32")
    if general:   # (never the in-line combines: the reference verdict)
        g._combine_lists = g._combine_common = lambda *_: None
    return g


# Each change leaves the tensor at the dispatch's address (so the in-line gates' address test
# passes) with the dispatch's shape, but it is no longer the [B, K] float32 the library reads
# there, or its memory no longer holds its values.
CHANGES = {
    "int32 view": lambda t: setattr(t, "data", t.view(torch.int32)),
    "transposed": lambda t: setattr(t, "data", t.transpose(-1, -2)),
    "negative view, same memory": lambda t: setattr(t, "data", torch._neg_view(t)),
    "negative view, new memory": lambda t: setattr(t, "data", torch._neg_view(-t.clone())),
}
REFUSED = {
    "int32 view": r"of torch\.int32; must be the dispatch's",
    "transposed": r", not contiguous; must be the dispatch's",
    "negative view, same memory": r"a negative view \(is_neg\(\) is True\)",
    "negative view, new memory": r"a negative view \(is_neg\(\) is True\)",
}


def verdict(stacked_dispatch, stacked_outputs, change, general):
    g = group(general)
    xs, idx, w = inputs(1)
    if stacked_dispatch:
        xs, idx, w = torch.stack(xs), torch.stack(idx), torch.stack(w)
    out = g.dispatch(xs, idx, w)
    CHANGES[change](w if stacked_dispatch else w[1])
    ys = out.received.clone() if stacked_outputs else [t.clone() for t in out.tokens]
    try:
        combined = g.combine(ys, out.handle)
        return "ok", torch.stack(list(combined))
    except ep.InvalidArgumentError as error:
        return "refused", str(error)
    finally:
        g.close()


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("stacked_dispatch", [False, True])
def test_kept_weights_changed_in_place_are_refused_whatever_the_form_of_the_expert_outputs(change, stacked_dispatch):
    """The in-line combines took such weights (their address and shape unchanged), while the
    general path, which the same step's combine takes for expert outputs of the other form,
    refused them (dtype, contiguity) or read them negated (a negative view: its memory holds the
    values negated, which the library reads as they are)."""
    weights = r"topk_weights" if stacked_dispatch else r"topk_weights\[1\]"
    for stacked_outputs in (False, True):
        for general in (False, True):
            got = verdict(stacked_dispatch, stacked_outputs, change, general)
            assert got[0] == "refused", (stacked_outputs, general, got)
            assert re.match(weights + ": ", got[1]) and re.search(REFUSED[change], got[1]), got[1]


def test_kept_weights_changed_in_value_are_read_as_they_are_now():
    """What stays taken: weights changed in place in value (mul_), or moved to new memory with the
    same values (x.data = a copy), are read as they are now by every path, the same bits."""
    results = []
    for stacked_dispatch in (False, True):
        for stacked_outputs in (False, True):
            for general in (False, True):
                for change in ("scaled", "moved"):
                    g = group(general)
                    xs, idx, w = inputs(2)
                    if stacked_dispatch:
                        xs, idx, w = torch.stack(xs), torch.stack(idx), torch.stack(w)
                    out = g.dispatch(xs, idx, w)
                    t = w if stacked_dispatch else w[1]
                    if change == "scaled":
                        t.mul_(3)
                    else:
                        t.data = t.clone() * 3
                    ys = out.received.clone() if stacked_outputs else [y.clone() for y in out.tokens]
                    results.append(torch.stack(list(g.combine(ys, out.handle))))
                    g.close()
    for i in (0, 8):   # (a list dispatch's eight combines, then a stacked one's)
        assert all(torch.equal(results[i], r) for r in results[i:i + 8])


# -- a differential run, in small ------------------------------------------------------------
#
# The review compared the base and this change over random call sequences (each tree in its own
# process). The same idea within one tree: a group whose in-line paths run, against a twin whose
# in-line paths are off (the general path's bits and words), each playing the same sequence from
# the same seed: per-rank lists, tuples and stacked tensors of each B per rank, int32 and int64
# routing, handles, odd entries, the dispatch's weights changed in place before the combine,
# masks. Every call's outcome must be the same: result bits, handle fields, error type and words.

LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]


def _general_only(g):
    g._dispatch_lists = g._combine_lists = g._dispatch_common = g._combine_common = lambda *_: None
    return g


def _bits(value):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, (list, tuple)):
        return [type(value).__name__] + [_bits(v) for v in value]
    return value if value is None or isinstance(value, (int, str, bool)) else type(value).__name__


def _play(seed, general):
    """The outcomes of one random sequence of calls (a list, one entry per call)."""
    import random

    rng, data = random.Random(seed), np.random.default_rng(seed)
    r, (algorithm, layout) = rng.randint(1, 3), rng.choice(LAYOUTS)
    e, b_max, h = r * rng.randint(1, 2), rng.randint(1, 3), rng.choice([4, 8])
    k, dtype = rng.randint(1, min(e, 3)), rng.choice([torch.float32, torch.bfloat16, torch.float16])
    g = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b_max, algorithm=algorithm, layout=layout,
                        dtype={torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype], buffer_slots=2)
    if general:
        _general_only(g)
    outcomes, live, own, shrunk = [], [], [], []

    def record(call):
        try:
            outcomes.append(("ok", call()))
        except Exception as error:   # (any error: both groups' must be the same)
            outcomes.append((type(error).__name__, str(error)))

    def form(values):
        c = rng.random()
        if (c < 0.15 and all(isinstance(v, torch.Tensor) and not v.is_neg() for v in values)
                and len({tuple(v.shape) for v in values}) == 1 and all(v.dtype == values[0].dtype for v in values)):
            return torch.stack(values)
        return tuple(values) if c < 0.45 else list(values)

    for _ in range(30):
        c = rng.random()
        if c < 0.45:
            tokens = [rng.randint(1, b_max) for _ in range(r)] if rng.random() < 0.5 else [b_max] * r
            xs = [torch.from_numpy(data.standard_normal((b, h)).astype(np.float32)).to(dtype) for b in tokens]
            idx = [torch.from_numpy(random_routing(data, b, e, k)).to(rng.choice([torch.int32, torch.int64])) for b in tokens]
            w = [torch.from_numpy(data.random((b, k)).astype(np.float32)) for b in tokens]
            if rng.random() < 0.15:   # one odd entry
                which, rank = rng.choice([xs, idx, w]), rng.randrange(r)
                which[rank] = rng.choice([lambda t: t.double(), lambda t: t[:, :1], lambda t: torch._neg_view(-t),
                                          lambda t: None, lambda t: t.t().contiguous().t()])(which[rank])
            options = {}
            if rng.random() < 0.2:
                if not own:
                    own.append(g.handle())
                options["handle"] = own[0]
            given = form(w)
            record(lambda: live.append((g.dispatch(form(xs), form(idx), given, **options), given)) or
                   [_bits(live[-1][0].tokens), _bits(live[-1][0].expert_counts), live[-1][0].handle.tokens,
                    live[-1][0].handle.step, live[-1][0].handle.slot])
        elif c < 0.85 and live:
            result, _ = live[-1] if rng.random() < 0.8 else live[rng.randrange(len(live))]
            ys = [(t.float() * 2).to(dtype) for t in result.tokens]
            options = {}
            if rng.random() < 0.1 and layout == "expert_major":
                options["topk_weights"] = form([torch.from_numpy(data.random((b, k)).astype(np.float32))
                                                for b in result.handle.tokens])
            record(lambda: _bits(g.combine(form(ys), result.handle, **options)))
        elif c < 0.93 and live:   # the last dispatch's weights changed since, in place
            result, given = live[-1]
            t = given if isinstance(given, torch.Tensor) else given[rng.randrange(r)]
            if not isinstance(t, torch.Tensor) or any(t is s for s in shrunk):   # (torch itself reads past a shrunk one)
                continue
            change = rng.choice(["mul", "moved", "int32", "neg", "resize", "shrink"])
            changes = {"mul": lambda: t.mul_(2), "moved": lambda: setattr(t, "data", t.clone() * 3),
                       "int32": lambda: setattr(t, "data", t.view(torch.int32)),
                       "neg": lambda: setattr(t, "data", torch._neg_view(t)),
                       "resize": lambda: t.resize_((max(t.shape[0] - 1, 0),) + tuple(t.shape[1:])),
                       "shrink": lambda: t.untyped_storage().resize_(0)}
            record(lambda: (changes[change](), change)[1])
            if change == "shrink":
                shrunk.append(t)
        elif c < 0.97:
            rank = rng.randrange(r)
            record(lambda: g.deactivate(rank))
        else:
            record(lambda: g.clean())
    for handle in own:
        handle.release()
    g.close()
    return outcomes


@pytest.mark.parametrize("first", range(0, 160, 20))
def test_random_sequences_give_the_general_paths_outcomes(first):
    for seed in range(first, first + 20):
        fast, general = _play(seed, False), _play(seed, True)
        for i, (got, want) in enumerate(zip(fast, general)):
            assert got == want, (seed, i, got, want)
        assert len(fast) == len(general)
