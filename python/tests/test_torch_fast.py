"""expert_parallel._torch_fast, the common stacked dispatch and combine with their torch tensors
read in C++: the same results and the same errors as the package's Python path, for every call it
takes, and nothing written for any call it leaves to that path. CI builds the module
(scripts/build-torch-fast) and sets EP_REQUIRE_TORCH_FAST=1; the GPU part runs where
EP_GPU_TESTS=1."""

import os

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _fast
from reference import random_routing

torch = pytest.importorskip("torch")

FAST = _fast.torch_fast_module()
REQUIRED = os.environ.get("EP_REQUIRE_TORCH_FAST") == "1"
pytestmark = pytest.mark.skipif(FAST is None and not REQUIRED, reason="expert_parallel._torch_fast not built (scripts/build-torch-fast)")
GPU = os.environ.get("EP_GPU_TESTS") == "1"
LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def test_the_module_is_built_where_ci_requires_it():
    assert FAST is not None, "EP_REQUIRE_TORCH_FAST=1 but expert_parallel._torch_fast does not import"


class Counted:
    """One of the module's functions, counting the calls it took (a result other than None)."""

    def __init__(self, function):
        self.function, self.taken = function, 0

    def __call__(self, *arguments):
        result = self.function(*arguments)
        self.taken += result is not None
        return result


def pair(ranks, layout, algorithm="ll", dtype="bf16", device="cpu", **options):
    """Two groups of one config: the first takes the common calls through the module (its
    functions counted), the second through the package's Python path."""
    config = dict(ranks=ranks, experts=4 * ranks, hidden=16, top_k=3, max_tokens=5, algorithm=algorithm, layout=layout,
                  dtype=dtype, device=device, **options)
    fast, python = ep.VirtualGroup(**config), ep.VirtualGroup(**config)
    _fast.look(torch.zeros(1), ())   # (torch's tensor type, which a first call would learn)
    assert fast._fast_spec_made() is not None
    fast._fast_dispatch, fast._fast_combine = Counted(fast._fast_dispatch), Counted(fast._fast_combine)
    python._fast_spec = None
    return fast, python


def step_inputs(rng, ranks, b, dtype, idx_dtype, device="cpu"):
    experts = 4 * ranks
    x = torch.from_numpy(rng.standard_normal((ranks, b, 16)).astype(np.float32)).to(device=device, dtype=DTYPES[dtype])
    idx = torch.from_numpy(np.stack([random_routing(rng, b, experts, 3) for _ in range(ranks)])).to(device=device, dtype=idx_dtype)
    w = torch.from_numpy(rng.random((ranks, b, 3)).astype(np.float32)).to(device)
    return x, idx, w


def bits(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(value, (list, tuple)):
        return [bits(v) for v in value]
    return value


def outcome(call):
    try:
        return ("ok", bits(call()))
    except Exception as error:   # (any error: both groups' must be the same)
        return (type(error).__name__, str(error))


def run_steps(fast, python, ranks, dtype, idx_dtype, device="cpu", steps=5):
    rng = np.random.default_rng(ranks * 7 + len(dtype))
    for step in range(steps):
        b = [5, 1, 3][step % 3]
        x, idx, w = step_inputs(rng, ranks, b, dtype, idx_dtype, device)
        results = []
        for g in (fast, python):
            sent = g.dispatch(x, idx, w)
            ys = (sent.received.float() * 0.5 - 1).to(sent.received.dtype)
            combined = g.combine(ys, sent.handle)
            results.append((bits(sent.received), bits(sent.expert_counts), sent.handle.tokens, bits(combined)))
        assert results[0] == results[1], (step, b)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
@pytest.mark.parametrize("ranks", [1, 3])
def test_common_calls_match_the_python_path(algorithm, layout, ranks):
    for dtype, idx_dtype in (("bf16", torch.int64), ("f16", torch.int32), ("f32", torch.int64)):
        fast, python = pair(ranks, layout, algorithm, dtype)
        run_steps(fast, python, ranks, dtype, idx_dtype)
        # A slot's first dispatch and combine make its call structs (the Python path); every later common call is the module's.
        assert fast._fast_dispatch.taken == 5 - fast.buffer_slots
        # HT expert-major padded combines through the general path (its weights are the slot's).
        assert fast._fast_combine.taken == (0 if layout == "expert_major_padded" else 5 - fast.buffer_slots)
        fast.close()
        python.close()


class Sub(torch.Tensor):
    pass


def odd_inputs(x, idx, w):
    """(name, (xs, topk_idx, topk_weights)) of calls that are not the common one, or not sound."""
    def shrunk(t):
        t = t.clone()
        t.untyped_storage().resize_(0)
        return t

    def off_boundary(t):   # rows 2 bytes past an 8-byte boundary
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    return [
        ("x float64", (x.double(), idx, w)),
        ("x transposed", (x.transpose(1, 2).contiguous().transpose(1, 2), idx, w)),
        ("x hidden 8", (x[:, :, :8], idx, w)),
        ("x two-dimensional", (x[0], idx, w)),
        ("x subclass", (x.as_subclass(Sub), idx, w)),
        ("x negative view", (torch._neg_view(-x), idx, w)),
        ("x shrunk storage", (shrunk(x), idx, w)),
        ("x meta", (torch.empty(x.shape, dtype=x.dtype, device="meta"), idx, w)),
        ("x off an 8-byte boundary", (off_boundary(x), idx, w)),
        ("idx float", (x, idx.float(), w)),
        ("idx int16", (x, idx.to(torch.int16), w)),
        ("idx other tokens", (x, idx[:, :1], w)),
        ("w float64", (x, idx, w.double())),
        ("w top-k 2", (x, idx, w[:, :, :2])),
        ("w strided", (x, idx, w.transpose(0, 1).contiguous().transpose(0, 1))),
        ("w a list", (x, idx, list(w))),
        ("w None", (x, idx, None)),
        ("x a NumPy array", (x.float().numpy(), idx, w)),
    ]


def test_other_calls_write_nothing_and_fail_or_succeed_as_the_python_path():
    ranks = 2
    fast, python = pair(ranks, "expert_major", dtype="bf16")
    run_steps(fast, python, ranks, "bf16", torch.int64, steps=2)   # (the next slot's call struct made)
    x, idx, w = step_inputs(np.random.default_rng(5), ranks, 4, "bf16", torch.int64)
    for name, arguments in odd_inputs(x, idx, w):
        slot = fast._slots[fast._next_slot]   # (a general call may have made the slot anew)
        call = slot.dispatch_call or fast._dispatch_call(slot)
        before = bytes(call._bytes)
        assert FAST.dispatch(fast._fast_spec, *arguments, call.address, None) is None, name
        assert bytes(call._bytes) == before, name
        taken = fast._fast_dispatch.taken
        assert outcome(lambda: fast.dispatch(*arguments).received) == outcome(lambda: python.dispatch(*arguments).received), name
        assert fast._fast_dispatch.taken == taken, name
    fast.close()
    python.close()


def test_combines_it_leaves_to_the_python_path():
    ranks = 2
    fast, python = pair(ranks, "expert_major", dtype="f32")
    run_steps(fast, python, ranks, "f32", torch.int32, steps=2)   # (both slots' call structs made)
    rng = np.random.default_rng(9)
    kinds = ["ok", "float64", "transposed", "one rank", "weights moved", "weights scaled", "weights int32 view", "weights shrunk"]
    for kind in kinds:
        x, idx, w = step_inputs(rng, ranks, 3, "f32", torch.int32)
        outcomes = []
        for g in (fast, python):
            given = w.clone()
            sent = g.dispatch(x, idx, given)
            ys = sent.received * 2
            if kind == "float64":
                ys = ys.double()
            elif kind == "transposed":
                ys = ys.transpose(-1, -2).contiguous().transpose(-1, -2)
            elif kind == "one rank":
                ys = ys[:1]
            elif kind == "weights moved":
                given.data = given.clone() * 3
            elif kind == "weights scaled":
                given.mul_(2)   # (in place: read again where it is, as the Python path reads it)
            elif kind == "weights int32 view":
                given.data = given.view(torch.int32)
            elif kind == "weights shrunk":
                given.untyped_storage().resize_(0)
            taken = fast._fast_combine.taken
            outcomes.append(outcome(lambda: g.combine(ys, sent.handle)))
            if g is fast:
                assert fast._fast_combine.taken == taken + (kind in ("ok", "weights scaled")), kind
        assert outcomes[0] == outcomes[1], kind
    fast.close()
    python.close()


@pytest.mark.parametrize("wrap", [lambda t: t.as_subclass(Sub), lambda t: torch.nn.Parameter(t, requires_grad=False)],
                         ids=["subclass", "Parameter"])
def test_a_combine_reads_again_dispatch_weights_of_a_tensor_subclass(wrap):
    """The common combine read the LL dispatch's weights again only where they were a plain
    tensor: a subclass's or a Parameter's, shrunk or moved since the dispatch, was read where the
    dispatch took it (freed memory). Both common paths now leave such weights to the general path,
    which reads them where they are now or names them."""
    fast, python = pair(2, "expert_major", dtype="f32")
    run_steps(fast, python, 2, "f32", torch.int32, steps=2)   # (both slots' call structs made)
    x, idx, w = step_inputs(np.random.default_rng(4), 2, 3, "f32", torch.int32)
    for g in (fast, python):
        given = wrap(w.clone())
        sent = g.dispatch(x, idx, given)
        given.untyped_storage().resize_(0)
        with pytest.raises(ep.InvalidArgumentError, match="^topk_weights: storage of 0 bytes"):
            g.combine(sent.received * 2, sent.handle)
        given = wrap(w.clone())
        sent = g.dispatch(x, idx, given)
        ys = sent.received * 2
        given.data = given.detach().clone() * 3   # (moved: the combine weighs with what it holds now)
        moved = bits(g.combine(ys, sent.handle))
        assert moved == bits(g.combine(ys, g.dispatch(x, idx, w * 3).handle))
    fast.close()
    python.close()


def test_handles_of_their_own_and_a_closed_group():
    fast, python = pair(1, "expert_major")
    run_steps(fast, python, 1, "bf16", torch.int64, steps=2)   # (both slots' call structs made)
    x, idx, w = step_inputs(np.random.default_rng(3), 1, 2, "bf16", torch.int64)
    results = []
    for g in (fast, python):
        own = g.handle()
        sent = g.dispatch(x, idx, w, handle=own)   # a handle of its own: the Python path
        combined = g.combine(sent.received * 3, sent.handle)   # its combine: the module's, with the handle's step
        results.append((bits(sent.received), bits(combined)))
        own.release()
    assert results[0] == results[1]
    assert (fast._fast_dispatch.taken, fast._fast_combine.taken) == (0, 1)
    fast.close()
    python.close()
    assert outcome(lambda: fast.dispatch(x, idx, w)) == outcome(lambda: python.dispatch(x, idx, w))
    assert outcome(lambda: fast.dispatch(x, idx, w))[0] == "InvalidUsageError"
    assert fast._fast_dispatch.taken == 0


@pytest.mark.skipif(not GPU, reason="needs a GPU: set EP_GPU_TESTS=1")
@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_gpu_common_calls_match_the_python_path(algorithm, layout):
    for ranks in (1, 4):
        fast, python = pair(ranks, layout, algorithm, "bf16", device="cuda:0")
        run_steps(fast, python, ranks, "bf16", torch.int64, device="cuda:0")
        assert fast._fast_dispatch.taken == 5 - fast.buffer_slots
        assert fast._fast_combine.taken == (0 if layout == "expert_major_padded" else 5 - fast.buffer_slots)
        fast.close()
        python.close()


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_an_nccl_ranks_reads_hand_the_library_what_the_python_reads_do(monkeypatch, layout):
    """An NCCLGroup of one rank over CPU tensors (test_nccl_group_calls.cpu_rank_group), its library
    calls recorded: the C++ reads (rank_inputs, address) and the Python reads give each call the
    same inputs, and the same errors for calls they leave to the general path."""
    import ctypes

    from expert_parallel import _abi, nccl_group
    from test_nccl_group_calls import cpu_rank_group, step

    monkeypatch.setattr(nccl_group, "call", lambda name, *arguments: None)
    seen = {True: [], False: []}

    def recorder(calls):
        def entry(name):
            def run(handle, *addresses):
                if name == "epGroupDispatchStacked":
                    d = ctypes.cast(addresses[0], ctypes.POINTER(_abi.StackedDispatch)).contents
                    calls.append((name, d.tokens, d.topkIdx.data, d.inputTokens.data, d.topkWeights.data, d.topkIdx.dtype, d.phase))
                elif name == "epGroupCombineStacked":
                    c = ctypes.cast(addresses[0], ctypes.POINTER(_abi.StackedCombine)).contents
                    calls.append((name, c.expertOutputs.data, c.topkWeights.data, c.phase))
                return _abi.SUCCESS
            return run
        return entry

    model = ep.VirtualGroup(ranks=4, experts=16, hidden=32, top_k=4, max_tokens=8, dtype="bf16", algorithm="ll", layout=layout,
                            device="cpu")
    groups = {fast: cpu_rank_group(model, recorder(seen[fast])) for fast in (True, False)}
    model.close()
    _fast.look(torch.zeros(1), ())
    assert groups[True]._fast_spec_made() is not None
    inputs, address = Counted(groups[True]._fast_inputs), Counted(groups[True]._fast_address)
    groups[True]._fast_inputs, groups[True]._fast_address = inputs, address
    groups[False]._fast_spec = None
    for n, tokens in enumerate([8, 3, 1, 8]):
        x, idx, w = step(groups[True], tokens, n)
        idx = idx.long() if n % 2 else idx
        y = torch.randn(groups[True].recv_shape).to(torch.bfloat16)
        for g in groups.values():
            g.combine(y, g.dispatch(x, idx, w).handle)
        # The dispatch's inputs as the library got them: the same tensors, types and counts.
        assert seen[True][-2] == seen[False][-2]
        # The combine's: the caller's expert outputs (a tensor each group was given), the dispatch's weights.
        assert seen[True][-1][2:] == seen[False][-1][2:]
    assert inputs.taken == 4 and address.taken == 4 * (2 if layout == "expert_major" else 1)
    x, idx, w = step(groups[True], 4, 9)
    for name, arguments in [("x float32", (x.float(), idx, w)), ("x transposed", (x.t().contiguous().t(), idx, w)),
                            ("x hidden 16", (x[:, :16], idx, w)), ("x subclass", (x.as_subclass(Sub), idx, w)),
                            ("x negative view", (torch._neg_view(-x), idx, w)), ("idx float", (x, idx.float(), w)),
                            ("idx other tokens", (x, idx[:1], w)), ("w float64", (x, idx, w.double())),
                            ("w top-k 2", (x, idx, w[:, :2])), ("w None", (x, idx, None)), ("no tokens", (x[:0], idx[:0], w[:0])),
                            ("x stacked", (x.unsqueeze(0), idx, w)), ("x meta", (x.to("meta"), idx, w)),
                            ("w meta", (x, idx, w.to("meta")))]:
        assert outcome(lambda: groups[True].dispatch(*arguments).tokens) == outcome(lambda: groups[False].dispatch(*arguments).tokens), name
    # Meta tensors (get_device() -1, as this CPU rank's device) have no memory: named, never passed on as address 0.
    for name, arguments in [("x meta", (x.to("meta"), idx, w)), ("w meta", (x, idx, w.to("meta")))]:
        assert outcome(lambda: groups[False].dispatch(*arguments))[0] == "InvalidArgumentError", name
    y = torch.randn(groups[True].recv_shape).to(torch.bfloat16)
    for g in groups.values():
        handle = g.dispatch(x, idx, w).handle
        assert outcome(lambda: g.combine(y.to("meta"), handle))[0] == "InvalidArgumentError"
        if layout == "expert_major":
            assert outcome(lambda: g.combine(y, handle, topk_weights=w.to("meta")))[0] == "InvalidArgumentError"


def test_a_module_built_against_another_torch_is_not_used(monkeypatch):
    # The module reads torch's tensors through torch's headers, inline: another torch's layout may differ.
    assert FAST.torch_version == torch.__version__
    monkeypatch.setattr(FAST, "torch_version", torch.__version__ + ".other")
    assert _fast.torch_fast_module() is None
    monkeypatch.setenv("EP_TORCH_FAST", "0")
    monkeypatch.setattr(FAST, "torch_version", torch.__version__)
    assert _fast.torch_fast_module() is None


def test_the_modules_functions_refuse_wrong_arguments_by_name():
    fast, python = pair(1, "expert_major")
    spec = fast._fast_spec
    for function, arguments in ((FAST.dispatch, (spec,)), (FAST.combine, (spec, None)), (FAST.rank_inputs, ()),
                                (FAST.address, (spec, None, [1], 0)), (FAST.dispatch, (None,) * 6)):
        with pytest.raises((TypeError, ValueError)):
            function(*arguments)
    fast.close()
    python.close()
