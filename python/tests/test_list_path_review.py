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
