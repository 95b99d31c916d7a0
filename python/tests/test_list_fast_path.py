"""The in-line path of the common call with per-rank lists (VirtualGroup._dispatch_lists /
_combine_lists: R plain torch tensors of each argument, forward, one launch, into a buffer
slot), which reads each tensor's properties once and compares them with the last call's: its
results are the general path's, bit for bit, and every input the general path refuses still
gets that path's error, word for word, whatever call came before."""

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi, _fast
from reference import random_routing
from test_in_line_path_caches import counting

torch = pytest.importorskip("torch")

from test_tensor_memory import leaked, negated, shrunk  # noqa: E402  (torch's odd tensors)

R, E, K, H, B = 3, 6, 2, 16, 4
LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]


def groups(algorithm="ll", layout="expert_major"):
    """A group whose in-line list path counts the calls it leaves to the general path (which
    checks each per-rank argument with _rows), and a group that never takes the in-line list
    path (the reference bits and errors)."""
    shape = dict(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", algorithm=algorithm, layout=layout)
    fast, general = ep.VirtualGroup(**shape), ep.VirtualGroup(**shape)
    general._dispatch_lists = general._combine_lists = lambda *_: None
    return fast, general, counting(fast, "_rows")


def inputs(rng, tokens=(B,) * R, index_types=(torch.int32,) * R):
    xs = [torch.from_numpy(rng.standard_normal((b, H)).astype(np.float32)) for b in tokens]
    idx = [torch.from_numpy(random_routing(rng, b, E, K)).to(t) for b, t in zip(tokens, index_types)]
    w = [torch.from_numpy(rng.random((b, K)).astype(np.float32)) for b in tokens]
    return xs, idx, w


def step(group, xs, idx, w, **options):
    """Everything a dispatch and the combine of its received rows (each doubled) give, cloned."""
    out = group.dispatch(xs, idx, w, **options)
    got = [out.handle.tokens, [t.clone() for t in out.tokens], out.expert_counts.clone(), out.layout]
    got += [None if out.topk_idx is None else [t.clone() for t in out.topk_idx],
            None if out.topk_weights is None else [t.clone() for t in out.topk_weights]]
    ys = [t * 2 for t in out.tokens]
    combined = group.combine(ys if type(xs) is list else tuple(ys), out.handle)
    return got + [[t.clone() for t in combined]]


def same(a, b):
    """Whether `a` and `b` are equal, each list, tuple and tensor of the same type, with the same bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outcome(call):
    """(the error's type and words) of `call`, or ("ok", its result)."""
    try:
        return "ok", call()
    except Exception as error:   # (any error: the fast group's must be the general group's)
        return type(error), str(error)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_the_in_line_list_path_gives_the_general_paths_bits(algorithm, layout):
    """Per-rank lists of the group's shapes (each rank its own B, int32 or int64 routing, lists or
    tuples, the group's own step or a handle, new tensors each call, or the same tensors at new
    addresses) dispatch and combine in line, with the general path's bits."""
    rng = np.random.default_rng(5)
    fast, general, left = groups(algorithm, layout)
    cases = [inputs(rng), inputs(rng), inputs(rng, (1, B, 2), (torch.int64, torch.int32, torch.int64)), inputs(rng, (2, 2, 2))]
    cases.append(tuple(tuple(a) for a in inputs(rng)))
    for arguments in cases + cases[:2]:
        assert same(step(fast, *arguments), step(general, *arguments))
        if layout != "expert_major_padded":   # (its combine reads the slot's per-slot weights: the general path)
            assert not left
        left.clear()
    xs, idx, w = inputs(rng)
    assert same(step(fast, xs, idx, w), step(general, xs, idx, w))
    for t in xs + w:   # the same tensors, their memory elsewhere (x.data = y): read where they are now
        t.data = t.clone() + 1
    assert same(step(fast, xs, idx, w), step(general, xs, idx, w))
    with fast.handle() as h, general.handle() as g:
        assert same(step(fast, xs, idx, w, handle=h), step(general, xs, idx, w, handle=g))
        assert same(step(fast, xs, idx, w, handle=h, record_event=True), step(general, xs, idx, w, handle=g, record_event=True))
    for group in (fast, general):
        group.check()
        group.close()


def odd_inputs(rng):
    """Per-rank lists the general path refuses by name (True) or takes its own way (False): rank
    1's entry of one or more arguments changed; and the good lists they were made from."""
    xs, idx, w = inputs(rng)
    x, i, v = xs[1], idx[1], w[1]
    cases = [
        ({0: x.double()}, True), ({1: i.float()}, True), ({2: v.double()}, True),                       # dtype
        ({0: torch.randn(H, B).t()}, True), ({1: torch.zeros(K, B, dtype=torch.int32).t()}, True),      # not contiguous
        ({2: torch.rand(K, B).t()}, True),
        ({0: torch.empty(B, H, device="meta")}, True), ({2: torch.empty(B, K, device="meta")}, True),   # no memory
        ({0: x[:, :H - 1]}, True), ({0: x[:, None]}, True), ({1: i[:, :1]}, True), ({2: v[:B - 1]}, True),   # shapes
        ({0: x[:B - 1]}, True),                                                                          # B: not the routing's
        ({0: torch.zeros(B + 1, H), 1: torch.zeros(B + 1, K, dtype=torch.int32), 2: torch.zeros(B + 1, K)}, True),   # > max_tokens
        ({0: negated(x)}, True), ({1: negated(i)}, True), ({2: negated(v)}, True),                      # negative views
        ({0: shrunk(x, 16)}, True), ({1: shrunk(i)}, True), ({2: shrunk(v, 8)}, True),                  # shrunk storages
        ({0: x.to_sparse()}, True), ({0: leaked(x)}, True), ({2: leaked(v)}, True),                     # sparse; torch.func wrappers
        ({0: torch.nested.nested_tensor([x, x])}, True),                                                # nested
        ({0: x.numpy()}, True), ({1: None}, True),                                                      # not tensors
        ({2: torch.nn.Parameter(v)}, False),                                                            # a subclass
        ({0: x[:0], 1: i[:0], 2: v[:0]}, False),                                                        # B = 0 (no memory)
    ]
    return cases, (xs, idx, w)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS[:3])
def test_each_odd_per_rank_input_gets_the_general_paths_error(algorithm, layout):
    """Whatever the in-line path cached before, an entry the general path refuses gets its error,
    word for word (one it takes, its bits); the cached call then still gives the general path's
    bits."""
    rng = np.random.default_rng(6)
    fast, general, _ = groups(algorithm, layout)
    cases, good = odd_inputs(rng)
    assert same(step(fast, *good), step(general, *good))
    for changes, refused in cases:
        arguments = [list(a) for a in good]
        for which, value in changes.items():
            arguments[which][1] = value
        want = outcome(lambda: step(general, *arguments))
        got = outcome(lambda: step(fast, *arguments))
        assert (want[0] is not ep.InvalidArgumentError) is not refused, (changes, want)
        assert got[0] is want[0] and ((got[1] == want[1]) if refused else same(got[1], want[1])), (changes, got, want)
        assert same(step(fast, *good), step(general, *good))   # (the cached call: taken again, its bits)
    with pytest.raises(ep.InvalidArgumentError, match=r"^xs\[1\]: a negative view"):
        fast.dispatch([good[0][0], negated(good[0][1]), good[0][2]], *good[1:])
    with pytest.raises(ep.InvalidArgumentError, match=r"^xs: 2 entries; must be one per rank \(3\)"):
        fast.dispatch(good[0][:2], *good[1:])
    with pytest.raises(ep.InvalidArgumentError, match=r"^topk_idx: 2 entries; must be one per rank \(3\)"):
        fast.dispatch(good[0], good[1][:2], good[2])
    for group in (fast, general):
        group.check()
        group.close()


def test_each_odd_per_rank_expert_output_gets_the_general_paths_error():
    """The same for the combine's expert outputs, and for the dispatch's weights, which LL
    expert-major's combine reads again where they are now: moved (x.data = y), they are read
    there; shrunk, named."""
    rng = np.random.default_rng(7)
    fast, general, left = groups()
    xs, idx, w = inputs(rng)
    shape = tuple(fast.recv_shape)
    ys = [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(R)]
    y = ys[1]
    odd = [y.double(), y.transpose(0, 1).contiguous().transpose(0, 1), torch.empty(shape, device="meta"), y[:, :-1],
           y.reshape(shape[0], -1), negated(y), shrunk(y, 64), y.to_sparse(), leaked(y), y.numpy(), None, torch.nn.Parameter(y)]

    def combined(group, outputs, weights=None):
        out = group.dispatch(xs, idx, weights or w)
        return outcome(lambda: [t.clone() for t in group.combine(outputs, out.handle)])

    assert same(combined(fast, ys)[1], combined(general, ys)[1]) and not left
    for value in odd:
        outputs = list(ys)
        outputs[1] = value
        got, want = combined(fast, outputs), combined(general, outputs)
        assert got[0] is want[0] and ((got[1] == want[1]) if want[0] != "ok" else same(got[1], want[1])), (got, want)
        assert same(combined(fast, ys)[1], combined(general, ys)[1])
    assert combined(fast, ys[:2])[1] == "expert_outputs: 2 entries; must be one per rank (3)"

    def moved_and_shrunk(group):
        """The combine of a step whose dispatch's weights moved since (x.data = y); and that of one
        whose weights' storage was shrunk since, refused."""
        weights = [t.clone() for t in w]
        out = group.dispatch(xs, idx, weights)
        big = torch.zeros(1 << 18)   # (moved into a view of a larger storage, elsewhere in memory)
        big[4096:4096 + B * K] = w[1].reshape(-1) * 3
        weights[1].data = big[4096:4096 + B * K].view(B, K)
        moved = [t.clone() for t in group.combine(ys, out.handle)]
        out = group.dispatch(xs, idx, weights)
        weights[2].untyped_storage().resize_(4)
        with pytest.raises(ep.InvalidArgumentError, match=r"^topk_weights\[2\]: storage of 4 bytes; must hold the 32 bytes"):
            group.combine(ys, out.handle)
        # (Shrunk where it was: torch moves a storage it shrinks, so the step's record is made to say so.)
        out = group.dispatch(xs, idx, [t.clone() for t in w])
        out.handle.topk_weights[0].untyped_storage().resize_(8)
        out.handle.weight_addresses = tuple(t.data_ptr() for t in out.handle.topk_weights)
        with pytest.raises(ep.InvalidArgumentError, match=r"^topk_weights\[0\]: storage of 8 bytes; must hold the 32 bytes"):
            group.combine(ys, out.handle)
        return moved

    moved = moved_and_shrunk(fast)
    assert same(moved, moved_and_shrunk(general)) and not same(moved, combined(general, ys)[1])
    for group in (fast, general):
        group.check()
        group.close()


def test_set_many_writes_what_set_writes_rank_by_rank():
    """Descriptors.set_many writes each rank's address, rows and type at once (only the addresses
    where the rows and types are the last call's): the descriptors are those set() writes rank by
    rank, after any mix of the two and set_all."""

    def written(d):
        return [(t.data or 0, t.dtype, t.ndim, list(t.sizes), list(t.strides), t.device, t.structSize) for t in d.array]

    many, one = _fast.Descriptors(R, -1, _abi.BF16, (H,)), _fast.Descriptors(R, -1, _abi.BF16, (H,))
    calls = [((4096, 8192, 0), (4, 2, 0), (_abi.I32, _abi.I64, _abi.I32)), ((12288, 8192, 16384), (4, 2, 0), (_abi.I32, _abi.I64, _abi.I32)),
             ((12288, 8192, 16384), (1, 2, 3), (_abi.I32, _abi.I64, _abi.I32)), ((64, 128, 256), (1, 2, 3), (_abi.I64,) * R),
             ((64, 128, 256), (1, 2, 3), (_abi.I64,) * R)]
    for addresses, rows, dtypes in calls:
        many.set_many(addresses, rows, dtypes)
        for r in range(R):
            one.set(r, addresses[r], rows[r], dtypes[r])
        assert written(many) == written(one) and many.addresses == list(addresses)
    many.set(1, 512, 7, _abi.F32)   # set() after set_many writes; set_many after it writes all again
    assert written(many)[1][:4] == (512, _abi.F32, 2, [7, H, 0, 0])
    many.set_many(*calls[-1])
    assert written(many) == written(one)
    many.set_all(1024, 2, _abi.BF16, 2)
    many.set_many(*calls[-1])
    assert written(many) == written(one)


def test_the_in_line_list_path_refuses_a_tensor_on_another_device():
    """A tensor on another device than the group's (a CUDA tensor given to a CPU group: here the
    reads _fast.per_rank gives, one tensor's device changed) is not the common call's: the
    general path takes the call (and names it)."""
    rng = np.random.default_rng(8)
    fast, general, _ = groups()
    xs, idx, w = inputs(rng)
    out = fast.dispatch(xs, idx, w)
    seen = _fast.per_rank((xs, idx, w))[0]
    assert fast._list_signature(list(seen)) is not None
    for which in range(3 * R):
        moved = list(seen)
        moved[4 * which + 2] = 0
        assert fast._list_signature(moved) is None, which
    seen = _fast.per_rank((out.tokens,))[0]
    assert fast._combine_list_signature(list(seen))
    for which in range(R):
        moved = list(seen)
        moved[4 * which + 2] = 0
        assert not fast._combine_list_signature(moved), which
    for group in (fast, general):
        group.close()


@pytest.mark.parametrize("stacked", [False, True])
def test_weights_replaced_in_place_by_fewer_are_named_not_read_past(stacked):
    """LL expert-major's combine reads the dispatch's topk_weights again: replaced in place since by
    a tensor of fewer elements (``.data =``, at a new address; ``resize_()``, at the same one), the
    library would read the step's B x K weights past it. Both the in-line and the general path
    name the tensor, its shape now and the dispatch's."""
    rng = np.random.default_rng(7)
    xs, idx, w = inputs(rng)
    for group in groups()[:2]:
        for change in ("data", "resize"):
            weights = torch.stack(w) if stacked else [t.clone() for t in w]
            out = group.dispatch(torch.stack(xs) if stacked else xs, torch.stack(idx) if stacked else idx, weights)
            target = weights if stacked else weights[1]
            smaller = (1, 1, K) if stacked else (1, K)
            if change == "data":
                target.data = torch.zeros(smaller)
            else:
                target.resize_(smaller)
            name = r"topk_weights" if stacked else r"topk_weights\[1\]"
            shape = f"\\[{R}, {B}, {K}\\]" if stacked else f"\\[{B}, {K}\\]"
            with pytest.raises(ep.InvalidArgumentError, match=rf"^{name}: a Tensor of shape \[{', '.join(map(str, smaller))}\] "
                               rf"of torch.float32; must be the dispatch's {shape} float32, contiguous, which this combine reads again"):
                group.combine(out.received if stacked else out.tokens, out.handle)
        group.check()
        group.close()
