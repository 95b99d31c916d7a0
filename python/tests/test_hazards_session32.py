"""Hazards of session 32's probe, each now a named error (or a right answer), on the CPU backend:

- a CPU VirtualGroup took any ``multiprocessors=`` and ignored it, and the C ABI's host backend
  any ``backend.device`` and ``backend.multiprocessors`` (negative ones too, which a GPU group
  refuses): a value a GPU group refuses is now refused in its words, and any other count or
  ordinal as not applying to a group without a device.
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
