"""Tensors whose memory is not their values, on the CPU backend: the package takes tensors'
addresses, and the library reads and writes the memory there.

- a negative view (``torch._neg_view(t)``, the ``.imag`` of a conjugate view: ``is_neg()``) holds
  its values negated, which torch undoes as it reads them: the groups' calls read the memory as it
  is, so they gave the negated rows, silently. An input is now refused by name (the group) or
  resolved, a copy, as torch's dispatcher resolves one given to an op (Exchange's eager calls,
  which skip the dispatcher); an output (``out=``) is refused;
- a conjugate view (``is_conj()``) is complex, which no group takes: refused by its dtype;
- a tensor whose storage was shrunk since it was made (``untyped_storage().resize_()``) was read
  and written past its storage's end: now refused by name, its bytes and the storage's.
"""

import re

import numpy as np
import pytest
import torch

import expert_parallel as ep
from expert_parallel.torch import Exchange
from test_hazards_session31 import group   # the small CPU group (f32, R 2, E 4, H 8, K 2, B 3)
from test_nccl_group_calls import recorded  # noqa: F401  (the NCCL rank over CPU tensors, a fixture)

NEGATIVE = r"a negative view \(is_neg\(\) is True\); must be False: "
READ = NEGATIVE + r"its memory holds the values negated, which the library would read as they are: pass \.resolve_neg\(\)$"
WRITTEN = NEGATIVE + r"the call writes its memory, which the tensor reads negated: pass a tensor of its own$"


def step():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8) + 1
    idx = torch.tensor([[[0, 1], [2, 3], [1, -1]], [[3, 2], [0, -1], [1, 2]]], dtype=torch.int32)
    w = torch.tensor([[[0.5, 0.25]] * 3] * 2)
    return x, idx, w


def negated(t):
    """A negative view with `t`'s values: its memory holds -t."""
    view = torch._neg_view(-t)
    assert view.is_neg() and torch.equal(view, t)
    return view


def shrunk(t, size=0):
    """`t` with its storage shrunk to `size` bytes (a copy's: `t` itself is left as it is)."""
    t = t.clone()
    t.untyped_storage().resize_(size)
    return t


def storage(name, held, needed):
    return rf"^{re.escape(name)}: storage of {held} bytes; must hold the {needed} bytes its elements reach \(storage_offset\(\) "


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("stacked", [True, False])
def test_a_negative_view_given_to_dispatch_is_refused_by_name(algorithm, which, stacked):
    g = group(algorithm=algorithm)
    arguments = list(step())
    arguments[which] = negated(arguments[which])
    name = ("xs", "topk_idx", "topk_weights")[which]
    if not stacked:
        arguments = [list(a.unbind(0)) for a in arguments]
        name += "[0]"
    with pytest.raises(ep.InvalidArgumentError, match=f"^{re.escape(name)}: " + READ):
        g.dispatch(*arguments)


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_negative_view_given_to_combine_is_refused_and_a_resolved_one_combines(algorithm):
    g = group(algorithm=algorithm)
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    rows = torch.stack(out.tokens).clone()
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + READ):
        g.combine(negated(rows), out.handle)
    combined = torch.stack(g.combine(negated(rows).resolve_neg(), out.handle))
    assert torch.equal(combined, torch.stack(g.combine(rows, out.handle)))
    assert combined.abs().sum() > 0


def test_a_negative_view_as_out_is_refused_and_left_as_it_was():
    g = group(algorithm="ht")
    x, idx, w = step()
    received = torch.zeros((2,) + tuple(g.recv_shape))
    routing = torch.zeros((2,) + tuple(g.recv_routing_shape), dtype=torch.int32), torch.zeros((2,) + tuple(g.recv_routing_shape))
    target = torch._neg_view(received)
    with pytest.raises(ep.InvalidArgumentError, match="^out tokens: " + WRITTEN):
        g.dispatch(x, idx, w, out=(target,) + routing)
    out = g.dispatch(x, idx, w, out=(received,) + routing)
    combined = torch.zeros(2, 3, 8)
    with pytest.raises(ep.InvalidArgumentError, match="^out: " + WRITTEN):
        g.combine(received, out.handle, out=torch._neg_view(combined))
    with pytest.raises(ep.InvalidArgumentError, match=r"^out\[0\]: " + WRITTEN):
        g.combine(received, out.handle, out=[torch._neg_view(c) for c in combined])
    assert not combined.any()


def test_a_conjugate_view_is_complex_and_refused_by_its_dtype_and_its_imag_taken_as_its_values():
    """A conjugate view's ``.imag`` is a negative view with a stride of 2 (the real parts between):
    a group refuses it as not contiguous, and the ops take its values (-x here), as torch reads them."""
    g = group()
    x, idx, w = step()
    c = torch.complex(x, x)
    with pytest.raises(ep.InvalidArgumentError, match=r"^xs: dtype torch.complex64; must be "):
        g.dispatch(c.conj(), idx, w)
    imag = c.conj().imag
    assert imag.is_neg() and torch.equal(imag, -x)
    with pytest.raises(ep.InvalidArgumentError, match=r"^xs: not contiguous"):
        g.dispatch(imag, idx, w)
    exchange = Exchange(group(algorithm="ht"))
    with pytest.raises(ep.InvalidArgumentError, match=r"^x: dtype torch.complex64; must be "):
        exchange.dispatch(c.conj(), idx, w)
    assert torch.equal(exchange.dispatch(imag, idx, w).tokens, exchange.dispatch(-x, idx, w).tokens)


@pytest.mark.parametrize("size", [0, 8, 191])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_shrunk_storage_given_to_dispatch_is_refused_with_its_bytes(size, which):
    g = group()
    arguments = list(step())
    needed = arguments[which].nbytes
    arguments[which] = shrunk(arguments[which], min(size, needed - 1))
    name = ("xs", "topk_idx", "topk_weights")[which]
    with pytest.raises(ep.InvalidArgumentError, match=storage(name, min(size, needed - 1), needed)):
        g.dispatch(*arguments)
    # A view of the rest of a storage reaches its offset's bytes too: one element short is named.
    whole = step()[which].reshape(-1)
    base = torch.cat([whole[:1], whole])
    view = base[1:].view(step()[which].shape)
    base.untyped_storage().resize_(base.nbytes - base.element_size())
    arguments[which] = view
    with pytest.raises(ep.InvalidArgumentError, match=storage(name, base.nbytes - base.element_size(), base.nbytes)):
        g.dispatch(*arguments)


def test_a_shrunk_storage_given_to_combine_or_as_out_is_refused():
    g = group(algorithm="ht")
    x, idx, w = step()
    out = g.dispatch(x, idx, w)
    rows = torch.stack(out.tokens).clone()
    with pytest.raises(ep.InvalidArgumentError, match=storage("expert_outputs", 16, rows.nbytes)):
        g.combine(shrunk(rows, 16), out.handle)
    with pytest.raises(ep.InvalidArgumentError, match=storage("out", 0, 2 * 3 * 8 * 4)):
        g.combine(rows, out.handle, out=shrunk(torch.zeros(2, 3, 8)))
    assert torch.stack(g.combine(rows, out.handle)).abs().sum() > 0   # (the step is still live)


# -- the torch ops -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")])
@pytest.mark.parametrize("grad", [False, True])
def test_the_ops_resolve_negative_views_as_the_dispatcher_does(layout, grad):
    """Exchange's eager calls (no dispatcher) gave a negative view's memory, the rows negated; the
    same call through torch.ops.expert_parallel.dispatch, whose dispatcher resolves it, did not."""
    algorithm, arrangement = layout
    exchange = Exchange(group(algorithm=algorithm, layout=arrangement))
    x, idx, w = step()

    def run(x, idx, w):
        x, w = x.detach().requires_grad_(grad), w.detach().requires_grad_(grad)
        sent = exchange.dispatch(negated(x) if run.negate else x, negated(idx) if run.negate else idx,
                                 negated(w) if run.negate else w)
        rows = sent.tokens * 2 if arrangement in ("expert_major", "expert_major_padded") else sent.tokens
        combined = exchange.combine(negated(rows) if run.negate else rows, sent)
        if grad:
            combined.square().sum().backward()
            return sent.tokens, combined, x.grad, w.grad
        return sent.tokens, combined

    run.negate = False
    plain = run(x, idx, w)
    run.negate = True
    negative = run(x, idx, w)
    assert plain[1].abs().sum() > 0
    for a, b in zip(plain, negative):
        assert (a is None and b is None) or torch.equal(a, b)


def test_the_ops_refuse_a_shrunk_storage_by_name():
    exchange = Exchange(group(algorithm="ht"))
    x, idx, w = step()
    for which, name in enumerate(("x", "topk_idx", "topk_weights")):
        arguments = list(step())
        arguments[which] = shrunk(arguments[which], 4)
        with pytest.raises(ep.InvalidArgumentError, match=storage(name, 4, step()[which].nbytes)):
            exchange.dispatch(*arguments)
        with pytest.raises(ep.InvalidArgumentError, match=storage(name, 4, step()[which].nbytes)):   # through the dispatcher
            torch.ops.expert_parallel.dispatch(*arguments, exchange.id)
    sent = exchange.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=storage("expert_outputs", 0, sent.tokens.nbytes)):
        exchange.combine(shrunk(sent.tokens), sent)
    assert exchange.combine(sent.tokens, sent).abs().sum() > 0


def test_the_ops_refuse_a_shrunk_non_contiguous_input_before_copying_it():
    """A transposed input is copied (contiguous()), which would read past a shrunk storage: refused first."""
    exchange = Exchange(group(algorithm="ht"))
    x, idx, w = step()
    t = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not t.is_contiguous() and torch.equal(t, x)
    t.untyped_storage().resize_(64)
    with pytest.raises(ep.InvalidArgumentError, match=storage("x", 64, x.nbytes)):
        exchange.dispatch(t, idx, w)


# -- an NCCL rank (over CPU tensors) ------------------------------------------------------------


def test_an_nccl_rank_refuses_negative_views_and_shrunk_storages(recorded):  # noqa: F811
    g, calls = recorded(layout="rank_major", dtype="f32")
    x, idx, w = torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)
    for arguments, name, pattern in [((negated(x), idx, w), "x", READ), ((x, negated(idx), w), "topk_idx", READ),
                                     ((x, idx, negated(w)), "topk_weights", READ)]:
        calls.clear()
        with pytest.raises(ep.InvalidArgumentError, match=f"^{name}: " + pattern):
            g.dispatch(*arguments)
        assert not calls
    with pytest.raises(ep.InvalidArgumentError, match=storage("x", 0, x.nbytes)):
        g.dispatch(shrunk(x), idx, w)
    out = g.dispatch(x, idx, w)
    rows = out.tokens.clone()
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + READ):
        g.combine(negated(rows), out.handle)
    with pytest.raises(ep.InvalidArgumentError, match="^out: " + WRITTEN):
        g.combine(rows, out.handle, out=torch._neg_view(torch.zeros(3, g.hidden)))
    with pytest.raises(ep.InvalidArgumentError, match=storage("out", 0, 3 * g.hidden * 4)):
        g.combine(rows, out.handle, out=shrunk(torch.zeros(3, g.hidden)))


# -- what a step keeps and its combine reads again ------------------------------------------------


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("given", ["step", "handle", "out"])
def test_the_dispatchs_weights_shrunk_before_ll_expert_majors_combine_are_refused(stacked, given):
    """LL expert-major's combine applies the topk_weights given to dispatch, which the step keeps
    and the library reads again by address: a storage shrunk between the two was read freed
    (garbage rows, silently), where an NCCL rank's combine names it."""
    g = group(algorithm="ll")
    x, idx, w = step()
    ref = torch.stack(list(g.combine(torch.ones((2,) + tuple(g.recv_shape)), g.dispatch(x, idx, w).handle)))
    weights = w.clone()
    arguments = (x, idx, weights) if stacked else (list(x), list(idx), list(weights))
    options = {"handle": g.handle()} if given == "handle" else {}
    if given == "out":
        options["out"] = (torch.zeros((2,) + tuple(g.recv_shape)), None, None)
    out = g.dispatch(*arguments, **options)
    rows = torch.ones((2,) + tuple(g.recv_shape))
    weights.untyped_storage().resize_(0)
    name = "topk_weights" if stacked else "topk_weights[0]"
    with pytest.raises(ep.InvalidArgumentError, match=storage(name, 0, w.nbytes if stacked else w[0].nbytes)):
        g.combine(rows, out.handle)
    weights.untyped_storage().resize_(w.nbytes)
    weights.copy_(w)
    assert torch.equal(torch.stack(list(g.combine(rows, out.handle))), ref)   # (the step is still live)


def test_the_dispatchs_weights_shrunk_before_the_ops_fresh_combine_are_refused():
    """The torch ops' fresh combine (`VirtualGroup._combine_fresh`) without weights of its own
    reads the dispatch's again, as combine() does: where they are now, named when shrunk."""
    g = group(algorithm="ll")
    x, idx, w = step()
    weights = w.clone()
    out = g.dispatch(x, idx, weights)
    rows = torch.ones((2,) + tuple(g.recv_shape))
    ref = torch.stack(list(g.combine(rows, out.handle)))
    weights.untyped_storage().resize_(0)
    with pytest.raises(ep.InvalidArgumentError, match=storage("topk_weights", 0, w.nbytes)):
        g._combine_fresh(rows, out.handle, torch.zeros(ref.shape))
    weights.untyped_storage().resize_(w.nbytes)   # (grown again: elsewhere in memory)
    weights.copy_(w)
    combined = torch.zeros(ref.shape)
    g._combine_fresh(rows, out.handle, combined)
    assert torch.equal(combined, ref)


def test_the_per_slot_weights_received_into_out_and_shrunk_before_combine_are_refused():
    """HT expert-major's combine applies the per-slot weights its dispatch received: into the
    caller's ``out=``, they are read again there by address."""
    g = group(algorithm="ht", layout="expert_major_padded")
    x, idx, w = step()
    routing = (2,) + tuple(g.recv_routing_shape)
    received = torch.zeros((2,) + tuple(g.recv_shape)), torch.zeros(routing, dtype=torch.int32), torch.zeros(routing)
    out = g.dispatch(x, idx, w, out=received)
    kept = received[2].clone()
    received[2].untyped_storage().resize_(16)
    for combined in (None, torch.zeros(2, 3, 8)):   # (per rank; into one stacked out=, one C call)
        with pytest.raises(ep.InvalidArgumentError, match=storage("topk_weights", 16, kept.nbytes)):
            g.combine(received[0], out.handle, out=combined)
    received[2].untyped_storage().resize_(kept.nbytes)
    received[2].copy_(kept)
    combined = torch.zeros(2, 3, 8)
    g.combine(received[0], out.handle, out=combined)
    assert torch.equal(combined, torch.stack(list(g.combine(received[0], out.handle)))) and combined.abs().sum() > 0


# -- torch.func wrappers (no memory of their own) -------------------------------------------------


def leaked(t):
    """A torch.func wrapper of `t` left over from a finished transform (a dead one): torch's ops
    read it as `t`, its data_ptr() raises ("Cannot access data pointer")."""
    kept = []
    torch.func.grad(lambda u: (kept.append(u), u.sum())[1])(t)
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
    return kept[0]


WRAPPER = r"a torch.func wrapper \(a tensor of grad, vmap, jacrev, functionalize, \.\.\., or one left over from a finished transform\)"


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_group_refuses_a_torch_func_wrapper_by_name(algorithm):
    """The groups' stacked calls raised torch's RuntimeError ("Cannot access data pointer of Tensor
    that doesn't have storage") for a torch.func wrapper, live (inside grad or vmap) or dead; they
    now name the argument. A dead one's .detach() is its tensor, which they take."""
    g = group(algorithm=algorithm)
    x, idx, w = step()
    for which, name in ((0, "xs"), (2, "topk_weights")):
        arguments = list(step())
        arguments[which] = leaked(arguments[which])
        with pytest.raises(ep.InvalidArgumentError, match=f"^{name}: " + WRAPPER):
            g.dispatch(*arguments)
    with pytest.raises(ep.InvalidArgumentError, match="^xs: " + WRAPPER):
        torch.func.grad(lambda t: g.dispatch(t, idx, w).tokens[0].sum())(x)
    out = g.dispatch(leaked(x).detach(), idx, w)
    rows = torch.stack(out.tokens).clone()
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + WRAPPER):
        g.combine(leaked(rows), out.handle)
    target = torch.zeros(2, 3, 8)
    with pytest.raises(ep.InvalidArgumentError, match="^out: " + WRAPPER):
        g.combine(rows, out.handle, out=leaked(target))
    assert not target.any()
    combined = torch.stack(g.combine(rows, out.handle))
    assert combined.abs().sum() > 0 and torch.equal(combined, torch.stack(g.combine(leaked(rows).detach(), out.handle)))


def nccl_rank_names(recorded, made, pattern, arguments):  # noqa: F811
    """An NCCL rank (over CPU tensors) given `made(t)` in place of each of `arguments` (indices of
    x, topk_idx, topk_weights) and of the expert outputs: each refused, `pattern` naming it, and
    nothing called. Returns the group, its expert outputs and the dispatch's handle."""
    g, calls = recorded(layout="rank_major", dtype="f32")
    step = [torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)]
    for which in arguments:
        given = list(step)
        given[which] = made(given[which])
        calls.clear()
        with pytest.raises(ep.InvalidArgumentError, match=f"^{('x', 'topk_idx', 'topk_weights')[which]}: " + pattern):
            g.dispatch(*given)
        assert not calls
    out = g.dispatch(*step)
    rows = out.tokens.clone()
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + pattern):
        g.combine(made(rows), out.handle)
    return g, rows, out.handle


def test_an_nccl_rank_refuses_a_torch_func_wrapper_by_name(recorded):  # noqa: F811
    g, rows, handle = nccl_rank_names(recorded, leaked, WRAPPER, (0, 2))
    with pytest.raises(ep.InvalidArgumentError, match="^out: " + WRAPPER):
        g.combine(rows, handle, out=leaked(torch.zeros(3, g.hidden)))


ZERO = r"a zero tensor \(torch._efficientzerotensor\) with no memory of its own \(data_ptr\(\) is 0\); "


def zero_tensor(t):
    """A zero tensor of `t`'s shape and dtype: a plain torch.Tensor with no memory (data_ptr() 0)."""
    return torch._efficientzerotensor(t.shape, dtype=t.dtype)


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_group_names_a_zero_tensor(algorithm):
    """A zero tensor (data_ptr() 0 for all its elements) went to the library, which answered
    "xs = NULL"; the groups now name it, stacked or per rank, and call nothing."""
    g = group(algorithm=algorithm)
    x, idx, w = step()
    cases = [((zero_tensor(x), idx, w), "xs"), ((x, zero_tensor(idx), w), "topk_idx"), ((x, idx, zero_tensor(w)), "topk_weights"),
             (([zero_tensor(x[0]), x[1]], list(idx), list(w)), r"xs\[0\]")]
    for arguments, name in cases:
        with pytest.raises(ep.InvalidArgumentError, match=f"^{name}: " + ZERO):
            g.dispatch(*arguments)
    out = g.dispatch(x, idx, w)
    rows = torch.stack(out.tokens).clone()
    with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + ZERO):
        g.combine(zero_tensor(rows), out.handle)
    with pytest.raises(ep.InvalidArgumentError, match="^out: " + ZERO):
        g.combine(rows, out.handle, out=zero_tensor(torch.zeros(2, 3, 8)))
    assert torch.stack(g.combine(rows, out.handle)).abs().sum() > 0


def test_an_nccl_rank_names_a_zero_tensor(recorded):  # noqa: F811
    """An NCCL rank passed the slot buffer's address for a zero tensor's 0 (as for an empty
    tensor's), so the library would have read that buffer as the rank's tokens."""
    nccl_rank_names(recorded, zero_tensor, ZERO, (0, 1, 2))


@pytest.mark.parametrize("layout", [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")])
def test_exchange_takes_a_dead_torch_func_wrapper_with_or_without_grad(layout):
    """Exchange unwrapped a wrapper left over from a finished transform where autograd records the
    call (as Function.apply does), but under no_grad passed it to the group, which raised torch's
    "Cannot access data pointer": both now give what the tensor it wraps gives."""
    algorithm, arrangement = layout
    exchange = Exchange(group(algorithm=algorithm, layout=arrangement))
    x, idx, w = step()
    want = exchange.dispatch(x, idx, w)
    rows = want.tokens * 2
    expected = exchange.combine(rows, want)
    with torch.no_grad():
        sent = exchange.dispatch(leaked(x), idx, leaked(w))
        assert torch.equal(sent.tokens, want.tokens)
        combined = exchange.combine(leaked(rows), sent)
    assert expected.abs().sum() > 0 and torch.equal(combined, expected)


# -- tracing tensors: FakeTensor, functionalize (no memory of their own) -----------------------------

FAKE = r"a FakeTensor \(torch.compile's tracing, FakeTensorMode\), which has no memory the library could read or write; "


def fakes(*tensors):
    """FakeTensors of `tensors` (what torch.compile traces with), and their mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return mode, [mode.from_tensor(t) for t in tensors]


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_group_names_a_fake_tensor_instead_of_passing_null(algorithm):
    """A FakeTensor's data_ptr() is 0 (torch warns that reading it is a bug): the groups' calls
    passed it on, and the library answered "xs = NULL", or "topk_idx[0].data = NULL" for lists,
    naming neither the tensor's kind nor what to do. They now name it, with or without the mode
    active, warn nothing, and call nothing."""
    import warnings

    g = group(algorithm=algorithm)
    x, idx, w = step()
    mode, (fx, fidx, fw) = fakes(x, idx, w)
    cases = [((fx, idx, w), "xs"), ((x, fidx, w), "topk_idx"), ((x, idx, fw), "topk_weights"),
             ((list(fx), list(idx), list(w)), r"xs\[0\]"), ((list(x), list(idx), list(fw)), r"topk_weights\[0\]")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # (torch's "Accessing the data pointer of FakeTensor" is a UserWarning)
        for arguments, name in cases:
            with pytest.raises(ep.InvalidArgumentError, match=f"^{name}: " + FAKE):
                g.dispatch(*arguments)
            with mode, pytest.raises(ep.InvalidArgumentError, match=f"^{name}: " + FAKE):
                g.dispatch(*arguments)
        out = g.dispatch(x, idx, w)
        rows = torch.stack(out.tokens).clone()
        (frows, ftarget) = fakes(rows, torch.zeros(2, 3, 8))[1]
        with pytest.raises(ep.InvalidArgumentError, match="^expert_outputs: " + FAKE):
            g.combine(frows, out.handle)
        with pytest.raises(ep.InvalidArgumentError, match="^out: " + FAKE):
            g.combine(rows, out.handle, out=ftarget)
        combined = torch.stack(g.combine(rows, out.handle))
    assert combined.abs().sum() > 0


def test_an_nccl_rank_names_a_fake_tensor(recorded):  # noqa: F811
    nccl_rank_names(recorded, lambda t: fakes(t)[1][0], FAKE, (0, 1, 2))


@pytest.mark.parametrize("lists", [False, True])
def test_a_group_names_a_functionalized_tensor(lists):
    """Inside torch.func.functionalize the stacked and per-rank calls raised torch's RuntimeError
    ("Attempted to access the data pointer on an invalid python storage") from the package's
    storage check; they now name the argument, and give the plain call's rows outside."""
    g = group()
    x, idx, w = step()
    errors = []

    def body(x, idx, w):
        arguments = (list(x), list(idx), list(w)) if lists else (x, idx, w)
        try:
            g.dispatch(*arguments)
        except ep.InvalidArgumentError as error:
            errors.append(str(error))
        return x

    torch.func.functionalize(body)(x, idx, w)
    assert len(errors) == 1 and re.match(("xs\\[0\\]: " if lists else "xs: ") + WRAPPER, errors[0]), errors
    assert torch.stack(g.dispatch(x, idx, w).tokens).abs().sum() > 0


@pytest.mark.parametrize("lists", [False, True])
def test_a_group_names_a_functional_tensor_of_torch_compile(lists):
    """torch.compile's and torch.export's functionalization hold their tensors in the Python
    subclass FunctionalTensor (torch._is_functional_tensor is False for it): a group's call raised
    torch's RuntimeError ("Cannot access data pointer of Tensor") instead of naming the argument,
    with or without its mode active."""
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    g = group()
    x, idx, w = step()
    mode = FunctionalTensorMode()
    with mode:
        fx = FunctionalTensor.to_functional(x)
        given = list(fx) if lists else fx
    name = "xs\\[0\\]" if lists else "xs"
    pattern = f"^{name}: a functional tensor \\(torch.func.functionalize, torch.compile's tracing\\), which has no memory"
    arguments = (given, list(idx), list(w)) if lists else (given, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=pattern):
        g.dispatch(*arguments)
    with mode, pytest.raises(ep.InvalidArgumentError, match=pattern):
        g.dispatch(*arguments)
    assert torch.stack(g.dispatch(x, idx, w).tokens).abs().sum() > 0


# -- subclasses defined outside torch and NumPy ------------------------------------------------------


class UserTensor(torch.Tensor):
    """A user's torch.Tensor subclass (its values in its own storage)."""


class UserArray(np.ndarray):
    """A user's numpy.ndarray subclass."""


class WrapperTensor(torch.Tensor):
    """A wrapper subclass: it holds a tensor and has no storage of its own (data_ptr() is 0)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            return a.inner if isinstance(a, WrapperTensor) else a
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_a_users_tensor_or_array_subclass_is_taken_as_its_base():
    """A subclass of torch.Tensor or numpy.ndarray defined outside those libraries was refused as
    "a UserTensor; must be a NumPy array or a PyTorch tensor" (the package looked at the class's
    module only); it is now taken as what it is, with the same rows as its base's."""
    x, idx, w = step()
    want = torch.stack(group().dispatch(x, idx, w).tokens)
    got = group().dispatch(*(t.as_subclass(UserTensor) for t in (x, idx, w)))
    assert want.abs().sum() > 0 and torch.equal(torch.stack(got.tokens), want)
    arrays = group().dispatch(*(t.numpy().view(UserArray) for t in (x, idx, w)))
    assert np.array_equal(np.stack(arrays.tokens), want.numpy())


@pytest.mark.parametrize("lists", [False, True])
def test_a_wrapper_subclass_without_memory_is_named(lists):
    """A wrapper subclass (torch.Tensor._make_wrapper_subclass: no storage, data_ptr() 0) is named
    rather than passed on as a null address."""
    x, idx, w = step()
    wrapped = WrapperTensor(x)
    arguments = ([WrapperTensor(x[0]), WrapperTensor(x[1])], list(idx), list(w)) if lists else (wrapped, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=("^xs\\[0\\]: " if lists else "^xs: ")
                       + "a WrapperTensor with no memory of its own \\(a wrapper tensor subclass: data_ptr\\(\\) is 0\\)"):
        group().dispatch(*arguments)


# -- a step's routing moved between the call that takes it and one that reads it again -----------

MOVED = r"its memory moved since the step's dispatch took it \(\.data =, set_\(\) or a storage resize_\(\) since\)"


def moved(t, how):
    """Moves `t`'s memory in place, as a caller reusing its routing tensor might."""
    if how == "data":
        t.data = t.data.clone()
    elif how == "set_":
        t.set_(t.clone())
    else:
        t.untyped_storage().resize_(0)


@pytest.mark.parametrize("how", ["data", "set_", "shrink"])
@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_step_refuses_routing_moved_since_its_dispatch(algorithm, how):
    """The library keeps the address of a step's topk_idx and reads the routing there again (its
    combine, a dispatch with the step's handle and no topk_idx): a tensor moved in place since
    (.data =, set_(), its storage resized) was read where it no longer is, freed memory. The calls
    now name it, stacked or per rank, and call nothing; the step's calls go on once it is back."""
    g = group(algorithm=algorithm)
    x, idx, w = step()
    given = idx.clone()
    out = g.dispatch(x, given, w)
    rows = torch.stack(out.tokens).clone()
    want = torch.stack(g.combine(rows, g.dispatch(x, idx, w).handle))
    out = g.dispatch(x, given, w)
    moved(given, how)
    with pytest.raises(ep.InvalidArgumentError, match="^topk_idx: " + MOVED):
        g.combine(rows, out.handle)
    # Per rank, and a dispatch again with a handle of its own and no routing.
    given = [t.clone() for t in idx]   # (tensors of their own: a shrunk storage is one rank's)
    with g.handle() as own:
        out = g.dispatch(list(x), given, list(w), handle=own)
        moved(given[1], how)
        with pytest.raises(ep.InvalidArgumentError, match=r"^topk_idx\[1\]: " + MOVED):
            g.combine(list(rows), own)
        with pytest.raises(ep.InvalidArgumentError, match=r"^topk_idx\[1\]: " + MOVED):
            g.dispatch(list(x), None, list(w), handle=own)
    assert torch.equal(torch.stack(g.combine(rows, g.dispatch(x, idx, w).handle)), want)


@pytest.mark.parametrize("then", ["combine", "dispatch again", "dispatch after update"])
@pytest.mark.parametrize("how", ["data", "set_", "shrink"])
def test_an_nccl_rank_refuses_routing_moved_since_its_step_took_it(recorded, how, then):  # noqa: F811
    g, calls = recorded(layout="rank_major", dtype="f32")
    x, idx, w = torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)
    if then == "dispatch after update":
        g.update(idx)
    else:
        out = g.dispatch(x, idx, w)
    moved(idx, how)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match="^topk_idx: " + MOVED):
        if then == "combine":
            g.combine(out.tokens.clone(), out.handle)
        elif then == "dispatch again":
            g.dispatch(x, None, w, handle=out.handle)
        else:
            g.dispatch(x, None, w)
    assert not calls


@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_send_only_combine_keeps_the_memory_its_receiving_half_reads(how):
    """A send-only combine's receiving half (hook()) reads the weights where the call took them;
    the group kept the tensor object alive, not its memory: weights moved before hook() (.data =,
    set_()) left it reading their old, freed storage."""
    g = group()
    x, idx, w = step()
    given = w.clone()
    out = g.dispatch(x, idx, given)
    rows = torch.stack(out.tokens).clone()
    want = torch.stack(g.combine(rows, out.handle))
    out = g.dispatch(x, idx, given)
    combined, hook = g.combine(rows, out.handle, send_only=True)
    held = given.untyped_storage()._weak_ref()
    moved(given, how)
    assert not torch.UntypedStorage._expired(held)
    hook()
    assert torch.equal(torch.stack(list(combined)), want)


@pytest.mark.parametrize("how", ["data", "set_"])
def test_an_nccl_ranks_send_only_combine_keeps_the_weights_memory(recorded, how):  # noqa: F811
    g, calls = recorded(dtype="f32")
    x, idx, w = torch.randn(3, g.hidden), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, g.top_k)
    out = g.dispatch(x, idx, w)
    calls.clear()
    _, hook = g.combine(out.tokens.clone(), out.handle, send_only=True)
    assert calls[-1][1][0].topkWeights.data == w.data_ptr()
    held = w.untyped_storage()._weak_ref()
    moved(w, how)
    assert not torch.UntypedStorage._expired(held)
    hook()
