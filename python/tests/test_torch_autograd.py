"""expert_parallel.torch on the CPU backend: dispatch and combine as differentiable ops, checked
against a dense single-device MoE (torch_moe.py) in every layout: the values, and the gradients
of the tokens, the routing weights and the experts. float32: within 1e-5 (the sums run in
another order); bf16: within 2e-2 relative to the largest value (the group rounds every row and
partial sum to bf16, the reference works in float32)."""

import ctypes
import functools
import gc

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import expert_parallel as ep
from expert_parallel import _abi
from expert_parallel._library import call
from expert_parallel.torch import Exchange, _registry
from expert_parallel.torch._selections import ll_rows
from test_reliability import describe
from torch_moe import dense, over_group, routing

R, E, K, H, B = 4, 16, 3, 8, 5
LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]


def exchange(algorithm, layout, dtype="f32", zero_fill=True, **extra):
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype=dtype, algorithm=algorithm,
                            layout=layout, alignment=4 if layout == "expert_major_padded" else 1, **extra)
    return Exchange(group, zero_fill=zero_fill)


def run(fn, inputs, seed=2):
    """y = fn(x, idx, w, maps) and the gradients of x, w and maps for the loss sum(y * G)."""
    x, idx, w, maps = (t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    y = fn(x, idx, w, maps)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device=y.device, dtype=y.dtype)
    (y.float() * probe.float()).sum().backward()
    return y.detach().float(), x.grad.float(), w.grad.float(), maps.grad.float()


def assert_close(got, want, tolerance, what):
    names = ("combined", "grad x", "grad topk_weights", "grad experts")
    for name, a, b in zip(names, got, want):
        bound = tolerance * max(1.0, b.abs().max().item())
        error = (a - b).abs().max().item()
        assert error <= bound, f"{what}: {name} differs by {error} (bound {bound})"


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_values_and_gradients_equal_the_dense_reference_in_float32(algorithm, layout):
    ex = exchange(algorithm, layout)
    for seed in range(3):
        inputs = routing(seed, R, B, E, K, H)
        got = run(lambda *a: over_group(ex, *a), inputs)
        assert_close(got, run(dense, inputs), 1e-5, f"{layout} seed {seed}")
        assert got[2].abs().sum() > 0   # the weights' gradients reach the router


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_bf16_tokens_are_within_the_stated_tolerance(algorithm, layout):
    ex = exchange(algorithm, layout, dtype="bf16")
    inputs = routing(5, R, B, E, K, H, dtype=torch.bfloat16)
    reference = run(dense, tuple(t.float() if t.is_floating_point() else t for t in inputs))
    assert_close(run(lambda *a: over_group(ex, *a), inputs), reference, 2e-2, f"{layout} bf16")


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_ll_selection_rows_are_where_dispatch_puts_the_rows(layout):
    ex = exchange("ll", layout)
    x, idx, w, _ = routing(7, R, B, E, K, H)
    sent = ex.dispatch(x, idx, w)
    dest, row, valid = ll_rows(idx, R, E // R, B, layout)
    found = sent.tokens.reshape(R, -1, H)[dest, row]          # [R, B, K, H]
    expected = x.unsqueeze(2).expand(-1, -1, K, -1)
    assert valid.sum() > 0 and torch.equal(found[valid], expected[valid])


def test_two_steps_in_flight_then_both_backward_passes():
    """Two micro-batches through one exchange before any backward: each step keeps its routing."""
    ex = exchange("ht", "flat")
    first, second = routing(10, R, B, E, K, H), routing(11, R, B, E, K, H)
    leaves = [[t.clone().requires_grad_(t.is_floating_point()) for t in s] for s in (first, second)]
    ys = [over_group(ex, *args) for args in leaves]
    assert len(_registry.entry(ex.id).live) == 2
    (ys[0].sum() + 2 * ys[1].sum()).backward()
    for scale, inputs, args in zip((1, 2), (first, second), leaves):
        want = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        (scale * dense(*want).sum()).backward()
        for a, b in ((args[0], want[0]), (args[2], want[2]), (args[3], want[3])):
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_outputs_are_tensors_of_their_own():
    """Later dispatches (which reuse the group's buffer slots) leave earlier outputs intact."""
    ex = exchange("ll", "expert_major", buffer_slots=1)
    x, idx, w, _ = routing(12, R, B, E, K, H)
    sent = ex.dispatch(x, idx, w)
    kept = sent.tokens.clone()
    ex.group.dispatch(x * 3, idx, w)          # the group's own slot
    ex.dispatch(x * 5, idx, w)
    assert torch.equal(sent.tokens, kept) and kept.abs().sum() > 0


def test_a_step_returns_its_handle_to_the_pool_when_its_token_is_freed():
    ex = exchange("ht", "expert_major_padded")
    entry = _registry.entry(ex.id)
    inputs = routing(13, R, B, E, K, H)
    for _ in range(5):
        run(lambda *a: over_group(ex, *a), inputs)
        gc.collect()
        assert not entry.live and len(entry.free) == 1   # one handle, reused by every step
    sent = ex.dispatch(*inputs[:3])
    assert list(entry.live) == [int(sent.step)]
    del sent
    gc.collect()
    assert not entry.live


def _save_the_dispatch(ctx, op, *args, **kwargs):
    """A selective checkpointing policy that keeps the dispatch op's outputs (as one keeps the
    exchanges rather than run them again) and recomputes the rest."""
    if op is torch.ops.expert_parallel.dispatch.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_a_step_saved_as_a_copy_of_its_token_stays_live_for_the_backward_pass(algorithm, layout):
    """Saved-tensor hooks that save a copy (save_on_cpu(pin_memory=True), a pair that clones) and
    selective checkpointing that saves the dispatch op (its cache holds a detached copy): the
    graph keeps the step live, though the token the dispatch op returned is gone and another step
    ran since; then the step ends with the graph."""
    ex = exchange(algorithm, layout)
    inputs = routing(19, R, B, E, K, H)
    want = run(dense, inputs)

    def copied(*args):
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
            y = over_group(ex, *args)
        gc.collect()
        ex.dispatch(*inputs[:3])   # a step between forward and backward: takes any free handle
        return y

    context = functools.partial(create_selective_checkpoint_contexts, _save_the_dispatch)
    checkpointed = lambda *args: checkpoint(over_group, ex, *args, use_reentrant=False, context_fn=context)  # noqa: E731
    for name, fn in (("selective checkpointing", checkpointed), ("copying hooks", copied)):
        assert_close(run(fn, inputs), want, 1e-5, f"{layout} {name}")
    gc.collect()
    assert not _registry.entry(ex.id).live
    sent = ex.dispatch(*inputs[:3])
    copy = sent.step.clone()
    del sent
    gc.collect()   # a copy alone keeps nothing live: named, whatever step runs next
    ex.dispatch(*inputs[:3])
    with pytest.raises(ep.InvalidUsageError, match=f"step: token {int(copy)} names no live step"):
        torch.ops.expert_parallel.backward_dispatch(torch.zeros(R, B, H), copy, ex.id)


def test_wrong_arguments_are_named():
    ex = exchange("ll", "expert_major")
    x, idx, w, _ = routing(14, R, B, E, K, H)
    sent = ex.dispatch(x, idx, w)
    ops = torch.ops.expert_parallel
    with pytest.raises(ep.InvalidUsageError, match="step: token 999999 names no live step"):
        ops.combine(sent.tokens, idx, w, torch.tensor(999999), ex.id)
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: None; the combine of LL expert-major"):
        ops.combine(sent.tokens, idx, None, sent.step, ex.id)
    with pytest.raises(ep.InvalidArgumentError, match=r"topk_weights: shape \[4, 5, 2\]"):
        ops.combine(sent.tokens, idx, w[..., :2].contiguous(), sent.step, ex.id)
    other = exchange("ll", "expert_major")
    theirs = other.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidUsageError, match=f"step: token {int(theirs.step)} is a step of exchange {other.id} "):
        ops.combine(theirs.tokens, idx, w, theirs.step, ex.id)   # another group's step: its exchange named
    beside = Exchange(ex.group)   # another exchange on the same group
    mine = beside.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidUsageError, match=rf"step: token {int(mine.step)} is a step of exchange {beside.id} .*not of "
                                                   rf"exchange {ex.id}; pass the Dispatched to the combine of the exchange"):
        ex.combine(mine.tokens, mine)
    assert torch.equal(beside.combine(mine.tokens, mine), ex.combine(*(lambda d: (d.tokens, d))(ex.dispatch(x, idx, w))))
    with pytest.raises(ep.InvalidArgumentError, match="group: id 424242 is not registered"):
        ops.dispatch(x, idx, w, 424242)
    with pytest.raises(ep.InvalidArgumentError, match=rf"^x: shape \[4, 5, 9\]; must be \[4, B, {H}\]$"):
        ex.dispatch(torch.zeros(R, B, H + 1), idx, w)
    flat = exchange("ht", "flat")
    sent = flat.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match="weights: given; layout 'flat'"):
        ops.combine(sent.tokens, idx, w, sent.step, flat.id)
    with pytest.raises(ep.InvalidArgumentError, match="group.dtype='u8'"):
        Exchange(ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="u8"))
    with pytest.raises(ep.InvalidArgumentError, match="group: a str"):
        Exchange("group")
    # Not tensors at all (None reached the ops' code as an AttributeError, the rest the
    # dispatcher's RuntimeError): named by the exchange.
    with pytest.raises(ep.InvalidArgumentError, match=r"^topk_weights: a NoneType; must be a torch.Tensor \[R, B, top_k\] float32"):
        flat.dispatch(x, idx, None)
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: a list; must be a torch.Tensor \[R, B, hidden\]"):
        flat.dispatch(list(x), idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=r"^expert_outputs: a NoneType; must be a torch.Tensor"):
        flat.combine(None, sent)
    with pytest.raises(ep.InvalidArgumentError, match=r"^dispatched: a tuple; must be what this exchange's dispatch returned"):
        flat.combine(sent.tokens, tuple(sent))
    del sent
    flat.close()
    with pytest.raises(ep.InvalidArgumentError, match="is not registered"):
        flat.dispatch(x, idx, w)


def test_a_closed_exchange_runs_its_live_steps_backward_passes_and_starts_no_new_step():
    """``with Exchange(group) as ex:`` the forward, the backward pass after the block; then the
    exchange is forgotten, its handles released."""
    inputs = routing(20, R, B, E, K, H)
    closed = []

    def forward_in_a_with_block(*args):
        with exchange("ht", "expert_major_padded") as ex:
            y = over_group(ex, *args)
        with pytest.raises(ep.InvalidUsageError, match=f"group: exchange {ex.id} is closed"):
            ex.dispatch(*args[:3])
        closed.append(ex)
        return y

    assert_close(run(forward_in_a_with_block, inputs), run(dense, inputs), 1e-5, "backward after close")
    gc.collect()
    with pytest.raises(ep.InvalidArgumentError, match=f"group: id {closed[0].id} is not registered"):
        closed[0].dispatch(*inputs[:3])


def test_a_masked_rank_is_refused_by_name_until_cleaned():
    """A masked rank changes the rows LL's gradients are computed from and leaves its own outputs
    unwritten: the ops refuse it, deactivated or masked by a timeout, at dispatch and in a live
    step's later calls; once cleaned they run as before."""
    ex = exchange("ll", "expert_major", timeout=0.2)
    inputs = routing(21, R, B, E, K, H)
    refused = (r"^group: rank\(s\) \[1\] masked inactive; the torch ops need every rank active .*: "
               r"group.clean\(\) them, then dispatch again \(a step live when the mask changed cannot be combined\)$")
    sent = ex.dispatch(*inputs[:3])
    ex.group.deactivate(1)
    with pytest.raises(ep.InactiveRankError, match=refused):
        ex.combine(sent.tokens, sent)
    with pytest.raises(ep.InactiveRankError, match=refused):
        ex.dispatch(*inputs[:3])
    ex.group.clean()
    # The message's remedy is the one that works: the step live when the mask changed stays void.
    with pytest.raises(ep.InvalidUsageError, match=r"clean\(\) was called since this handle's update"):
        ex.combine(sent.tokens, sent)
    ex.dispatch(*inputs[:3])
    # Rank 0's own call, the others never coming: the timeout masks them.
    routed = inputs[1][0].to(torch.int32).numpy()
    handle, idx = ctypes.c_void_p(), describe(routed)
    call("epHandleCreate", ex.group._group, 0, ctypes.byref(handle))
    with pytest.raises(ep.RankTimeoutError):
        call("epHandleUpdate", handle, ctypes.byref(_abi.new(_abi.UpdateInputs, topkIdx=ctypes.pointer(idx))), None, None)
    call("epHandleDestroy", handle)
    with pytest.raises(ep.InactiveRankError, match=r"^group: rank\(s\) \[1, 2, 3\] masked inactive"):
        ex.dispatch(*inputs[:3])
    ex.group.clean()
    assert_close(run(lambda *a: over_group(ex, *a), inputs), run(dense, inputs), 1e-5, "cleaned")


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_dispatch_gives_the_rows_per_local_expert(algorithm, layout):
    """Dispatched.expert_counts: the [R, L] int32 counts the group's own dispatch writes."""
    ex = exchange(algorithm, layout)
    x, idx, w, _ = routing(16, R, B, E, K, H)
    sent = ex.dispatch(x, idx, w)
    plain = exchange(algorithm, layout).group
    want = plain.dispatch(x, idx, w).expert_counts
    assert sent.expert_counts.dtype == torch.int32 and sent.expert_counts.shape == (R, E // R)
    assert torch.equal(sent.expert_counts, torch.as_tensor(want)) and int(sent.expert_counts.sum()) > 0
    assert [list(map(int, row)) for row in sent.expert_counts] == [info.expert_counters for info in plain.dispatch(x, idx, w).layout]
    if layout == "expert_major_padded":   # padding excluded: zone l starts at the earlier counts rounded up to alignment
        for r, counts in enumerate(sent.expert_counts.tolist()):
            ids = [i for local, n in enumerate(counts) for i in [local] * n + [-1] * (-n % ex.group.alignment)]
            assert sent.topk_idx[r, :len(ids)].reshape(-1).tolist() == ids and any(n % ex.group.alignment for n in counts)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_gradcheck_passes_in_float32_and_autocast_casts_nothing(algorithm, layout):
    """What docs/torch.md says of dtypes: float64 is refused, so gradcheck runs in float32 with a
    larger step and loose tolerances; the ops ignore autocast (their inputs are not cast)."""
    ex = exchange(algorithm, layout)
    x, idx, w, maps = routing(22, R, 2, E, K, H)
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: dtype torch.float64; must be torch.float32$"):
        ex.dispatch(x.double(), idx, w)

    def fn(x, w):
        return over_group(ex, x, idx, w, maps)

    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()), eps=1e-3, atol=1e-2, rtol=1e-2,
                                            fast_mode=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, w).dtype == torch.float32
        with pytest.raises(ep.InvalidArgumentError, match=r"^x: dtype torch.bfloat16; must be torch.float32$"):
            ex.dispatch(torch.nn.functional.linear(x, maps[0]), idx, w)


def test_without_zero_fill_experts_that_read_the_counted_rows_get_the_same_results_and_gradients(monkeypatch):
    """zero_fill=False leaves the rows outside the received zones unspecified: experts that read
    only the rows expert_counts names (here masked by them) give what they give with the fill."""
    x, idx, w, maps = routing(17, R, B, E, K, H)

    def counted(exchange):
        def fn(x, idx, w, maps):
            sent = exchange.dispatch(x, idx, w)
            rows = sent.tokens                                                 # [R, L, R*B, H]
            inside = torch.arange(rows.shape[2]) < sent.expert_counts.unsqueeze(-1)
            rows = torch.where(inside.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype))
            out = torch.einsum("rlnh,rlhk->rlnk", rows, maps.reshape(R, E // R, H, H))
            return exchange.combine(torch.where(inside.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype)), sent)
        return fn

    filled = run(counted(exchange("ll", "expert_major")), (x, idx, w, maps))
    garbage = torch.full((1 << 20,), float("nan"))   # freed: the next empty tensors may reuse its memory
    del garbage
    unfilled_exchange = exchange("ll", "expert_major", zero_fill=False)
    assert not unfilled_exchange.zero_fill
    unfilled = run(counted(unfilled_exchange), (x, idx, w, maps))
    for name, a, b in zip(("combined", "grad x", "grad topk_weights", "grad experts"), unfilled, filled):
        assert torch.equal(a, b), name
    with pytest.raises(ep.InvalidArgumentError, match="zero_fill='no' .*must be a bool"):
        Exchange(unfilled_exchange.group, zero_fill="no")
    # The fill is the only zeros the dispatch makes (of the receive buffer's shape): torch.zeros, or
    # new_zeros of the rows (the ops make their outputs so).
    zeros, new_zeros, shapes = torch.zeros, torch.Tensor.new_zeros, []
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: shapes.append(tuple(a[0] if a else k["size"])) or zeros(*a, **k))
    monkeypatch.setattr(torch.Tensor, "new_zeros",
                        lambda self, *a, **k: shapes.append(tuple(a[0] if a else k["size"])) or new_zeros(self, *a, **k))
    for fill, ex in ((True, exchange("ll", "expert_major")), (False, unfilled_exchange)):
        shapes.clear()
        ex.dispatch(x, idx, w)
        assert ((R,) + tuple(ex.group.recv_shape) in shapes) == fill, shapes


def test_the_ops_pass_torch_library_opcheck():
    """Schemas, fake implementations and autograd registration. The dispatch op's outputs are
    compared with AOT tracing by the compile tests instead (each call's step token differs)."""
    ex = exchange("ht", "expert_major_padded")
    x, idx, w, _ = routing(15, R, B, E, K, H)
    x.requires_grad_()
    w.requires_grad_()
    ops = torch.ops.expert_parallel
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    assert set(torch.library.opcheck(ops.dispatch, (x, idx, w, ex.id), test_utils=checks).values()) == {"SUCCESS"}
    sent = ex.dispatch(x.detach(), idx, w.detach())
    args = (sent.tokens.clone().requires_grad_(), idx, sent.topk_weights.clone().requires_grad_(), sent.step, ex.id)
    assert set(torch.library.opcheck(ops.combine, args).values()) == {"SUCCESS"}
    grads = torch.randn(R, B, H)
    assert set(torch.library.opcheck(ops.backward_dispatch, (grads, sent.step, ex.id)).values()) == {"SUCCESS"}
    rows = torch.randn(sent.tokens.shape)
    weights = torch.randn(sent.topk_weights.shape)
    result = torch.library.opcheck(ops.backward_combine, (rows, weights, sent.step, ex.id, B))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_rows_are_the_float32_products_rounded_once(dtype):
    from expert_parallel.torch._autograd import _scaled

    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(3, 2, 40, 16, generator=generator).to(dtype)
    weights = torch.rand(3, 2, 40, 1, generator=generator) * 3
    got = _scaled(rows, weights)
    want = (rows.float() * weights).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_an_empty_batch_runs_forward_and_backward(algorithm, layout):
    # Empty tensors have no address, which the stacked calls read as "not given": they take the per-rank calls.
    ex = exchange(algorithm, layout)
    x = torch.zeros((R, 0, H), requires_grad=True)
    w = torch.zeros((R, 0, K), requires_grad=True)
    sent = ex.dispatch(x, torch.zeros((R, 0, K), dtype=torch.int64), w)
    y = ex.combine(sent.tokens * 2, sent)
    y.sum().backward()
    assert y.shape == (R, 0, H) and x.grad.shape == (R, 0, H) and int(sent.expert_counts.sum()) == 0


@pytest.mark.parametrize("algorithm,layout", [("ll", "expert_major"), ("ht", "expert_major_padded")])
def test_gradients_of_gradients_through_weighted_combines(algorithm, layout):
    # create_graph=True records the scaling of the rows' gradients (no out= product there).
    ex = exchange(algorithm, layout)
    x, idx, w, _ = routing(18, R, B, E, K, H)
    x.requires_grad_()
    w.requires_grad_()
    sent = ex.dispatch(x, idx, w)
    y = ex.combine(sent.tokens * 2, sent)
    gx, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    assert gx.requires_grad and gx.shape == x.shape


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_refused_by_name(transform):
    """torch.func's transforms cannot run the ops (torch.library's autograd of a Python op has no
    functorch rule): a named error saying to use torch.autograd, not torch's own about an
    autograd.Function's setup_context; autograd itself still runs after."""
    ex = exchange("ht", "flat")
    x, idx, w = routing(31, R, B, E, K, H)[:3]

    def loss(x):
        sent = ex.dispatch(x, idx, w)
        return ex.combine(sent.tokens * 2, sent).sum()

    run = torch.func.grad(loss) if transform == "grad" else torch.vmap(loss)
    with pytest.raises(ep.InvalidUsageError, match=r"^the torch ops do not run under torch\.func transforms .*use torch\.autograd"):
        run(x if transform == "grad" else x[None])
    x = x.clone().requires_grad_()
    loss(x).backward()
    # HT combine sums a token's row once from each rank its selections reach: 2 per such rank.
    ranks = [[len({int(e) // (E // R) for e in row if e >= 0}) for row in rank] for rank in idx]
    assert torch.equal(x.grad, 2.0 * torch.tensor(ranks, dtype=torch.float32)[..., None].expand_as(x))


@pytest.mark.parametrize("algorithm,layout", [("ll", "rank_major"), ("ht", "flat"), ("ll", "expert_major")])
@pytest.mark.parametrize("compiled", [False, True])
def test_combine_keeps_no_expert_outputs_its_backward_never_reads(algorithm, layout, compiled):
    """A combine that sums rows (rank-major, flat; LL expert-major whose weights need no gradient)
    never reads the expert outputs in its backward, yet the eager op saved them: the largest
    activation stayed alive until the backward, and reusing its buffer after combine made the
    backward raise ("modified by an inplace operation"), which the compiled graph did not."""
    import weakref

    from torch_moe import routing

    torch._dynamo.reset()
    ex = exchange(algorithm, layout)
    x, idx, w, _ = routing(1, R, B, E, K, H)

    def f(x):
        sent = ex.dispatch(x, idx, w)
        out = sent.tokens * 2
        return ex.combine(out, sent), out

    fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    xl = x.clone().requires_grad_()
    y, out = fn(xl)
    with torch.no_grad():
        out.zero_()   # (the experts' output buffer, reused)
    kept = weakref.ref(out)
    del out
    gc.collect()
    assert kept() is None
    y.sum().backward()
    xr = x.clone().requires_grad_()
    f(xr)[0].sum().backward()
    assert torch.equal(xl.grad, xr.grad)
