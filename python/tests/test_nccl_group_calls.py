"""NCCLGroup's data path without a GPU: a group of one NCCL rank built over CPU tensors, its
library calls replaced by a recorder, so that what dispatch and combine hand the library (the
stacked calls' one part: the caller's tensors and the slot's own buffers, patched per call in
structs made once per slot) and what they return can be checked here. The calls themselves, on the device, run in
the GPU suites (test_gpu_steps.py's one-rank NCCL group)."""

import ctypes

import numpy as np
import pytest

import expert_parallel as ep
from expert_parallel import _abi, nccl_group
from expert_parallel._arrays import fixed_alias
from expert_parallel._nccl_slots import own_outputs

torch = pytest.importorskip("torch")

DTYPES = {_abi.BF16: torch.bfloat16, _abi.F32: torch.float32}


class _Slot:
    """A buffer slot as NCCLSlot makes it, over CPU tensors: the group's buffers (rows, routing)
    are memory the tensors do not own, as the group's device memory is (kept here, handed out
    through aliases that cannot move or free it)."""

    def __init__(self, group, index):
        element = DTYPES[group._element]
        self.index, self.use = index, 0
        describe = group._describe_output
        self._group_memory = []

        def buffer(shape, dtype):
            self._group_memory.append(torch.zeros(shape, dtype=dtype))
            return fixed_alias(self._group_memory[-1])

        self.tokens = buffer(group.recv_shape, element)
        self.tokens_desc = describe(self.tokens, group._element, "tokens")
        self.idx = self.weights = self.idx_desc = self.weights_desc = self.weight_grads = self.grads_desc = None
        if group.recv_routing_shape is not None:
            self.idx = buffer(group.recv_routing_shape, torch.int32)
            self.weights = buffer(group.recv_routing_shape, torch.float32)
            self.weight_grads = buffer(group.recv_routing_shape, torch.float32)
            self.idx_desc, self.weights_desc = describe(self.idx, _abi.I32, "idx"), describe(self.weights, _abi.F32, "w")
            self.grads_desc = describe(self.weight_grads, _abi.F32, "g")
        self.expert_outputs = buffer(group.recv_shape, element)
        self.scales = self.scales_desc = None
        own_outputs(self, group, "cpu")   # (NCCLSlot's own: the counts and combined rows)


def part(argument):
    """(address, dtype) of an epStacked_t, or None where not given."""
    return (argument.data, argument.dtype) if argument.data else None


def at(tensor, dtype):
    return (tensor.data_ptr(), dtype)


@pytest.fixture
def recorded(monkeypatch):
    """make(**settings) -> (group, calls): an NCCLGroup of rank 0 of `ranks` over CPU tensors
    whose entry points append (name, decoded arguments) to `calls`."""
    calls = []

    def entry(name):
        def run(handle, *addresses):
            structs = {"epHandleUpdate": (_abi.UpdateInputs, _abi.UpdateConfig), "epGroupDispatchStacked": (_abi.StackedDispatch,),
                       "epGroupCombineStacked": (_abi.StackedCombine,)}[name]
            calls.append((name, [ctypes.cast(a, ctypes.POINTER(cls)).contents for a, cls in zip(addresses, structs)]))
            return _abi.SUCCESS
        return run

    monkeypatch.setattr(nccl_group, "call", lambda name, *arguments: calls.append((name, arguments)))

    def make(**settings):
        shape = dict(ranks=4, experts=16, hidden=32, top_k=4, max_tokens=8, dtype="bf16", algorithm="ll")
        shape.update(settings)
        model = ep.VirtualGroup(**shape, device="cpu")
        group = cpu_rank_group(model, entry)
        model.close()
        return group, calls

    return make


def cpu_rank_group(model, entry):
    """An NCCLGroup of rank 0 over CPU tensors with `model`'s facts (a VirtualGroup of the same
    settings: what epGroupGetInfo gives), two buffer slots, its entry points `entry(name)`."""
    group = nccl_group.NCCLGroup.__new__(nccl_group.NCCLGroup)
    for name in ("ranks", "experts", "local_experts", "top_k", "hidden", "max_tokens", "algorithm", "layout", "alignment",
                 "dtype", "recv_shape", "recv_routing_shape", "fp8", "fp8_source", "_recv_element", "recv_scales_shape",
                 "_scale_type", "_input_element", "_element"):
        setattr(group, name, getattr(model, name))
    group._group, group._handle, group._device = ctypes.c_void_p(0x1000), ctypes.c_void_p(0x2000), -1
    group.rank, group._own_step, group._pending, group._next_slot = 0, 0, None, 0
    group._slots = [_Slot(group, s) for s in range(2)]
    group._raw = lambda stream: None
    group._prepare_calls(entry)
    return group


def step(group, tokens, seed):
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.array([rng.choice(group.experts, group.top_k, replace=False) for _ in range(tokens)],
                                    dtype=np.int32).reshape(tokens, group.top_k))
    return torch.randn(tokens, group.hidden).to(DTYPES[group._element]), idx, torch.rand(tokens, group.top_k)


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_each_call_hands_the_library_its_own_tensors_and_the_slots_buffers(recorded, layout):
    group, calls = recorded(layout=layout)
    for n, tokens in enumerate([8, 3, 8, 1]):   # different tensors and token counts, slots in turn
        x, idx, w = step(group, tokens, n)
        calls.clear()
        out = group.dispatch(x, idx, w)
        slot = group._slots[n % 2]
        ((name, (d,)),) = calls   # the update and the dispatch, one call
        assert name == "epGroupDispatchStacked" and d.tokens == tokens
        assert part(d.topkIdx) == at(idx, _abi.I32) and part(d.inputTokens) == at(x, _abi.BF16)
        assert part(d.topkWeights) == at(w, _abi.F32) and part(d.scales) is None
        assert part(d.receivedTokens) == at(slot.tokens, _abi.BF16)
        assert part(d.receivedTopkIdx) == (None if slot.idx is None else at(slot.idx, _abi.I32))
        assert part(d.expertCounts) == at(slot.counts, _abi.I32) and part(d.expertSourceCounts) == at(slot.source_counts, _abi.I32)
        assert (d.direction, d.step, d.phase) == (0, None, _abi.PHASE_WHOLE)
        assert out.tokens is slot.tokens and out.expert_outputs is slot.expert_outputs and out.handle.slot == n % 2
        assert out.expert_counts is slot.counts and out.handle.tokens == tokens and out.event is None and out.hook is None

        calls.clear()
        y = out.expert_outputs if n % 2 else torch.randn(group.recv_shape).to(torch.bfloat16)   # the slot's own, or the caller's
        combined = group.combine(y, out.handle)
        ((name, (c,)),) = calls
        assert name == "epGroupCombineStacked" and (c.direction, c.step, c.phase) == (0, None, _abi.PHASE_WHOLE)
        assert part(c.expertOutputs) == at(y, _abi.BF16)
        # LL expert-major's forward combine applies the dispatch's weights; rank-major's rows came weighted.
        assert part(c.topkWeights) == (at(w, _abi.F32) if layout == "expert_major" else None)
        assert part(c.weightGradients) is None and part(c.topkWeightGradients) is None
        assert combined.data_ptr() == slot.combined.data_ptr() and list(combined.shape) == [tokens, group.hidden]
        assert part(c.combinedTokens) == at(combined, _abi.BF16)


@pytest.mark.parametrize("algorithm", ["ll", "ht"])
def test_a_rank_with_no_tokens_passes_addresses_the_library_reads_as_given(recorded, algorithm):
    # An empty tensor's data_ptr() is 0, which a stacked call reads as "not given": the update
    # would be skipped (and the peers wait for this rank's counts). Every empty argument that is
    # given gets an address; nothing is read at it.
    group, calls = recorded(algorithm=algorithm)
    x, idx, w = step(group, 0, 16)
    assert x.data_ptr() == idx.data_ptr() == w.data_ptr() == 0
    for general in (False, True):
        calls.clear()
        out = group.dispatch(x, idx.long() if general else idx, w, handle=ep.Handle(group, ctypes.c_void_p(0x5000)) if general else None)
        ((name, (d,)),) = calls
        assert name == "epGroupDispatchStacked" and d.tokens == 0
        assert d.topkIdx.data and d.inputTokens.data and d.topkWeights.data and not d.scales.data
        calls.clear()
        mine = torch.empty(0, group.hidden, dtype=torch.bfloat16)
        group.combine(out.expert_outputs, out.handle, out=mine if general else None)
        ((name, (c,)),) = calls
        assert c.combinedTokens.data and (bool(c.topkWeights.data) == (group.layout == "expert_major"))
    calls.clear()
    out = group.dispatch(x, idx, None if algorithm == "ll" else w)   # without weights (LL expert-major): still not given
    assert not calls[-1][1][0].topkWeights.data or algorithm == "ht"


def test_handles_send_only_and_the_backward_pass_reach_the_library(recorded):
    group, calls = recorded(algorithm="ht", dtype="f32")
    own = ep.Handle(group, ctypes.c_void_p(0x5000))   # as group.handle() makes one (its step: the pointer)
    x, idx, w = step(group, 5, 7)
    calls.clear()
    out = group.dispatch(x, idx, w, handle=own, send_only=True)
    ((name, (d,)),) = calls
    assert name == "epGroupDispatchStacked" and d.step == 0x5000 and d.phase == _abi.PHASE_SEND_ONLY and part(d.topkIdx) == at(idx, _abi.I32)
    out.hook()
    assert calls[-1][0] == "epComplete"
    calls.clear()
    slot = group._slots[0]
    slot.weight_grads.copy_(torch.rand(group.recv_routing_shape))
    combined, grads = group.combine(out.expert_outputs, own, direction="backward", weight_gradients=slot.weight_grads)
    ((name, (c,)),) = calls
    assert (c.direction, c.step) == (1, 0x5000)
    assert part(c.weightGradients) == at(slot.weight_grads, _abi.F32) and part(c.topkWeights) is None
    assert part(c.topkWeightGradients) == at(grads, _abi.F32) and list(grads.shape) == [5, group.top_k]
    # The forward combine after it clears them again (no weight gradients; flat rows came weighted).
    calls.clear()
    group.combine(out.expert_outputs, own)
    ((_, (c,)),) = calls
    assert c.direction == 0 and part(c.weightGradients) is None and part(c.topkWeightGradients) is None


def test_bad_arguments_get_named_errors_and_reach_no_call(recorded):
    group, calls = recorded()
    x, idx, w = step(group, 4, 3)
    out = group.dispatch(x, idx, w)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match=r"x: shape \[4, 31\]; must be \[4, 32\]"):
        group.dispatch(x[:, :-1], idx, w)
    with pytest.raises(ep.InvalidArgumentError, match="topk_idx: dtype torch.float32; must be i32 or i64"):
        group.dispatch(x, idx.float(), w)
    with pytest.raises(ep.InvalidArgumentError, match=r"topk_weights: shape \[3, 4\]; must be \[4, 4\]"):
        group.dispatch(x, idx, w[:-1])
    with pytest.raises(ep.InvalidArgumentError, match="x: a ndarray; an NCCL group takes CUDA torch tensors"):
        group.dispatch(x.float().numpy(), idx, w)
    with pytest.raises(ep.InvalidArgumentError, match="expert_outputs: dtype torch.float32; must be bf16"):
        group.combine(out.expert_outputs.float(), out.handle)
    with pytest.raises(ep.InvalidArgumentError, match="direction='sideways'"):
        group.combine(out.expert_outputs, out.handle, direction="sideways")
    # Flags take True or False (send_only="false" ran a send-only call).
    with pytest.raises(ep.InvalidArgumentError, match=r"^send_only='false' \(type str\); must be True or False"):
        group.dispatch(x, idx, w, send_only="false")
    with pytest.raises(ep.InvalidArgumentError, match=r"^record_event=1 \(type int\); must be True or False"):
        group.combine(out.expert_outputs, out.handle, record_event=1)
    assert calls == []
    group.combine(out.expert_outputs, out.handle)   # the step is still whole
    assert [name for name, _ in calls] == ["epGroupCombineStacked"]


def test_an_optional_input_is_pointed_at_or_cleared_per_call(recorded):
    group, calls = recorded()   # LL expert-major: dispatch takes topk_weights or not (its combine needs them)
    x, idx, w = step(group, 4, 5)
    for weights in (w, None, w):
        calls.clear()
        group.dispatch(x, idx, weights)
        assert part(calls[-1][1][0].topkWeights) == (None if weights is None else at(w, _abi.F32))


def test_each_combine_hands_out_a_tensor_of_its_own_over_the_slots_rows(recorded):
    group, calls = recorded()
    x, idx, w = step(group, 4, 6)
    out = group.dispatch(x, idx, w)
    first = group.combine(out.expert_outputs, out.handle)
    first.unsqueeze_(0)          # what a caller does to its result (autograd history, in-place metadata)
    first.requires_grad_()
    out = group.dispatch(x, idx, w)
    out = group.dispatch(x, idx, w)   # the first slot again
    second = group.combine(out.expert_outputs, out.handle)
    assert second is not first and second.data_ptr() == first.data_ptr()
    assert list(second.shape) == [4, group.hidden] and not second.requires_grad and second.grad_fn is None


def test_a_stream_that_is_no_cuda_stream_is_refused_by_name():
    # ctypes would pass a str as a pointer to its characters: a bogus CUstream on the device.
    from expert_parallel import _fast

    for stream in ("cuda:0", 1.5, object()):
        with pytest.raises(ep.InvalidArgumentError, match="stream: a .*; must be a torch.cuda.Stream or an int CUstream handle"):
            _fast.raw_stream(0, stream)
    assert _fast.raw_stream(0, 1234) == 1234 and _fast.raw_stream(0, 0) is None


def test_combine_writes_into_out_and_applies_weights_given_to_it(recorded):
    group, calls = recorded()   # LL expert-major
    x, idx, w = step(group, 5, 8)
    out = group.dispatch(x, idx, None)   # the weights come with the combine
    mine, other = torch.empty(5, group.hidden, dtype=torch.bfloat16), torch.rand(5, group.top_k)
    calls.clear()
    combined = group.combine(out.expert_outputs, out.handle, topk_weights=other, out=mine)
    ((name, (c,)),) = calls
    assert combined is mine and part(c.combinedTokens) == at(mine, _abi.BF16)
    assert part(c.topkWeights) == at(other, _abi.F32)
    # Without them again: the slot's combined rows, and the dispatch's weights (here none: an error).
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: given neither to dispatch nor to combine"):
        group.combine(out.expert_outputs, out.handle)
    out = group.dispatch(x, idx, w)
    calls.clear()
    combined = group.combine(out.expert_outputs, out.handle)
    ((_, (c,)),) = calls
    assert part(c.topkWeights) == at(w, _abi.F32) and part(c.combinedTokens) == at(combined, _abi.BF16)
    assert combined.data_ptr() == group._slots[1].combined.data_ptr()


def test_combine_into_out_for_the_backward_pass_of_ht(recorded):
    group, calls = recorded(algorithm="ht", dtype="f32")
    x, idx, w = step(group, 3, 9)
    out = group.dispatch(x, idx, w)
    tokens, grads = torch.empty(3, group.hidden), torch.empty(3, group.top_k)
    calls.clear()
    result = group.combine(out.expert_outputs, out.handle, direction="backward", weight_gradients=group._slots[0].weight_grads,
                           out=(tokens, grads))
    ((_, (c,)),) = calls
    assert result[0] is tokens and result[1] is grads
    assert part(c.combinedTokens) == at(tokens, _abi.F32) and part(c.topkWeightGradients) == at(grads, _abi.F32)


def test_bad_combine_outputs_and_weights_get_named_errors_and_reach_no_call(recorded):
    group, calls = recorded()
    x, idx, w = step(group, 4, 10)
    out = group.dispatch(x, idx, w)
    mine = torch.empty(4, group.hidden, dtype=torch.bfloat16)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match=r"out: shape \[3, 32\]; must be \[4, 32\]"):
        group.combine(out.expert_outputs, out.handle, out=mine[:3])
    with pytest.raises(ep.InvalidArgumentError, match="out: dtype torch.float32; must be bf16"):
        group.combine(out.expert_outputs, out.handle, out=mine.float())
    with pytest.raises(ep.InvalidArgumentError, match="out: a list; an NCCL group takes CUDA torch tensors"):
        group.combine(out.expert_outputs, out.handle, out=[mine])
    with pytest.raises(ep.InvalidArgumentError, match=r"topk_weights: shape \[4, 3\]; must be \[4, 4\]"):
        group.combine(out.expert_outputs, out.handle, topk_weights=w[:, :3])
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: a ndarray; an NCCL group takes CUDA torch tensors"):
        group.combine(out.expert_outputs, out.handle, topk_weights=w.numpy())
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: given to combine, but the backward pass takes no weights"):
        group.combine(out.expert_outputs, out.handle, direction="backward", topk_weights=w)
    assert calls == []
    ht, calls = recorded(algorithm="ht")
    out = ht.dispatch(x, idx, w)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match="the forward combine of layout 'flat' takes no weights"):
        ht.combine(out.expert_outputs, out.handle, topk_weights=w)
    with pytest.raises(ep.InvalidArgumentError, match=r"out: a Tensor; the backward pass of HT takes \(tokens, topk_weight_gradients\)"):
        ht.combine(out.expert_outputs, out.handle, direction="backward", weight_gradients=ht._slots[0].weight_grads, out=mine)
    assert calls == []


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions and tensor methods called inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_deep_ep_low_latency_calls_on_an_nccl_rank_are_the_library_calls_alone(recorded, monkeypatch, tmp_path):
    """compat.deep_ep's low_latency_dispatch / low_latency_combine on an NCCL rank: the update and
    the dispatch, then one combine that writes into the tensor it returns and applies the caller's
    own weights; no copy, fill or masking of the caller's tensors on the way."""
    import torch.distributed as dist
    from expert_parallel.compat.deep_ep import Buffer, _groups

    made = []

    def make(self, spec, capacity):
        group, calls = recorded(ranks=1, experts=spec.experts, hidden=spec.hidden, top_k=spec.top_k, max_tokens=capacity,
                                dtype=spec.dtype, algorithm="ll", layout="expert_major")
        made.append((group, calls))
        return group

    monkeypatch.setattr(_groups.Groups, "_make", make)
    monkeypatch.setattr(_groups.Entry, "acquire", lambda self: ep.Handle(self.group, ctypes.c_void_p(0x5000)))
    monkeypatch.setattr(_groups.Entry, "release", lambda self, step: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        buffer = Buffer(dist.group.WORLD, low_latency_mode=True, device="cpu")
        buffer._shared.groups.nccl = True   # as on a CUDA device
        rng = np.random.default_rng(11)
        x = torch.randn(6, 32).to(torch.bfloat16)
        idx = torch.from_numpy(np.stack([rng.choice(16, 4, replace=False) for _ in range(6)])).to(torch.int64)
        idx[0, 1] = -1
        w = torch.rand(6, 4)
        first = buffer.low_latency_dispatch(x, idx, 8, 16, use_fp8=False)   # (makes the group)
        buffer.low_latency_combine(first[0], idx, w, first[2])
        (group, calls), = made
        calls.clear()
        seen = _TorchCalls()
        with seen:
            recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, 16, use_fp8=False)
        ((name, (d,)),) = calls
        assert name == "epGroupDispatchStacked"
        assert part(d.topkIdx) == at(idx, _abi.I64) and part(d.inputTokens) == at(x, _abi.BF16)
        assert part(d.topkWeights) is None and recv_x is group._slots[1].tokens and count is group._slots[1].counts
        calls.clear()
        with seen:
            combined, _, _ = buffer.low_latency_combine(recv_x, idx, w, handle)
        ((name, (c,)),) = calls
        assert name == "epGroupCombineStacked" and part(c.combinedTokens) == at(combined, _abi.BF16) and list(combined.shape) == [6, 32]
        assert part(c.topkWeights) == at(w, _abi.F32) and part(c.expertOutputs) == at(recv_x, _abi.BF16)
        work = {"copy_", "fill_", "zero_", "zeros", "zeros_like", "where", "clone", "float", "to", "ge", "__ge__"}
        assert not work & set(seen.names), sorted(work & set(seen.names))
        # A routing other than the dispatch's tensor: its -1 entries are masked in weights of the call's own.
        calls.clear()
        other = idx.clone()
        other[1, 0] = -1
        buffer.low_latency_combine(recv_x, other, w, handle)
        ((_, (c,)),) = calls
        applied = ctypes.cast(c.topkWeights.data, ctypes.POINTER(ctypes.c_float * 24)).contents
        assert list(applied) == torch.where(other >= 0, w, 0.0).flatten().tolist()
    finally:
        dist.destroy_process_group()


def test_the_common_dispatch_is_checked_in_line_and_anything_else_takes_the_general_path(recorded, monkeypatch):
    group, calls = recorded()
    x, idx, w = step(group, 6, 12)
    general = []
    routing_rows = nccl_group.NCCLGroup._routing_rows
    monkeypatch.setattr(nccl_group.NCCLGroup, "_routing_rows", lambda self, t: general.append(1) or routing_rows(self, t))
    wide = idx.long()
    for weights in (w, None):   # LL expert-major: weights or none, both common
        calls.clear()
        out = group.dispatch(x, wide, weights)
        ((_, (d,)),) = calls
        assert part(d.topkIdx) == at(wide, _abi.I64) and part(d.inputTokens) == at(x, _abi.BF16)
        assert part(d.topkWeights) == (None if weights is None else at(w, _abi.F32)) and out.handle.tokens == 6
    assert general == []
    for odd in (dict(x=x[:, :16]), dict(idx=idx.t().contiguous().t()), dict(w=w.double())):   # each named by the general path
        with pytest.raises(ep.InvalidArgumentError):
            group.dispatch(odd.get("x", x), odd.get("idx", idx), odd.get("w", w))
    assert len(general) == 3


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_the_common_combine_is_checked_in_line_and_anything_else_takes_the_general_path(recorded, monkeypatch, layout):
    group, calls = recorded(layout=layout)
    x, idx, w = step(group, 5, 13)
    out = group.dispatch(x, idx, w)
    checked = []
    check = nccl_group._fast.check
    monkeypatch.setattr(nccl_group._fast, "check", lambda value, name, *a, **k: checked.append(name) or check(value, name, *a, **k))
    calls.clear()
    combined = group.combine(out.expert_outputs, out.handle)
    ((_, (c,)),) = calls
    assert checked == [] and part(c.combinedTokens) == at(combined, _abi.BF16)
    assert part(c.topkWeights) == (at(w, _abi.F32) if layout == "expert_major" else None)
    with pytest.raises(ep.InvalidArgumentError, match="expert_outputs: dtype torch.float32"):
        group.combine(out.expert_outputs.float(), out.handle)
    assert checked == ["expert_outputs"]
    group.dispatch(x, idx, w)
    group.dispatch(x, idx, w)   # the group's own step twice since, into the handle's slot again: refused by the general path
    with pytest.raises(ep.InvalidUsageError, match="handle: from step 1, but the group has dispatched step 3 since"):
        group.combine(out.expert_outputs, out.handle)
    own = ep.Handle(group, ctypes.c_void_p(0x5000))   # a step of its own, whose slot two later dispatches reuse
    mine = group.dispatch(x, idx, w, handle=own)
    group.dispatch(x, idx, w)
    group.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidUsageError, match="which a later dispatch has used since"):
        group.combine(mine.expert_outputs, own)


def test_a_new_step_on_a_handle_has_none_of_the_last_steps_weights(recorded):
    group, calls = recorded()   # LL expert-major
    x, idx, w = step(group, 4, 14)
    own = ep.Handle(group, ctypes.c_void_p(0x5000))
    group.combine(group.dispatch(x, idx, w, handle=own).expert_outputs, own)
    out = group.dispatch(x, idx, None, handle=own)
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: given neither to dispatch nor to combine"):
        group.combine(out.expert_outputs, own)
    group.combine(group.dispatch(x, idx, w, handle=own).expert_outputs, own)
    group.update(idx, handle=own)   # the step started by update(), dispatched with its routing and no weights
    out = group.dispatch(x, None, None, handle=own)
    with pytest.raises(ep.InvalidArgumentError, match="topk_weights: given neither to dispatch nor to combine"):
        group.combine(out.expert_outputs, own)


def test_a_stream_of_the_wrong_kind_changes_nothing(recorded):
    # Named before the call takes a buffer slot or starts a step: the live step stays live.
    group, calls = recorded()
    group._raw = lambda stream: None if stream is None else nccl_group._fast.raw_stream(0, stream)   # the stream check
    x, idx, w = step(group, 4, 15)
    out = group.dispatch(x, idx, w)
    state = (group._next_slot, group._own_step)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match="stream: a str"):
        group.dispatch(x, idx, w, stream="cuda:0")
    assert (group._next_slot, group._own_step) == state and calls == []
    group.combine(out.expert_outputs, out.handle)   # still the group's live step


def test_backward_ht_combine_out_of_one_tensor_is_refused_not_unpacked(recorded):
    # One [2, B, hidden] tensor as the backward pass's out= was unpacked along dimension 0 into
    # (tokens, topk_weight_gradients) and refused as "out gradients: shape [4, 32]; must be [4, 4]".
    ht, calls = recorded(algorithm="ht")
    x, idx, w = step(ht, 4, 11)
    out = ht.dispatch(x, idx, w)
    calls.clear()
    with pytest.raises(ep.InvalidArgumentError, match=r"out: a Tensor; the backward pass of HT takes \(tokens, topk_weight_gradients\)"):
        ht.combine(out.expert_outputs, out.handle, direction="backward", weight_gradients=ht._slots[0].weight_grads,
                   out=torch.empty(2, 4, ht.hidden, dtype=torch.bfloat16))
    assert calls == []


def test_dispatch_and_combine_hold_the_lock_over_the_library_call_and_release_it_on_every_exit(recorded):
    """As a virtual group's (test_hazards): the common calls and the general ones hold the
    group's lock while the library runs, and have released it after they return or raise."""
    import threading

    group, calls = recorded(layout="expert_major")
    held = []
    for name in ("_fn_dispatch_stacked", "_fn_combine_stacked"):
        def probe(*arguments, call=getattr(group, name), name=name):
            held.append((name, group._lock._is_owned()))
            return call(*arguments)
        setattr(group, name, probe)
    x, idx, w = step(group, 8, 0)
    for topk_idx in (idx, idx.to(torch.int64), None):   # in line, in line, the general path (the pending step's routing)
        if topk_idx is None:
            group.update(idx)
        out = group.dispatch(x, topk_idx, w)
        assert not group._lock._is_owned()
        group.combine(out.expert_outputs, out.handle)
        group.combine(out.expert_outputs.clone(), out.handle, topk_weights=w.clone())   # (a tensor and weights of the caller's)
        assert not group._lock._is_owned()
    assert len(held) == 9 and all(owned for _, owned in held), held
    for call in (lambda: group.dispatch(x.double(), idx, w), lambda: group.combine(out.expert_outputs.double(), out.handle)):
        with pytest.raises(ep.InvalidArgumentError):
            call()
        assert not group._lock._is_owned()
    taken = []   # (another thread takes it at once: nothing left it held)
    other = threading.Thread(target=lambda: taken.append(group._lock.acquire(blocking=False) and (group._lock.release() or True)))
    other.start()
    other.join()
    assert taken == [True]


@pytest.mark.parametrize("layout", ["expert_major", "rank_major"])
def test_a_dispatch_unlike_the_cached_common_one_is_checked_again(recorded, monkeypatch, layout):
    """The common dispatch keeps the properties of the last one it took (shapes, dtypes, devices,
    contiguity; test_in_line_path_caches for a virtual group's): a call that differs in one goes
    through the full test, and the general path names it; between them the cached call is taken
    in line with its own addresses, routing type, weights or none, and token count."""
    group, calls = recorded(layout=layout)
    general = []
    routing_rows = nccl_group.NCCLGroup._routing_rows
    monkeypatch.setattr(nccl_group.NCCLGroup, "_routing_rows", lambda self, t: general.append(1) or routing_rows(self, t))
    x, idx, w = step(group, 6, 21)
    group.dispatch(x, idx, w)   # (the package learns torch's tensor type from the first tensor it sees)
    general.clear()
    odd = [dict(x=torch.randn(group.hidden, 6).to(x.dtype).t()), dict(x=x.float()), dict(idx=idx.float()), dict(idx=idx.t().contiguous().t()), dict(w=w.double()), dict(w=torch.rand(group.top_k, 6).t()),
           dict(w=w[:5]), dict(x=x[:5])]
    if layout == "rank_major":
        odd.append(dict(w=None))   # (its dispatch sends the weights: named "topk_weights: None")
    for n, bad in enumerate(odd):
        for tokens, wide, weighted in ((6, False, True), (3, True, True), (6, False, layout != "expert_major")):   # (LL: none too)
            xs, ids, ws = (x, idx, w) if tokens == 6 else step(group, tokens, 100 + n)
            ids = ids.long() if wide else ids
            calls.clear()
            out = group.dispatch(xs, ids, ws if weighted else None)
            ((_, (d,)),) = calls
            assert d.tokens == tokens and out.handle.tokens == tokens
            assert part(d.inputTokens) == at(xs, _abi.BF16) and part(d.topkIdx) == at(ids, _abi.I64 if wide else _abi.I32)
            assert part(d.topkWeights) == (at(ws, _abi.F32) if weighted else None)
        assert general == []
        calls.clear()
        with pytest.raises(ep.InvalidArgumentError):
            group.dispatch(bad.get("x", x), bad.get("idx", idx), bad.get("w", w))
        assert general == [1] and calls == []
        general.clear()
