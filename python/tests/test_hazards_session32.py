"""Hazards of session 32's probe, each now a named error (or a right answer), on the CPU backend:

- a CPU VirtualGroup took any ``multiprocessors=`` and ignored it, and the C ABI's host backend
  any ``backend.device`` and ``backend.multiprocessors`` (negative ones too, which a GPU group
  refuses): a value a GPU group refuses is now refused in its words, and any other count or
  ordinal as not applying to a group without a device;
- a stacked array of rows off an 8-byte boundary (a view at an odd element of its storage) was
  refused while the same rows given as a per-rank list were taken: a CPU group now takes both;
- DeepEP's Buffer took its unused constructor arguments with any value (a string for a flag, a
  negative or unaligned byte count), and Buffer.virtual any keyword at all;
- ``Exchange.combine`` of a Dispatched whose routing was replaced (``_replace``) by another of
  the same shape, or modified in place since the dispatch, passed silently (LL expert-major's
  backward pass then scattered the gradients by the wrong routing).
"""

import ctypes
import re

import numpy as np
import pytest
import torch

import expert_parallel as ep
from expert_parallel import _abi, _config
from expert_parallel._library import call
from test_hazards_session31 import group   # the small CPU group (f32, R 2, E 4, H 8, K 2, B 3)


def step():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    idx = torch.tensor([[[0, 1], [2, 3], [1, -1]], [[3, 2], [0, -1], [1, 2]]], dtype=torch.int32)
    w = torch.tensor([[[0.5, 0.25]] * 3] * 2)
    return x, idx, w


# -- a CPU group's device and SM count -----------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2**31, "8", 8.0])
def test_a_cpu_group_refuses_an_sm_count_a_gpu_group_refuses_in_its_words(value):
    with pytest.raises(ep.InvalidArgumentError) as cpu:
        group(multiprocessors=value)
    # A GPU group's count is checked before a device is opened: a CPU machine reaches it.
    with pytest.raises(ep.InvalidArgumentError) as gpu:
        group(multiprocessors=value, device="cuda:0")
    assert str(cpu.value) == str(gpu.value)
    assert str(cpu.value).startswith("multiprocessors=")


@pytest.mark.parametrize("value", [1, 16, 132, 2**31 - 1])
def test_a_cpu_group_refuses_an_sm_count_it_cannot_apply(value):
    # It was taken and ignored (group.multiprocessors read 0): a count past a GPU's SMs too.
    with pytest.raises(ep.InvalidArgumentError, match=rf"^multiprocessors={value}; a CPU group \(device='cpu'\) runs no kernels, "
                                                      r"so has no SMs to limit: must be None \(it applies to device='cuda:N'\)$"):
        group(multiprocessors=value)
    assert group(multiprocessors=None).multiprocessors == 0


def _create(backend_kind, **fields):
    config, _ = _config.group_config(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, algorithm="ll", layout=None,
                                     alignment=1, dtype="f32", max_recv_tokens=None, overflow="fail", timeout=10.0,
                                     fp8=None, fp8_source="quantize")
    backend = _abi.new(_abi.BackendConfig, backend=backend_kind, **fields)
    handle = ctypes.c_void_p()
    try:
        call("epGroupCreate", ctypes.byref(config), ctypes.byref(backend), ctypes.byref(handle))
    finally:
        if handle.value:
            call("epGroupDestroy", handle)


@pytest.mark.parametrize("fields,words", [
    (dict(device=-1), "device = -1; must be a CUDA device ordinal ≥ 0"),
    (dict(multiprocessors=-1), "multiprocessors = -1; must be ≥ 0 (0 = all)"),
    (dict(device=-5, multiprocessors=-1), "device = -5; must be a CUDA device ordinal ≥ 0"),
])
def test_the_c_host_backend_refuses_what_a_gpu_group_refuses_in_its_words(fields, words):
    with pytest.raises(ep.InvalidArgumentError) as host:
        _create(_abi.BACKEND_HOST, **fields)
    with pytest.raises(ep.InvalidArgumentError) as gpu:   # (checked before a device is opened)
        _create(_abi.BACKEND_VIRTUAL_GPU, **fields)
    assert str(host.value) == str(gpu.value) == "epGroupCreate: invalid argument: " + words


@pytest.mark.parametrize("fields,words", [
    (dict(device=1), "device = 1; must be 0 for epBackendHost (it uses no CUDA device; epBackendVirtualGPU takes one)"),
    (dict(multiprocessors=16), "multiprocessors = 16; must be 0 for epBackendHost (it runs no kernels, so has no SMs to "
                               "limit; epBackendVirtualGPU takes a count)"),
])
def test_the_c_host_backend_refuses_a_device_or_sm_count_it_cannot_apply(fields, words):
    with pytest.raises(ep.InvalidArgumentError) as host:
        _create(_abi.BACKEND_HOST, **fields)
    assert str(host.value) == "epGroupCreate: invalid argument: " + words
    _create(_abi.BACKEND_HOST, device=0, multiprocessors=0)


# -- stacked rows off an 8-byte boundary -----------------------------------------------------------


def _shifted(values, offset=4):
    """A copy of `values` (a torch tensor or NumPy array) in a view that starts `offset` bytes past
    an 8-byte boundary: a uint8 buffer sliced at that offset and viewed as the values' dtype."""
    if isinstance(values, torch.Tensor):
        nbytes = values.numel() * values.element_size()
        buffer = torch.zeros(nbytes + 16, dtype=torch.uint8)
        start = (offset - buffer.data_ptr()) % 8
        view = buffer[start:start + nbytes].view(values.dtype).view(values.shape)
        view.copy_(values)
        assert view.data_ptr() % 8 == offset
    else:
        buffer = np.zeros(values.nbytes + 16, np.uint8)
        start = (offset - buffer.__array_interface__["data"][0]) % 8
        view = buffer[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
        view[...] = values
        assert view.__array_interface__["data"][0] % 8 == offset
    return view


def _equal(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return bool((np.asarray(a) == np.asarray(b)).all())


LAYOUTS = [("ll", "expert_major"), ("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")]


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_stacked_rows_off_an_8_byte_boundary_are_taken_as_the_listed_ones_are(algorithm, layout, kind):
    # The stacked array was refused ("xs: address 0x...; must be a multiple of 8 bytes") while
    # list(view), the same rows, was taken: a CPU group's per-rank calls read any row.
    g = group(algorithm=algorithm, layout=layout)
    x, idx, w = step()
    if kind == "numpy":
        x, idx, w = x.numpy(), idx.numpy(), w.numpy()
    copy = (lambda a: a.copy()) if kind == "numpy" else (lambda t: t.clone())
    want = g.dispatch(x, idx, w)
    want_tokens = [copy(t) for t in want.tokens]
    want_combined = [copy(c) for c in g.combine(want.tokens, want.handle)]
    for xs in (_shifted(x), list(_shifted(x))):
        before = copy(xs[0])
        got = g.dispatch(xs, idx, w)
        assert _equal(got.tokens, want_tokens)
        assert _equal(xs[0], before)   # (nothing the caller passed is written)
        outputs = _shifted(np.stack(got.tokens) if kind == "numpy" else torch.stack(got.tokens))
        assert _equal(g.combine(outputs, got.handle), want_combined)
        assert _equal(g.combine(list(outputs), got.handle), want_combined)


@pytest.mark.parametrize("algorithm,layout", LAYOUTS)
def test_stacked_out_arrays_off_an_8_byte_boundary_are_written_as_listed_ones_are(algorithm, layout):
    g = group(algorithm=algorithm, layout=layout)
    x, idx, w = step()
    want = g.dispatch(x, idx, w)
    want_tokens = torch.stack(want.tokens).clone()
    want_combined = torch.stack(g.combine(want.tokens, want.handle)).clone()
    routing = g.recv_routing_shape

    def out():
        tokens = _shifted(torch.zeros((2,) + g.recv_shape))   # (rows outside the received zones are left as they are)
        if routing is None:
            return tokens, None, None
        return tokens, torch.zeros((2,) + routing, dtype=torch.int32), torch.zeros((2,) + routing)

    for stacked in (True, False):
        into = out()
        given = into if stacked else tuple(None if t is None else list(t) for t in into)
        got = g.dispatch(x, idx, w, out=given)
        assert torch.equal(into[0], want_tokens)
        combined = _shifted(torch.full((2, 3, 8), 7.0))
        result = g.combine(into[0], got.handle, out=combined if stacked else list(combined))
        assert torch.equal(combined, want_combined)
        assert all(r.data_ptr() == combined[i].data_ptr() for i, r in enumerate(result))


def test_stacked_rows_at_every_offset_of_a_word_are_taken():
    # bf16 rows at 2, 4 and 6 bytes past a boundary (the fast path of three torch tensors, too).
    g = group(dtype="bf16")
    x, idx, w = step()
    x = x.to(torch.bfloat16)
    sent = g.dispatch(x, idx, w)
    want = torch.stack(g.combine(sent.tokens, sent.handle)).clone()
    for offset in (2, 4, 6):
        sent = g.dispatch(_shifted(x, offset), idx, w)
        assert torch.equal(torch.stack(g.combine(_shifted(torch.stack(sent.tokens), offset), sent.handle)), want)


# -- DeepEP's Buffer: its unused constructor arguments ---------------------------------------------


BAD_SETTINGS = [
    (dict(num_nvl_bytes=-128), r"^num_nvl_bytes=-128; must be in \[0, 34359738351\]$"),
    (dict(num_rdma_bytes="1024"), r"^num_rdma_bytes='1024'; must be an integer$"),
    (dict(num_nvl_bytes=1.5e6), r"^num_nvl_bytes=1500000.0; must be an integer$"),
    (dict(num_rdma_bytes=1000), r"^num_rdma_bytes=1000; must be a multiple of 128 bytes \(DeepEP's NUM_BUFFER_ALIGNMENT_BYTES\)$"),
    (dict(num_nvl_bytes=16 * (2**31 - 1)), r"^num_nvl_bytes=34359738352; must be in \[0, 34359738351\]$"),
    (dict(low_latency_mode="yes"), r"^low_latency_mode='yes' \(type str\); must be a bool$"),
    (dict(low_latency_mode=2), r"^low_latency_mode=2 \(type int\); must be a bool$"),
    (dict(explicitly_destroy="false"), r"^explicitly_destroy='false' \(type str\); must be a bool$"),
    (dict(enable_shrink=None), r"^enable_shrink=None \(type NoneType\); must be a bool$"),
    (dict(use_fabric=[]), r"^use_fabric=\[\] \(type list\); must be a bool$"),
    (dict(allow_mnnvl="no"), r"^allow_mnnvl='no' \(type str\); must be a bool$"),
    (dict(allow_nvlink_for_low_latency_mode=0.0), r"^allow_nvlink_for_low_latency_mode=0.0 \(type float\); must be a bool$"),
    (dict(num_qps_per_rank=-1), r"^num_qps_per_rank=-1; must be in \[0, 2147483647\]$"),
    (dict(num_qps_per_rank="24"), r"^num_qps_per_rank='24'; must be an integer$"),
    (dict(num_qps_per_rank=0, low_latency_mode=True),
     r"^num_qps_per_rank=0; must be ≥ 1 with low_latency_mode=True \(DeepEP's queue pairs per rank\)$"),
]

GOOD_SETTINGS = [
    dict(num_nvl_bytes=1 << 30, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24),
    dict(num_nvl_bytes=0, num_rdma_bytes=np.int64(1 << 28), low_latency_mode=1, num_qps_per_rank=np.int32(4)),
    dict(num_nvl_bytes=128, num_qps_per_rank=0, allow_nvlink_for_low_latency_mode=np.bool_(False), allow_mnnvl=True, use_fabric=0,
         explicitly_destroy=True, enable_shrink=False),
]


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('gloo')}/store", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("settings,match", BAD_SETTINGS)
def test_a_deep_ep_buffers_unused_argument_of_a_wrong_kind_or_range_is_named(settings, match, one_process_group):
    from expert_parallel.compat.deep_ep import Buffer

    with pytest.raises(ep.InvalidArgumentError, match=match):
        Buffer(one_process_group, device="cpu", **settings)
    with pytest.raises(ep.InvalidArgumentError, match=match):
        Buffer.virtual(2, **settings)


@pytest.mark.parametrize("settings", GOOD_SETTINGS)
def test_a_deep_ep_buffer_takes_every_value_deep_ep_takes(settings, one_process_group):
    from expert_parallel.compat.deep_ep import Buffer

    buffer = Buffer(one_process_group, device="cpu", **settings)
    assert (buffer.num_nvl_bytes, buffer.num_rdma_bytes) == (settings.get("num_nvl_bytes", 0), settings.get("num_rdma_bytes", 0))
    buffer.destroy()
    for buffer in Buffer.virtual(2, **settings):
        buffer.destroy()


@pytest.mark.parametrize("hidden", [100, 7168])
def test_the_low_latency_size_hint_is_a_byte_count_the_buffer_takes(hidden):
    # The hint was rows × hidden × 2 bytes exactly, off DeepEP's 128-byte alignment for an odd
    # hidden size, so the Buffer refused its own hint; DeepEP rounds its hint up, as the adapter now does.
    from expert_parallel.compat.deep_ep import Buffer

    hint = Buffer.get_low_latency_rdma_size_hint(3, hidden, 2, 4)
    exact = 2 * (4 * 3 * hidden * 2 + 3 * hidden * 2)
    assert hint % 128 == 0 and exact <= hint < exact + 128
    for buffer in Buffer.virtual(2, num_rdma_bytes=hint, low_latency_mode=True):
        assert buffer.num_rdma_bytes == hint
        buffer.destroy()


def test_buffer_virtual_names_a_keyword_buffer_does_not_take():
    # **ignored took any keyword: a misspelt one (num_nvl_byte) was ignored.
    from expert_parallel.compat.deep_ep import Buffer, NotSupportedError

    with pytest.raises(ep.InvalidArgumentError, match=r"^Buffer.virtual\(\) got an unexpected keyword argument 'num_nvl_byte'; it "
                                                      r"takes ranks, device, timeout and Buffer's constructor keywords \("):
        Buffer.virtual(2, num_nvl_byte=1 << 20)
    with pytest.raises(TypeError):   # (InvalidArgumentError is a TypeError too, as Python's own refusal is)
        Buffer.virtual(2, lowlatency_mode=True)
    with pytest.raises(NotSupportedError, match=r"^comm=3: not supported yet"):
        Buffer.virtual(2, comm=3)
    with pytest.raises(ep.InvalidArgumentError, match=r"^max_tokens_per_rank=0; must be in \[1, 2147483647\]$"):
        Buffer.virtual(2, max_tokens_per_rank=0)
    for buffer in Buffer.virtual(2, group=None, comm=None, max_tokens_per_rank=64, num_qps_per_rank=8):
        buffer.destroy()


# -- expert_parallel.torch: a Dispatched whose routing is not its step's ---------------------------


ROUTING = r"^dispatched.routing \(the combine op's topk_idx\): "


def _exchange(layout):
    from expert_parallel.torch import Exchange

    return Exchange(group(algorithm="ll" if layout in ("expert_major", "rank_major") else "ht", layout=layout))


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
def test_a_combine_of_another_routing_of_the_same_shape_is_named(layout):
    # _replace(routing=...) with another step's routing of the same B passed silently (LL
    # expert-major's backward pass then scattered the weights' gradients by it).
    exchange = _exchange(layout)
    x, idx, w = step()
    sent = exchange.dispatch(x, idx, w)
    other = exchange.dispatch(x, idx.flip(-1).contiguous(), w)
    with pytest.raises(ep.InvalidArgumentError, match=ROUTING + r"another tensor than the topk_idx the step of dispatched.step "
                       r"was dispatched with, and another routing \(at \[0, 0, 0\]: expert 1, not 0\); pass the routing of "
                       r"that step's dispatch \(a Dispatched as its dispatch returned it\)$"):
        exchange.combine(sent.tokens, sent._replace(routing=other.routing))
    # A copy of the step's own routing is the same routing (compared on the CPU), in another dtype too.
    want = exchange.combine(sent.tokens, sent)
    assert torch.equal(exchange.combine(sent.tokens, sent._replace(routing=idx.clone())), want)
    assert torch.equal(exchange.combine(sent.tokens, sent._replace(routing=idx.long())), want)
    assert torch.equal(exchange.combine(other.tokens, other), exchange.combine(other.tokens, other))


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
def test_a_combine_of_a_routing_changed_in_place_since_its_dispatch_is_named(layout):
    exchange = _exchange(layout)
    x, idx, w = step()
    sent = exchange.dispatch(x, idx, w)
    idx[0, 0] = idx[0, 0].flip(0)
    with pytest.raises(ep.InvalidArgumentError, match=ROUTING + r"changed in place since the step's dispatch \(its version "
                       r"counter went from 0 to 1\); the step's rows went by the routing as it was"):
        exchange.combine(sent.tokens, sent)
    # Its copy then cannot be compared with what the step went by.
    with pytest.raises(ep.InvalidArgumentError, match=ROUTING + r"another tensor \(at 0x[0-9a-f]+ on cpu\) than the topk_idx "
                       r"the step of dispatched.step was dispatched with \(at 0x[0-9a-f]+ on cpu\); that one was changed in "
                       r"place since"):
        exchange.combine(sent.tokens, sent._replace(routing=idx.clone()))
    again = exchange.dispatch(x, idx, w)
    exchange.combine(again.tokens, again)


def test_a_routing_view_of_the_same_memory_is_the_steps_routing():
    # (What a compiled graph may pass for the same tensor: a view of it, another object.)
    exchange = _exchange("expert_major")
    x, idx, w = step()
    sent = exchange.dispatch(x, idx, w)
    assert torch.equal(exchange.combine(sent.tokens, sent._replace(routing=idx.view(2, 3, 2))), exchange.combine(sent.tokens, sent))


def test_the_wrong_routings_gradients_are_not_computed():
    # LL expert-major: the weights' gradients went by the routing combine was given.
    exchange = _exchange("expert_major")
    x, idx, w = step()
    w.requires_grad_(True)
    sent = exchange.dispatch(x, idx, w)
    shuffled = idx[:, [1, 2, 0]].contiguous()
    with pytest.raises(ep.InvalidArgumentError, match=ROUTING + "another tensor"):
        exchange.combine(sent.tokens, sent._replace(routing=shuffled)).sum().backward()
    exchange.combine(sent.tokens, sent).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("shrunk", ["passed", "the_steps"])
def test_a_routing_whose_storage_was_shrunk_is_named_not_compared(shrunk):
    # The comparison of another CPU routing with the step's read both by torch.equal: a storage shrunk
    # since (untyped_storage().resize_()) was read past its end (resize_(0): a segmentation fault).
    exchange = _exchange("rank_major")
    x, idx, w = step()
    sent = exchange.dispatch(x, idx, w)
    copy = idx.clone()
    if shrunk == "passed":
        copy.untyped_storage().resize_(4)
        match = ROUTING + r"storage of 4 bytes; must hold the 48 bytes its elements reach"
    else:
        idx.untyped_storage().resize_(4)
        match = (ROUTING + r"another tensor \(at 0x[0-9a-f]+ on cpu\) than the topk_idx the step of dispatched.step was "
                 r"dispatched with \(at 0x[0-9a-f]+ on cpu\); that one's storage was shrunk since")
    with pytest.raises(ep.InvalidArgumentError, match=match):
        exchange.combine(sent.tokens, sent._replace(routing=copy))


@pytest.mark.skipif(__import__("os").environ.get("EP_GPU_TESTS") != "1", reason="needs a GPU: set EP_GPU_TESTS=1")
@pytest.mark.parametrize("layout", ["expert_major", "flat"])
def test_on_a_gpu_a_copy_of_the_routing_is_taken_and_a_change_in_place_is_named(layout):
    # On a GPU another tensor's entries are not compared (that would wait for the device): a copy of
    # the step's routing (a clone, what a saved-tensor hook restores) is taken as it was before the
    # check; the same tensor changed in place since the dispatch is refused, as on the CPU.
    from expert_parallel.torch import Exchange

    exchange = Exchange(group(algorithm="ll" if layout == "expert_major" else "ht", layout=layout, device="cuda:0"))
    x, idx, w = (t.cuda() for t in step())
    sent = exchange.dispatch(x, idx, w)
    want = exchange.combine(sent.tokens, sent)
    assert torch.equal(exchange.combine(sent.tokens, sent._replace(routing=idx.clone())), want)
    idx[0, 0] = idx[0, 0].flip(0)
    with pytest.raises(ep.InvalidArgumentError, match=ROUTING + r"changed in place since the step's dispatch"):
        exchange.combine(sent.tokens, sent)
