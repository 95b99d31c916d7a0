"""Hazards of session 32's probe, each now a named error (or a right answer), on the CPU backend:

- a CPU VirtualGroup took any ``multiprocessors=`` and ignored it, and the C ABI's host backend
  any ``backend.device`` and ``backend.multiprocessors`` (negative ones too, which a GPU group
  refuses): a value a GPU group refuses is now refused in its words, and any other count or
  ordinal as not applying to a group without a device;
- a stacked array of rows off an 8-byte boundary (a view at an odd element of its storage) was
  refused while the same rows given as a per-rank list were taken: a CPU group now takes both.
"""

import ctypes
import re

import numpy as np
import pytest
import torch

import expert_parallel as ep
from expert_parallel import _abi, _config
from expert_parallel._library import call


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


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
