"""The stacked calls (epGroupDispatchStacked / epGroupCombineStacked: one description per
argument, which VirtualGroup uses for stacked [R, B, ...] arrays) give the same bits as the
per-rank calls (lists of per-rank arrays) in every layout, forward and backward, on the CPU and
(EP_GPU_TESTS=1) on the GPU; and a bad stacked argument gets a named error."""

import ctypes
import os

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import load
from reference import random_payload, random_routing

GPU = os.environ.get("EP_GPU_TESTS") == "1"
LAYOUTS = [("ll", "expert_major", 1), ("ll", "rank_major", 1), ("ht", "flat", 1), ("ht", "expert_major_padded", 4)]
DEVICES = ["cpu"] + (["cuda:0"] if GPU else [])


def to_device(array, device):
    """A NumPy array (bf16: uint16 bits) as the group's device wants it."""
    if device == "cpu":
        return array
    import torch

    if array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(array).to(device)


def to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    import torch

    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).cpu().numpy().view(np.uint16)
    return value.cpu().numpy()


def bits(value):
    return to_numpy(value).view(np.uint8)


def run(group, inputs, stacked, ht):
    """Dispatch, combine, a backward dispatch and (HT) a backward combine; what each returned."""
    r = group.ranks
    x, idx, w, ys, grads = inputs

    def arg(a):
        return a if stacked else [a[i] for i in range(r)]

    out = group.dispatch(arg(x), arg(idx), arg(w))
    seen = [bits(out.received), [bits(c) for c in out.expert_counts], [bits(c) for c in out.expert_source_counts]]
    if out.topk_idx is not None:
        seen += [[bits(t) for t in out.topk_idx], [bits(t) for t in out.topk_weights]]
    combined = group.combine(arg(ys), out.handle)
    seen.append([bits(c) for c in combined])
    back = group.dispatch(arg(x), None, arg(w), handle=out.handle, direction="backward")
    seen.append(bits(back.received))
    if ht:
        tokens, gradients = group.combine(arg(ys), back.handle, direction="backward", weight_gradients=arg(grads))
        seen += [[bits(t) for t in tokens], [bits(g) for g in gradients]]
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_stacked_calls_equal_the_per_rank_calls(device, algorithm, layout, alignment, dtype):
    rng = np.random.default_rng(7)
    r, e, k, h, b = 3, 12, 3, 32, 5
    shape = dict(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b + 1, algorithm=algorithm, layout=layout,
                 alignment=alignment, dtype=dtype, device=device)
    groups = [ep.VirtualGroup(**shape) for _ in range(2)]
    x = np.stack([random_payload(rng, (b, h), dtype) for _ in range(r)])
    idx = np.stack([random_routing(rng, b, e, k) for _ in range(r)]).astype(np.int32)
    w = rng.random((r, b, k)).astype(np.float32)
    recv = groups[0].recv_shape
    ys = np.stack([random_payload(rng, recv, dtype) for _ in range(r)])
    grads = rng.random((r,) + (groups[0].recv_routing_shape or (1,))).astype(np.float32)
    inputs = [to_device(a, device) for a in (x, idx, w, ys, grads)]
    per_rank = run(groups[0], inputs, stacked=False, ht=algorithm == "ht")
    stacked = run(groups[1], inputs, stacked=True, ht=algorithm == "ht")
    assert len(per_rank) == len(stacked)
    for i, (want, got) in enumerate(zip(per_rank, stacked)):
        for a, c in zip(want if isinstance(want, list) else [want], got if isinstance(got, list) else [got]):
            np.testing.assert_array_equal(c, a, err_msg=f"result {i}")
    for g in groups:
        g.check()
        g.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_stacked_dispatch_combines_from_per_rank_lists_and_back(device):
    """A step dispatched stacked combines with per-rank lists (and the other way round): LL
    expert-major's combine finds the dispatch's weights either way."""
    rng = np.random.default_rng(3)
    r, e, k, h, b = 2, 8, 2, 16, 4
    group = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, dtype="f32", device=device)
    reference = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, dtype="f32", device=device)
    x = to_device(rng.standard_normal((r, b, h)).astype(np.float32), device)
    idx = to_device(np.stack([random_routing(rng, b, e, k, 0.0) for _ in range(r)]).astype(np.int32), device)
    w = to_device(rng.random((r, b, k)).astype(np.float32), device)
    ys = to_device(rng.standard_normal((r,) + group.recv_shape).astype(np.float32), device)
    want = reference.combine([ys[i] for i in range(r)], reference.dispatch([x[i] for i in range(r)], [idx[i] for i in range(r)],
                                                                            [w[i] for i in range(r)]).handle)
    got = group.combine([ys[i] for i in range(r)], group.dispatch(x, idx, w).handle)
    for a, c in zip(want, got):
        np.testing.assert_array_equal(bits(c), bits(a))
    got = group.combine(ys, group.dispatch([x[i] for i in range(r)], [idx[i] for i in range(r)], [w[i] for i in range(r)]).handle)
    for a, c in zip(want, got):
        np.testing.assert_array_equal(bits(c), bits(a))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [True, False])
def test_weights_given_to_combine_replace_the_dispatchs(device, stacked):
    """LL expert-major's forward combine applies weights given to it, stacked or per rank, with
    the bits of a step whose dispatch was given those weights; a dispatch given none or others."""
    rng = np.random.default_rng(5)
    r, e, k, h, b = 3, 12, 3, 16, 4
    shape = dict(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, dtype="bf16", device=device)
    group, reference = ep.VirtualGroup(**shape), ep.VirtualGroup(**shape)
    x = to_device(np.stack([random_payload(rng, (b, h), "bf16") for _ in range(r)]), device)
    idx = to_device(np.stack([random_routing(rng, b, e, k) for _ in range(r)]).astype(np.int32), device)
    w, other = (to_device(rng.random((r, b, k)).astype(np.float32), device) for _ in range(2))
    ys = to_device(np.stack([random_payload(rng, group.recv_shape, "bf16") for _ in range(r)]), device)

    def arg(a):
        return a if stacked else [a[i] for i in range(r)]

    want = [bits(c) for c in reference.combine(arg(ys), reference.dispatch(arg(x), arg(idx), arg(w)).handle)]
    for given in (None, other):
        out = group.dispatch(arg(x), arg(idx), None if given is None else arg(given))
        got = group.combine(arg(ys), out.handle, topk_weights=arg(w))
        for a, c in zip(want, got):
            np.testing.assert_array_equal(bits(c), a)
    # The dispatch's weights again when combine is given none.
    out = group.dispatch(arg(x), arg(idx), arg(other))
    assert any((bits(c) != a).any() for a, c in zip(want, group.combine(arg(ys), out.handle)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_stacked_outputs_of_the_caller_take_the_stacked_calls_with_the_per_rank_bits(device, algorithm, layout, alignment):
    """out= as stacked [R, ...] arrays (dispatch: tokens, and the routing where the layout
    receives it; combine: the combined tokens, and backward HT the weight gradients) goes
    through the stacked calls (one C call each, the per-rank entry points never called) and
    writes what per-rank out= lists get, forward and backward."""
    rng = np.random.default_rng(9)
    r, e, k, h, b = 3, 12, 3, 32, 5
    shape = dict(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b + 1, algorithm=algorithm, layout=layout,
                 alignment=alignment, dtype="bf16", device=device)
    lists, stacked = ep.VirtualGroup(**shape), ep.VirtualGroup(**shape)

    def refuse(*arguments):
        raise AssertionError("a per-rank entry point was called")

    stacked._fn_update = stacked._fn_dispatch = stacked._fn_combine = refuse
    x = to_device(np.stack([random_payload(rng, (b, h), "bf16") for _ in range(r)]), device)
    idx = to_device(np.stack([random_routing(rng, b, e, k) for _ in range(r)]).astype(np.int32), device)
    w = to_device(rng.random((r, b, k)).astype(np.float32), device)
    ys = to_device(np.stack([random_payload(rng, lists.recv_shape, "bf16") for _ in range(r)]), device)
    routing = lists.recv_routing_shape
    grads = to_device(rng.random((r,) + (routing or (1,))).astype(np.float32), device)
    ht = algorithm == "ht"

    def zeros(tail, dtype):
        return to_device(np.zeros((r,) + tuple(tail), dtype), device)

    def outputs(counts=False):
        tokens = zeros(lists.recv_shape, np.uint16)
        extra = (zeros((lists.local_experts,), np.int32),) if counts else ()
        if routing is None:
            return (tokens, None, None) + extra
        return (tokens, zeros(routing, np.int32), zeros(routing, np.float32)) + extra

    def per_rank(arrays):
        return tuple(None if a is None else [a[i] for i in range(r)] for a in arrays)

    seen = []
    for group, form in ((lists, per_rank), (stacked, lambda arrays: arrays)):
        got = []
        out = outputs(counts=True)
        d = group.dispatch(x, idx, w, out=form(out))
        assert d.handle.slot == -1 and len(d.tokens) == r and d.expert_counts is not None
        got += [bits(a) for a in out if a is not None]
        counted = bits(out[3])
        combined = zeros((b, h), np.uint16)
        result = group.combine(ys, d.handle, out=form((combined,))[0])
        assert len(result) == r and all(np.array_equal(bits(c), bits(combined[i])) for i, c in enumerate(result))
        got.append(bits(combined))
        back_out = outputs()
        back = group.dispatch(x, None, w, handle=d.handle, direction="backward", out=form(back_out))
        got += [bits(a) for a in back_out if a is not None]
        if ht:
            tokens, gradients = zeros((b, h), np.uint16), zeros((b, k), np.float32)
            group.combine(ys, back.handle, direction="backward", weight_gradients=grads, out=form((tokens, gradients)))
            got += [bits(tokens), bits(gradients)]
        seen.append(got)
    for i, (want, got) in enumerate(zip(*seen)):
        np.testing.assert_array_equal(got, want, err_msg=f"result {i}")
    # The counts are those of the group's own dispatch (into its buffer slot).
    np.testing.assert_array_equal(counted, bits(lists.dispatch(x, idx, w).expert_counts))
    # A bad stacked output is named, and nothing is written.
    out = outputs()
    with pytest.raises(ep.InvalidArgumentError, match=r"out tokens: shape \[2, "):
        stacked.dispatch(x, idx, w, out=(out[0][:2],) + out[1:])
    with pytest.raises(ep.InvalidArgumentError, match=r"out: shape \[3, 4, 32\]; must be \[3, 5, 32\]"):
        stacked.combine(ys, d.handle, out=zeros((b - 1, h), np.uint16))
    for g in (lists, stacked):
        g.check()
        g.close()


def test_bad_stacked_arguments_get_named_errors():
    rng = np.random.default_rng(5)
    group = ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    idx = np.zeros((2, 3, 2), np.int32)
    idx[..., 1] = 1
    with pytest.raises(ep.InvalidArgumentError, match=r"xs: 4 tokens per rank; must be ≤ max_tokens \(3\)"):
        group.dispatch(np.zeros((2, 4, 8), np.float32), np.zeros((2, 4, 2), np.int32))
    with pytest.raises(ep.InvalidArgumentError, match="topk_idx"):
        group.dispatch(x, idx.astype(np.float32))
    with pytest.raises(ep.InvalidArgumentError, match="xs"):
        group.dispatch(x.astype(np.float16), idx)
    out = group.dispatch(x, idx, np.ones((2, 3, 2), np.float32))
    assert out.handle.tokens == [3, 3]

    # The C entry point itself: a stride shorter than one rank's part, named with its bound.
    library = load()
    call = _abi.new(_abi.StackedDispatch, tokens=3)
    call.topkIdx = _abi.Stacked(idx.ctypes.data, _abi.I32, -1, 0)
    call.inputTokens = _abi.Stacked(x.ctypes.data, _abi.F32, -1, 8)
    received = np.zeros((2,) + group.recv_shape, np.float32)
    call.receivedTokens = _abi.Stacked(received.ctypes.data, _abi.F32, -1, 0)
    assert library.epGroupDispatchStacked(group._group, ctypes.byref(call), None) == _abi.INVALID_ARGUMENT
    message = library.epGetLastErrorMessage().decode()
    assert "call.inputTokens.rankStride = 8" in message and "96" in message, message
    call.inputTokens.rankStride = 0
    call.receivedTokens.device = -3
    assert library.epGroupDispatchStacked(group._group, ctypes.byref(call), None) == _abi.INVALID_ARGUMENT
    assert "call.receivedTokens.device = -3" in library.epGetLastErrorMessage().decode()
    # A refused call left the step as it was: the package's step still combines.
    y = group.combine(np.zeros((2,) + group.recv_shape, np.float32), out.handle)
    assert [t.shape for t in y] == [(3, 8), (3, 8)]
    call.receivedTokens.device = -1
    assert library.epGroupDispatchStacked(group._group, ctypes.byref(call), None) == _abi.SUCCESS
    np.testing.assert_array_equal(received, to_numpy(out.received))   # the same rows as the package's call


@pytest.mark.parametrize("seed", range(40))
def test_a_mutated_stacked_call_is_refused_by_name_and_writes_nothing(seed):
    """Random single mutations of a valid stacked dispatch and combine through the C entry points
    (type, device, stride, alignment, NULL data, tokens, enums, struct size): every call either
    succeeds or fails with a named error that starts with the entry point, and a refused call
    leaves every output as it was."""
    rng = np.random.default_rng(seed)
    algorithm, layout, alignment = LAYOUTS[seed % len(LAYOUTS)]
    r, e, k, h, b = 2, 8, 2, 16, 3
    group = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, algorithm=algorithm, layout=layout,
                            alignment=alignment, dtype="f32")
    library = load()
    x = rng.standard_normal((r, b, h)).astype(np.float32)
    idx = np.stack([random_routing(rng, b, e, k, 0.0) for _ in range(r)]).astype(np.int32)
    w = rng.random((r, b, k)).astype(np.float32)
    recv = np.zeros((r,) + group.recv_shape, np.float32)
    routing = group.recv_routing_shape
    recv_idx = np.zeros((r,) + routing, np.int32) if routing else None
    recv_w = np.zeros((r,) + routing, np.float32) if routing else None
    counts = np.zeros((r, group.local_experts), np.int32)
    combined = np.zeros((r, b, h), np.float32)

    def stacked(array, dtype):
        return _abi.Stacked(0 if array is None else array.ctypes.data, dtype, -1, 0)

    d = _abi.new(_abi.StackedDispatch, tokens=b)
    d.topkIdx, d.inputTokens, d.topkWeights = stacked(idx, _abi.I32), stacked(x, _abi.F32), stacked(w, _abi.F32)
    d.receivedTokens, d.expertCounts = stacked(recv, _abi.F32), stacked(counts, _abi.I32)
    if routing:
        d.receivedTopkIdx, d.receivedTopkWeights = stacked(recv_idx, _abi.I32), stacked(recv_w, _abi.F32)
    c = _abi.new(_abi.StackedCombine)
    c.expertOutputs, c.combinedTokens = stacked(recv, _abi.F32), stacked(combined, _abi.F32)
    if layout == "expert_major":
        c.topkWeights = stacked(w, _abi.F32)
    elif layout == "expert_major_padded":
        c.topkWeights = stacked(recv_w, _abi.F32)

    def mutate(struct, names):
        name = names[rng.integers(len(names))]
        field = getattr(struct, name)
        kind = rng.integers(7)
        if kind == 0:
            field.dtype = int(rng.integers(0, 8))
        elif kind == 1:
            field.device = int(rng.choice([-2, 0, 3]))
        elif kind == 2:
            field.rankStride = int(rng.choice([1, 4, 8, 12, -8, 1 << 61]))
        elif kind == 3 and field.data:
            field.data += int(rng.choice([1, 2, 4]))
        elif kind == 4:
            field.data = None
        elif kind == 5:
            struct.direction = int(rng.choice([1, 5]))
        else:
            struct.structSize = int(rng.choice([0, 8, ctypes.sizeof(struct) + 8]))
        return name

    outputs = [a for a in (recv, recv_idx, recv_w, counts, combined) if a is not None]
    assert library.epGroupDispatchStacked(group._group, ctypes.byref(d), None) == _abi.SUCCESS
    for call, entry, struct_type in ((d, "epGroupDispatchStacked", _abi.StackedDispatch), (c, "epGroupCombineStacked", _abi.StackedCombine)):
        bad = struct_type.from_buffer_copy(call)
        names = [n for n, t in struct_type._fields_ if t is _abi.Stacked]
        mutate(bad, names)
        if struct_type is _abi.StackedDispatch and rng.random() < 0.3:
            bad.tokens = int(rng.choice([-1, b + 1, 1 << 40]))
        before = [a.copy() for a in outputs]
        status = getattr(library, entry)(group._group, ctypes.byref(bad), None)
        message = library.epGetLastErrorMessage().decode()
        assert status in (_abi.SUCCESS, _abi.INVALID_ARGUMENT, _abi.INVALID_USAGE), (status, message)
        if status != _abi.SUCCESS:
            assert message.startswith(entry + ": "), message
            for a, was in zip(outputs, before):
                np.testing.assert_array_equal(a, was, err_msg=f"{entry} wrote an output it refused: {message}")
        # The valid call still works after any refusal (a refused dispatch with routing voided the step).
        assert library.epGroupDispatchStacked(group._group, ctypes.byref(d), None) == _abi.SUCCESS
    assert library.epGroupCombineStacked(group._group, ctypes.byref(c), None) == _abi.SUCCESS


@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_a_masked_rank_gets_the_same_from_stacked_and_per_rank_calls(algorithm, layout, alignment):
    """With a rank masked inactive (CPU), the stacked calls read and write what the per-rank calls
    do: the masked rank neither sends nor receives, and its counts read as zero."""
    rng = np.random.default_rng(11)
    r, e, k, h, b = 3, 6, 2, 8, 4
    shape = dict(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, algorithm=algorithm, layout=layout, alignment=alignment,
                 dtype="f32", buffer_slots=1)   # one slot: the masked step reuses the first step's buffers
    groups = [ep.VirtualGroup(**shape) for _ in range(2)]
    x = rng.standard_normal((r, b, h)).astype(np.float32)
    idx = np.stack([random_routing(rng, b, e, k, 0.0) for _ in range(r)]).astype(np.int32)
    w = rng.random((r, b, k)).astype(np.float32)
    results = []
    for group, stacked in zip(groups, (False, True)):
        arg = (lambda a: a) if stacked else (lambda a: [a[i] for i in range(r)])
        first = group.dispatch(arg(x), arg(idx), arg(w))
        assert first.expert_counts[1].any()   # rank 1 received rows in the unmasked step
        group.combine(arg(np.ones((r,) + group.recv_shape, np.float32)), first.handle)
        group.deactivate(1)
        out = group.dispatch(arg(x), arg(idx), arg(w))
        ys = np.ones((r,) + group.recv_shape, np.float32)
        combined = group.combine(arg(ys), out.handle)
        results.append((out.received.copy(), out.expert_counts.copy(), [c.copy() for c in combined]))
    (received_a, counts_a, combined_a), (received_b, counts_b, combined_b) = results
    np.testing.assert_array_equal(received_b, received_a)
    np.testing.assert_array_equal(counts_b, counts_a)
    assert not counts_b[1].any()
    for a, c in zip(combined_a, combined_b):
        np.testing.assert_array_equal(c, a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_the_common_call_takes_the_in_line_path_with_the_general_paths_bits(device, algorithm, layout, alignment):
    """Three stacked torch tensors, forward, one launch (the decode loop's call): dispatch and
    combine take the in-line path (the general path is not entered), with the group's own step
    and with handles of its own, over several steps that take turns in the buffer slots, one
    step's halves enqueued apart (send_only, the hook; on the GPU an event recorded after); every
    result has the bits of a group made to take the general path, and a call the in-line path
    does not take (an int64 routing, a wrong shape) still gets the general path's result or error."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    r, e, k, h, b = 3, 12, 3, 32, 5
    shape = dict(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, algorithm=algorithm, layout=layout,
                 alignment=alignment, dtype="f32", device=device)
    fast, general = ep.VirtualGroup(**shape), ep.VirtualGroup(**shape)

    def refuse(*_):
        raise AssertionError("the common call entered the general path")

    fast._stacked_parts = refuse
    padded = layout == "expert_major_padded"   # its combine reads the slot's weights: the general path's
    if not padded:
        fast._combine_stacked = refuse
    general._dispatch_common = general._combine_common = lambda *_: None

    def tensor(array):
        return torch.from_numpy(array).to(device)

    own = [g.handle() for g in (fast, general)]
    for step in range(5):
        x = tensor(rng.standard_normal((r, b, h)).astype(np.float32))
        idx = tensor(np.stack([random_routing(rng, b, e, k) for _ in range(r)]).astype(np.int32))
        w = tensor(rng.random((r, b, k)).astype(np.float32))
        ys = tensor(rng.standard_normal((r,) + fast.recv_shape).astype(np.float32))
        seen = []
        overlap = step == 3   # the halves enqueued apart (send_only, then the hook), an event recorded after each
        for g, handle in zip((fast, general), own):
            out = g.dispatch(x, idx, w, handle=handle if step % 2 else None, send_only=overlap, record_event=overlap and GPU)
            if overlap:
                out.hook()
                assert (out.event is not None) == (device != "cpu")
            got = [bits(out.received), bits(out.expert_counts), bits(out.expert_source_counts)]
            if out.topk_idx is not None:
                got += [bits(t) for t in out.topk_idx] + [bits(t) for t in out.topk_weights]
            if overlap:
                combined, hook = g.combine(ys, out.handle, send_only=True)
                hook()
            else:
                combined = g.combine(ys, out.handle)
            got += [bits(c) for c in combined]
            seen.append(got)
        assert len(seen[0]) == len(seen[1])
        for i, (a, c) in enumerate(zip(seen[1], seen[0])):
            np.testing.assert_array_equal(c, a, err_msg=f"step {step}, result {i}")
    del fast._stacked_parts   # the general path again, for what the in-line path leaves to it
    out = fast.dispatch(x, idx.to(torch.int64), w)
    want = general.dispatch(x, idx, w)
    np.testing.assert_array_equal(bits(out.received), bits(want.received))
    with pytest.raises(ep.InvalidArgumentError, match="xs"):
        fast.dispatch(x[:, :, : h - 1], idx, w)
    for g in (fast, general):
        g.check()
        g.close()


def test_a_descriptor_is_written_again_after_a_stacked_array_rewrote_it():
    """Descriptors.set skips writing what it wrote last; set_all (a stacked array, also restored
    from a snapshot) rewrites every descriptor, after which set must write again."""
    from expert_parallel import _fast

    d = _fast.Descriptors(2, -1, _abi.F32, (4,))

    def seen(r):
        t = d.array[r]
        return (t.data or 0, t.sizes[0], t.dtype)

    d.set(0, 4096, 5, _abi.F32)
    assert seen(0) == (4096, 5, _abi.F32)
    for _ in range(2):   # the second time from its snapshot
        d.set_all(8192, 3, _abi.F32, 4)
        assert seen(0) == (8192, 3, _abi.F32) and seen(1) == (8192 + 3 * 4 * 4, 3, _abi.F32)
        d.set(0, 4096, 5, _abi.F32)
        assert seen(0) == (4096, 5, _abi.F32) and d.addresses[0] == 4096
    d.set(1, 0, 0, _abi.F32)
    assert seen(1) == (0, 0, _abi.F32)


@pytest.mark.parametrize("algorithm,layout,alignment", LAYOUTS)
def test_an_empty_stacked_step_takes_the_per_rank_calls(algorithm, layout, alignment):
    """B = 0: empty arrays have no address, which the stacked calls read as "not given"; the
    stacked arguments (and stacked out=) go through the per-rank calls instead."""
    torch = pytest.importorskip("torch")
    r, e, k, h = 2, 8, 2, 16
    group = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=4, algorithm=algorithm, layout=layout,
                            alignment=alignment, dtype="f32")
    x, idx, w = torch.zeros((r, 0, h)), torch.zeros((r, 0, k), dtype=torch.int32), torch.zeros((r, 0, k))
    out = group.dispatch(x, idx, w)
    assert [int(c.sum()) for c in out.expert_counts] == [0, 0]
    assert [tuple(t.shape) for t in group.combine(out.received, out.handle)] == [(0, h), (0, h)]
    routing = group.recv_routing_shape
    mine = (torch.zeros((r,) + tuple(group.recv_shape)), None if routing is None else torch.zeros((r,) + tuple(routing), dtype=torch.int32),
            None if routing is None else torch.zeros((r,) + tuple(routing)))
    out = group.dispatch(x, idx, w, out=mine)
    assert [tuple(t.shape) for t in group.combine(out.received, out.handle, out=torch.zeros((r, 0, h)))] == [(0, h), (0, h)]


def test_a_send_only_combine_keeps_the_tensors_its_receiving_half_reads():
    """The receiving half of a send-only combine (complete(), on the GPU) reads the expert outputs
    and the weights given to combine: the group keeps them alive until complete() has enqueued
    it, should the caller drop them first, and no longer."""
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    r, e, k, h, b = 2, 8, 2, 16, 3
    group = ep.VirtualGroup(ranks=r, experts=e, hidden=h, top_k=k, max_tokens=b, dtype="f32")
    idx = torch.from_numpy(np.stack([random_routing(rng, b, e, k) for _ in range(r)]).astype(np.int32))
    out = group.dispatch(torch.randn(r, b, h), idx, None)
    weights, outputs = torch.rand(r, b, k), out.received.clone()
    alive = [weakref.ref(weights), weakref.ref(outputs)]
    _, hook = group.combine(outputs, out.handle, topk_weights=weights, send_only=True)
    del weights, outputs
    gc.collect()
    assert all(ref() is not None for ref in alive)
    hook()
    gc.collect()
    assert all(ref() is None for ref in alive)
    # The dispatch's weights, which the combine applies when given none, as well.
    dispatched = torch.rand(r, b, k)
    alive = weakref.ref(dispatched)
    out = group.dispatch(torch.randn(r, b, h), idx, dispatched)
    _, hook = group.combine(out.received.clone(), out.handle, send_only=True)
    del dispatched, out
    gc.collect()
    assert alive() is not None
    hook()


@pytest.mark.parametrize("ranks, experts, hidden, max_tokens, received", [
    (64, 64, 1 << 26, 1 << 26, 1 << 20),        # 2^59 bytes a part, 64 parts: past 2^64
    (1, 4, (1 << 31) - 4, (1 << 31) - 1, 1 << 20),  # a receive shape whose product passes Int64
    (1, 4, (1 << 31) - 4, (1 << 31) - 1, 0),        # the same, its receivedTokens NULL
])
def test_a_stacked_call_of_a_group_too_large_for_memory_is_refused_by_name(ranks, experts, hidden, max_tokens, received):
    # The config bounds experts, hidden and maxTokensPerRank, not their product: such a group is
    # made (nothing is allocated for it), and its stacked call trapped (SIGILL) on the overflow.
    library = load()
    config = _abi.new(_abi.GroupConfig, algorithm=_abi.ALGORITHMS["ll"], layout=_abi.LAYOUTS["expert_major"], ranks=ranks,
                      experts=experts, topK=1, hidden=hidden, elementType=_abi.BF16, maxTokensPerRank=max_tokens)
    group = ctypes.c_void_p()
    assert library.epGroupCreate(ctypes.byref(config), None, ctypes.byref(group)) == _abi.SUCCESS
    try:
        call = _abi.new(_abi.StackedDispatch, tokens=0)
        call.inputTokens = _abi.Stacked(0, _abi.BF16, -1, 0)
        call.receivedTokens = _abi.Stacked(received, _abi.BF16, -1, 0)
        assert library.epGroupDispatchStacked(group, ctypes.byref(call), None) == _abi.INVALID_ARGUMENT
        message = library.epGetLastErrorMessage().decode()
        assert "call.receivedTokens" in message, message
    finally:
        library.epGroupDestroy(group)
