"""Hazards of session 31's probe, each now a named error (or a right answer), on the CPU backend:

- the C library's names of the structs a group's creation fills (``ncclRank.initTimeoutSeconds``,
  ``ncclRank.rank``, ``tuning.pipelineDepth``, ``backend.multiprocessors``) reached NCCLGroup's
  and VirtualGroup's errors, where the caller passed ``init_timeout=``, ``rank=``, ``tuning=``;
- so did the data-path call structs' names of the tensors (``call.inputTokens``,
  ``call.receivedTokens.data``, ``outputs[0].tokens``, ``call.combinedTokens``), in the errors
  of overlapping or unaligned tensors, where the caller passed ``xs``, ``out=`` or the group's
  own buffers; an unaligned NumPy array was described in torch's words (``data_ptr()``, ``.clone()``);
- ``Exchange.combine`` of a Dispatched whose routing is another step's named ``out``;
- a rank masked through the raw C ABI went unseen by the torch ops (uninitialised rows, no error);
  polling active_ranks on a masked group moved the mask counter at every call (every group's ops
  then read their masks);
- None as a process's first tensor, sparse and nested tensors, raised AttributeError /
  RuntimeError / NotImplementedError from the data path, the torch ops and DeepEP's Buffer; the
  ops refused rows off an 8-byte boundary naming the group's ``xs``;
- DeepEP's Buffer: ``out`` over ``x`` named in the group's words, unused arguments of any kind,
  events that are not (torch's AssertionError; a MagicMock looped forever; a chain of exactly 8
  wrappers was refused as more than 8 deep), process groups that are not (torch's ValueError);
- a closed group's Exchange, ``deactivate``'s bounds, the bench's ``--json`` folder, a library
  file that is not the library (OSError / AttributeError) and one whose dependency is missing
  (reported as not the library), rank 0's relayed error as a tuple, and
  the ops called directly with a meta input (uninitialised outputs) or wrong backward arguments.
"""

import contextlib
import gc
import os
import re

import numpy as np
import pytest
import torch

import expert_parallel as ep
from expert_parallel import errors as _errors
from expert_parallel.errors import python_names

# The C field names no Python-facing message may carry.
C_FIELDS = re.compile(r"ncclRank|backend\.|initTimeoutSeconds|pipelineDepth|rowPieces|blocksPerMultiprocessor|config\.ranks"
                      r"|call\.\w|inputTokens|receivedTokens|combinedTokens|receivedTopk|topkWeightGradients|\.data\b"
                      r"|(?<!_)outputs\[\d\]|(?<!_)inputs\[\d\]|expertOutputs")


def nccl(**overrides):
    settings = dict(experts=4, hidden=8, top_k=2, max_tokens=2, rank=0, ranks=2, unique_id=bytes(128), device=0)
    settings.update(overrides)
    return ep.NCCLGroup(**settings)


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def step():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    idx = torch.tensor([[[0, 1], [2, 3], [1, -1]]] * 2, dtype=torch.int32)
    w = torch.full((2, 3, 2), 0.5)
    return x, idx, w


def refused(body, match):
    with pytest.raises(ep.InvalidArgumentError, match=match) as caught:
        body()
    text = str(caught.value)
    assert not C_FIELDS.search(text), text
    return text


# -- a group's creation: the keywords, not ncclRank's or epGPUTuning_t's fields ------------------


@pytest.mark.parametrize("overrides,match", [
    (dict(init_timeout=2e6), r"invalid argument: init_timeout = 2000000.0; must be in \(0, 1e6\]"),
    (dict(init_timeout=float("nan")), r"invalid argument: init_timeout = nan; must be in \(0, 1e6\]"),
    (dict(rank=5), r"invalid argument: rank = 5; must be in 0..<2 \(ranks\)"),
    (dict(tuning={"pipeline_depth": 9}), r"invalid argument: tuning\['pipeline_depth'\] = 9; must be in 1...8"),
    (dict(tuning={"rows_in_flight": 17}), r"invalid argument: tuning\['rows_in_flight'\] = 17; must be in 1...16"),
    (dict(tuning={"row_pieces": 1000}), r"invalid argument: tuning\['row_pieces'\] = 1000; must be in 1..."),
    (dict(tuning={"blocks_per_multiprocessor": 3}), r"invalid argument: tuning\['blocks_per_multiprocessor'\] = 3; must be 1 or 2"),
])
def test_an_nccl_groups_creation_names_the_keyword_not_the_c_field(overrides, match):
    refused(lambda: nccl(**overrides), match)


@pytest.mark.parametrize("c,python", [
    ("backend.device = -1; must be a CUDA device ordinal ≥ 0", "device = -1; must be a CUDA device ordinal ≥ 0"),
    ("backend.multiprocessors = -1; must be ≥ 0 (0 = all)", "multiprocessors = -1; must be ≥ 0 (0 = all)"),
    ("backend.tuning.rowPieces = -1; must be ≥ 0", "tuning['row_pieces'] = -1; must be ≥ 0"),
    ("ncclRank.tuning.updateChunkTokens = -1", "tuning['update_chunk_tokens'] = -1"),
    ("tuning.rowPieces = 99; must be ≤ 8 with maxTokensPerRank 4", "tuning['row_pieces'] = 99; must be ≤ 8 with max_tokens 4"),
    ("tuning.launchGrid = 3; must be 0, 1 or 2", "tuning['full_grid'] = 3; must be 0, 1 or 2"),
    ("ncclRank.device = -1", "device = -1"),
])
def test_the_creation_structs_fields_read_as_the_keywords(c, python):
    # (The GPU group's own checks: a CPU machine reaches only the NCCL rank's, above.)
    assert python_names(c) == python


# -- the data path: the caller's arguments, not the call structs' fields ----------------------------


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
def test_an_input_that_overlaps_an_output_is_named_as_passed(layout):
    g = group(algorithm="ll" if layout in ("expert_major", "rank_major") else "ht", layout=layout)
    x, idx, w = step()
    shape, routing = (2,) + g.recv_shape, g.recv_routing_shape

    def outputs():
        if routing is None:
            return torch.zeros(shape), None, None
        return torch.zeros(shape), torch.zeros((2,) + routing, dtype=torch.int32), torch.zeros((2,) + routing)

    out = outputs()
    inside = out[0].view(-1)[:48].view(2, 3, 8)   # xs: the first rows of out's tokens
    refused(lambda: g.dispatch(inside, idx, w, out=out),
            r"epGroupDispatchStacked: invalid argument: out tokens = rank 0's part at 0x[0-9a-f]+ \(\d+ bytes\); must not overlap "
            r"xs \(rank 0's part")
    refused(lambda: g.dispatch(list(inside), list(idx), list(w), out=tuple(None if t is None else list(t) for t in out)),
            r"epGroupDispatchAll: rank 0: invalid argument: out tokens\[0\] = 0x[0-9a-f]+ \(\d+ bytes\); must not overlap xs\[0\]")
    if routing is not None:
        refused(lambda: g.dispatch(x, out[1].view(-1)[:12].view(2, 3, 2), w, out=out),
                r"invalid argument: out topk_idx = .*; must not overlap topk_idx \(")
        refused(lambda: g.dispatch(x, idx, out[2].view(-1)[:12].view(2, 3, 2), out=out),
                r"invalid argument: out topk_weights = .*; must not overlap topk_weights \(")
    sent = g.dispatch(x, idx, w)
    expert_outputs = torch.zeros(shape)
    first_rows = expert_outputs.view(-1)[:48].view(2, 3, 8)
    refused(lambda: g.combine(expert_outputs, sent.handle, out=first_rows),
            r"epGroupCombineStacked: invalid argument: out = rank 0's part at .*; must not overlap expert_outputs \(")
    refused(lambda: g.combine(list(expert_outputs), sent.handle, out=list(first_rows)),
            r"epGroupCombineAll: rank 0: invalid argument: out\[0\] = .*; must not overlap expert_outputs\[0\] \(")
    if g.algorithm == "ht":
        both = torch.zeros(100)
        refused(lambda: g.combine(expert_outputs, sent.handle, direction="backward", weight_gradients=torch.zeros((2,) + routing),
                                  out=(both[:48].view(2, 3, 8), both[:12].view(2, 3, 2))),
                r"invalid argument: out = .*; must not overlap out gradients \(")


def test_an_input_in_the_groups_own_buffer_slot_is_named_with_the_slot():
    # xs given as views of the last dispatch's received rows, in the slot this dispatch writes.
    g = group(layout="rank_major", buffer_slots=1)
    x, idx, w = step()
    sent = g.dispatch(x, idx, w)
    rows = [sent.tokens[r][0] for r in range(2)]
    refused(lambda: g.dispatch(rows, list(idx), list(w)),
            r"rank 0: invalid argument: the group's received tokens\[0\] \(its buffer slot, where this call writes\) = .*; "
            r"must not overlap xs\[0\]")
    sent = g.dispatch(x, idx, w)
    refused(lambda: g.combine(sent.tokens, sent.handle, out=[t[0] for t in sent.tokens]),
            r"rank 0: invalid argument: out\[0\] = .*; must not overlap expert_outputs\[0\]")


# The library's stacked calls refuse rows off an 8-byte boundary (a GPU group's kernels read rows
# in 8-byte words; a CPU group takes such an array through its per-rank calls since session 32):
# the words a group's method raises for the library's message, per call and argument.
UNALIGNED = [
    ("epGroupDispatchStacked: invalid argument: call.inputTokens.data = 94437632650436; must be a multiple of 8 bytes",
     (_errors.DISPATCH_XS, _errors.DISPATCH_SLOT), "epGroupDispatchStacked: invalid argument: xs: "),
    ("epGroupCombineStacked: invalid argument: call.expertOutputs.data = 94437635165060; must be a multiple of 8 bytes",
     (_errors.COMBINE_SLOT,), "epGroupCombineStacked: invalid argument: expert_outputs: "),
    ("epGroupCombineStacked: invalid argument: call.combinedTokens.data = 94437636601028; must be a multiple of 8 bytes",
     (_errors.COMBINE_OUT,), "epGroupCombineStacked: invalid argument: out: "),
]


def _named(message, fields, kind):
    table = {key: name for part in fields for key, name in part.items()}
    text = _errors.argument_names(_errors.call_names(message, table, kind))
    assert not C_FIELDS.search(text), text
    return text


@pytest.mark.parametrize("message,fields,start", UNALIGNED)
def test_a_stacked_array_off_its_8_byte_alignment_is_named_with_its_address(message, fields, start):
    address = int(re.search(r"= (\d+);", message).group(1))
    assert _named(message, fields, "torch") == (
        f"{start}data_ptr() = {address:#x}; must be a multiple of 8 bytes (a view that starts inside an element group of "
        "its storage: pass a copy, .clone())")


@pytest.mark.parametrize("message,fields,start", UNALIGNED)
def test_a_stacked_numpy_array_off_its_8_byte_alignment_is_named_in_numpys_words(message, fields, start):
    # The message assumed a torch tensor ("data_ptr() = ...; pass a copy, .clone()") for NumPy arrays too.
    address = int(re.search(r"= (\d+);", message).group(1))
    text = _named(message, fields, "numpy")
    assert text == (f"{start}address {address:#x} (__array_interface__['data'][0]); must be a multiple of 8 bytes (a view "
                    "that starts inside an element group of its storage: pass a copy, .copy())")
    assert "data_ptr" not in text and "clone" not in text, text


# -- expert_parallel.torch: a Dispatched whose routing is another step's -----------------------------


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
def test_a_combine_of_another_steps_routing_names_the_routing_not_out(layout):
    from expert_parallel.torch import Exchange

    g = group(algorithm="ll" if layout in ("expert_major", "rank_major") else "ht", layout=layout)
    exchange = Exchange(g)
    x, idx, w = step()
    three = exchange.dispatch(x, idx, w)
    two = exchange.dispatch(x[:, :2].contiguous(), idx[:, :2].contiguous(), w[:, :2].contiguous())
    match = (r"^dispatched.routing \(the combine op's topk_idx\): shape \[2, 2, 2\], 2 tokens per rank; the step of "
             r"dispatched.step dispatched 3: pass the routing of that step's dispatch")
    # (It was refused as "out: shape [2, 2, 8]; must be [2, 3, 8]", an argument the caller never passed.)
    refused(lambda: exchange.combine(three.tokens, three._replace(routing=two.routing)), match)
    # LL expert-major's weights of that other step too: still the routing (it was "topk_weights: ... as topk_idx").
    refused(lambda: exchange.combine(three.tokens, three._replace(routing=two.routing, weights=two.weights)), match)
    refused(lambda: exchange.combine(two.tokens, two._replace(routing=three.routing)), match.replace("2, 2, 2", "2, 3, 2")
            .replace("2 tokens", "3 tokens").replace("dispatched 3", "dispatched 2"))
    assert exchange.combine(three.tokens, three).shape == (2, 3, 8)


# -- the active-rank mask: a rank masked past the package --------------------------------------------


def test_a_rank_masked_through_the_raw_c_abi_is_refused_by_the_torch_ops():
    # The ops read the mask only once the package's counter of mask changes moved: a rank masked
    # by epGroupDeactivateRank called directly went unseen, and the combine returned rank 1's
    # rows uninitialised (3e38 and the like) with no error.
    from expert_parallel import _library
    from expert_parallel.torch import Exchange

    g = group(layout="rank_major")
    exchange = Exchange(g)
    x, idx, w = step()
    before = exchange.dispatch(x, idx, w)
    expected = exchange.combine(before.tokens, before)
    sent = exchange.dispatch(x, idx, w)
    assert _library.load().epGroupDeactivateRank(g._group, 1) == 0
    with pytest.raises(ep.InactiveRankError, match=r"^group: rank\(s\) \[1\] masked inactive"):
        exchange.combine(sent.tokens, sent)
    with pytest.raises(ep.InactiveRankError, match=r"^group: rank\(s\) \[1\] masked inactive"):
        exchange.dispatch(x, idx, w)
    g.clean()
    again = exchange.dispatch(x, idx, w)
    assert torch.equal(exchange.combine(again.tokens, again), expected)


def test_a_masked_rank_that_active_ranks_reports_moves_the_mask_counter():
    # (A GPU group's torch ops read the mask only once the counter moved: a rank that timed out
    # on the device, or one masked through the raw C ABI, is seen from the first active_ranks
    # that reports it.)
    from expert_parallel import _library

    g = group()
    before = _library.mask_changes
    assert g.active_ranks == [0, 1] and _library.mask_changes == before
    assert _library.load().epGroupDeactivateRank(g._group, 0) == 0
    assert _library.mask_changes == before
    assert g.active_ranks == [1]
    assert _library.mask_changes == before + 1


def test_polling_a_masked_groups_active_ranks_moves_the_mask_counter_once_per_mask():
    # Every active_ranks that saw a masked rank moved the counter, which every group's torch ops
    # compare: polling a degraded group made an unrelated GPU group's ops read their mask (a
    # synchronisation) at every call.
    from expert_parallel import _library

    g = group(ranks=4, experts=8)
    assert _library.load().epGroupDeactivateRank(g._group, 0) == 0
    before = _library.mask_changes
    assert g.active_ranks == [1, 2, 3] and _library.mask_changes == before + 1
    for _ in range(5):
        assert g.active_ranks == [1, 2, 3]
    assert _library.mask_changes == before + 1
    # Another mask moves it again (once), a mask met again after every rank was found active too.
    assert _library.load().epGroupDeactivateRank(g._group, 2) == 0
    assert g.active_ranks == [1, 3] and g.active_ranks == [1, 3] and _library.mask_changes == before + 2
    g.clean()
    assert g.active_ranks == [0, 1, 2, 3] and _library.mask_changes == before + 2
    assert _library.load().epGroupDeactivateRank(g._group, 2) == 0
    assert g.active_ranks == [0, 1, 3] and _library.mask_changes == before + 3
    # deactivate moves it itself, once: active_ranks then reports the mask it set.
    g.deactivate(1)
    assert _library.mask_changes == before + 4
    assert g.active_ranks == [0, 3] and _library.mask_changes == before + 4
    # clean([1]) leaves rank 2 masked: a mask this group knows.
    g.clean([1])
    assert g.active_ranks == [0, 1, 3] and _library.mask_changes == before + 4
    # Another group's poll does not move it for this one's mask.
    other = group(ranks=4, experts=8)
    assert other.active_ranks == [0, 1, 2, 3] and _library.mask_changes == before + 4


# -- a None before any tensor; sparse and nested tensors ----------------------------------------------


def test_a_none_as_the_first_tensor_a_process_passes_is_named():
    # Before the package had seen a torch tensor its in-line type check compared with type(None),
    # which None has: dispatch(None, ...) as a process's first call took None for a tensor and
    # raised AttributeError ('NoneType' object has no attribute 'data_ptr').
    import os
    import subprocess
    import sys
    from pathlib import Path

    program = ("import numpy as np, expert_parallel as ep\n"
               "g = ep.VirtualGroup(2, 4, 8, 2, 3, dtype='f32')\n"
               "try:\n"
               "    g.dispatch(None, np.zeros((2, 3, 2), np.int32), np.zeros((2, 3, 2), np.float32))\n"
               "except ep.InvalidArgumentError as error:\n"
               "    print(error)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(ep.__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("xs: a NoneType; must be a list of 2 per-rank arrays or one [R, ...] array"), run.stdout


def _sparse(kind, shape, dtype=torch.float32):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = torch.ones(shape, dtype=torch.float32)
        if kind == "coo":
            return dense.to_sparse().to(dtype)
        if kind == "csr":
            return dense.reshape(-1, shape[-1]).to_sparse_csr().to(dtype)
        return torch.nested.nested_tensor(list(dense.to(dtype)))


LAYOUT_MESSAGE = r"(layout torch.sparse_(coo|csr); must be a dense \(torch.strided\) tensor: pass .to_dense\(\)|a nested tensor; must be a dense)"


@pytest.mark.parametrize("kind", ["coo", "csr", "nested"])
@pytest.mark.parametrize("layout", ["expert_major", "flat"])
def test_a_sparse_or_nested_tensor_is_named_not_torchs_runtime_error(kind, layout):
    # Sparse tensors have no storage (data_ptr() raises), CSR ones no is_contiguous(), nested
    # ones no sizes: torch's RuntimeError came out of the data path's in-line checks.
    g = group(algorithm="ll" if layout == "expert_major" else "ht", layout=layout)
    x, idx, w = step()
    refused(lambda: g.dispatch(_sparse(kind, (2, 3, 8)), idx, w), r"^xs(\[0\])?: " + LAYOUT_MESSAGE)
    refused(lambda: g.dispatch(x, _sparse(kind, (2, 3, 2), torch.int32), w), r"^topk_idx(\[0\])?: " + LAYOUT_MESSAGE)
    refused(lambda: g.dispatch(x, idx, _sparse(kind, (2, 3, 2))), r"^topk_weights(\[0\])?: " + LAYOUT_MESSAGE)
    refused(lambda: g.dispatch([_sparse(kind, (3, 8)), x[1]], list(idx), list(w)), r"^xs\[0\]: " + LAYOUT_MESSAGE)
    sent = g.dispatch(x, idx, w)
    shape = (2,) + g.recv_shape
    refused(lambda: g.combine(_sparse(kind, shape), sent.handle), r"^expert_outputs(\[0\])?: " + LAYOUT_MESSAGE)
    refused(lambda: g.combine(torch.zeros(shape), sent.handle, out=_sparse(kind, (2, 3, 8))), r"^out(\[0\])?: " + LAYOUT_MESSAGE)


@pytest.mark.parametrize("kind", ["coo", "csr", "nested"])
def test_an_nccl_groups_sparse_or_nested_tensor_is_named(kind):
    import ctypes

    from expert_parallel import _abi
    from test_nccl_group_calls import cpu_rank_group

    model = ep.VirtualGroup(ranks=4, experts=16, hidden=32, top_k=4, max_tokens=8, dtype="bf16", algorithm="ht", device="cpu")
    g = cpu_rank_group(model, lambda name: lambda *addresses: _abi.SUCCESS)
    model.close()
    x, idx, w = torch.zeros(3, 32, dtype=torch.bfloat16), torch.tensor([[0, 1, 2, 3]] * 3, dtype=torch.int32), torch.rand(3, 4)
    refused(lambda: g.dispatch(_sparse(kind, (3, 32), torch.bfloat16), idx, w), r"^x: " + LAYOUT_MESSAGE)
    refused(lambda: g.dispatch(x, _sparse(kind, (3, 4), torch.int32), w), r"^topk_idx: " + LAYOUT_MESSAGE)
    refused(lambda: g.dispatch(x, idx, _sparse(kind, (3, 4))), r"^topk_weights: " + LAYOUT_MESSAGE)
    sent = g.dispatch(x, idx, w)
    refused(lambda: g.combine(_sparse(kind, g.recv_shape, torch.bfloat16), sent.handle), r"^expert_outputs: " + LAYOUT_MESSAGE)
    refused(lambda: g.combine(sent.expert_outputs, sent.handle, out=_sparse(kind, (3, 32), torch.bfloat16)), r"^out: " + LAYOUT_MESSAGE)


# -- expert_parallel.torch: sparse or nested tensors; rows off an 8-byte boundary -------------------


@pytest.mark.parametrize("kind", ["coo", "csr", "nested"])
def test_the_exchanges_sparse_or_nested_tensors_are_named(kind):
    # A nested tensor reached the ops' dispatcher (NotImplementedError: no NestedTensorCPU
    # kernel), a sparse one contiguous() (RuntimeError), a nested step token or routing their
    # shape (RuntimeError).
    from expert_parallel.torch import Exchange

    exchange = Exchange(group(algorithm="ht", layout="expert_major_padded"))
    x, idx, w = step()
    dense = r"; must be a dense \(torch.strided\) torch.Tensor"
    what = "a nested tensor" if kind == "nested" else r"a tensor of layout torch.sparse_(coo|csr)"
    refused(lambda: exchange.dispatch(_sparse(kind, (2, 3, 8)), idx, w), rf"^x: {what}{dense}")
    refused(lambda: exchange.dispatch(x, _sparse(kind, (2, 3, 2), torch.int32), w), rf"^topk_idx: {what}{dense}")
    refused(lambda: exchange.dispatch(x, idx, _sparse(kind, (2, 3, 2))), rf"^topk_weights: {what}{dense}")
    sent = exchange.dispatch(x, idx, w)
    refused(lambda: exchange.combine(_sparse(kind, tuple(sent.tokens.shape)), sent), rf"^expert_outputs: {what}{dense}")
    refused(lambda: exchange.combine(sent.tokens, sent._replace(routing=_sparse(kind, (2, 3, 2), torch.int32))),
            rf"^dispatched.routing: {what}{dense}")
    refused(lambda: exchange.combine(sent.tokens, sent._replace(topk_weights=_sparse(kind, tuple(sent.topk_weights.shape)))),
            rf"^dispatched.topk_weights: {what}{dense}")
    refused(lambda: exchange.combine(sent.tokens, sent._replace(step=_sparse(kind, (2, 2), torch.int64))),
            rf"^dispatched.step: {what}; must be the step token")


@pytest.mark.parametrize("layout", ["expert_major", "rank_major", "flat", "expert_major_padded"])
def test_the_exchanges_rows_off_an_8_byte_boundary_are_moved_as_any_others(layout):
    # A view starting inside an 8-byte word (buffer[1:].view(...)) was refused by the group's
    # stacked call, naming its argument "xs" (the exchange's is x); the ops now copy such rows.
    from expert_parallel.torch import Exchange

    exchange = Exchange(group(algorithm="ll" if layout in ("expert_major", "rank_major") else "ht", layout=layout))
    x, idx, w = step()
    shifted = torch.zeros(x.numel() + 1)[1:].view(x.shape)
    shifted.copy_(x)
    assert shifted.data_ptr() % 8
    want, got = (exchange.dispatch(value.requires_grad_(), idx, w) for value in (x.clone(), shifted))
    assert torch.equal(got.tokens, want.tokens)
    outputs = torch.zeros(want.tokens.numel() + 1)[1:].view(want.tokens.shape)
    outputs.copy_(want.tokens * 2)
    assert torch.equal(exchange.combine(outputs, got), exchange.combine(want.tokens * 2, want))


# -- DeepEP's Buffer: sparse or nested tensors; combine's out over x; unused arguments of a wrong kind -


def _buffer_step():
    from expert_parallel.compat.deep_ep import Buffer

    (buffer,) = Buffer.virtual(1, timeout=10)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0]])
    return buffer, x, idx, torch.rand(4, 2)


@pytest.mark.parametrize("kind", ["coo", "nested"])
def test_a_deep_ep_buffers_sparse_or_nested_tensor_is_named(kind):
    # A nested routing or x raised torch's RuntimeError from their shape (get_dispatch_layout, dispatch).
    buffer, x, idx, w = _buffer_step()
    what = "a nested tensor" if kind == "nested" else "a tensor of layout torch.sparse_coo"
    dense = rf": {what}; must be a dense \(torch.strided\) torch.Tensor"
    refused(lambda: buffer.get_dispatch_layout(_sparse(kind, (4, 2), torch.int64), 4), "^topk_idx" + dense)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    refused(lambda: buffer.dispatch(_sparse(kind, (4, 128), torch.bfloat16), topk_idx=idx, topk_weights=w, **layout), "^x" + dense)
    refused(lambda: buffer.dispatch(x, topk_idx=idx, topk_weights=_sparse(kind, (4, 2)), **layout), "^topk_weights" + dense)
    refused(lambda: buffer.low_latency_dispatch(_sparse(kind, (4, 128), torch.bfloat16), idx, 8, 4, use_fp8=False), "^x" + dense)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    refused(lambda: buffer.combine(_sparse(kind, tuple(recv_x.shape), torch.bfloat16), handle), "^x" + dense)
    buffer.destroy()


def test_a_deep_ep_low_latency_combine_into_its_own_x_names_out_and_x():
    # The group refused it naming its own arguments: "out[0] = ...; must not overlap expert_outputs[0]".
    buffer, x, idx, w = _buffer_step()
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
    inside = recv_x[0, :4]
    refused(lambda: buffer.low_latency_combine(recv_x, idx, w, handle, out=inside),
            r"^out: shares memory with x \(out at 0x[0-9a-f]+, 1024 bytes; x at 0x[0-9a-f]+, \d+ bytes\); combine writes out "
            r"while it reads x: pass a tensor of its own")
    combined, _, _ = buffer.low_latency_combine(recv_x, idx, w, handle, out=torch.empty(4, 128, dtype=torch.bfloat16))
    assert combined.shape == (4, 128)
    buffer.destroy()


def test_a_deep_ep_combines_unused_arguments_of_a_wrong_kind_are_named():
    # combine's config and low_latency_combine's zero_copy have no effect; any value was taken
    # (dispatch names a config that is not a Config, and the other flags a value that is not a bool).
    buffer, x, idx, w = _buffer_step()
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    refused(lambda: buffer.combine(recv_x, handle, config=3), r"^config: a int; must be a Config \(Buffer.get_combine_config\)")
    buffer.combine(recv_x, handle, config=buffer.get_combine_config(1))
    recv_x, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
    refused(lambda: buffer.low_latency_combine(recv_x, idx, w, ll_handle, zero_copy="yes"), r"^zero_copy='yes' \(type str\); must be a bool")
    buffer.low_latency_combine(recv_x, idx, w, ll_handle, zero_copy=True)
    buffer.destroy()


def test_an_exchange_of_a_closed_group_is_refused_when_made():
    # It was registered, and its first dispatch failed with "the group is closed".
    from expert_parallel.torch import Exchange

    g = group()
    g.close()
    with pytest.raises(ep.InvalidUsageError, match=r"^group: VirtualGroup\(ranks=2, .*\) is closed; register an open group"):
        Exchange(g)


@pytest.mark.parametrize("rank", [-1, 2, 2**40, -2**40])
def test_deactivate_names_the_groups_ranks_as_its_bound(rank):
    # A rank past 32 bits was refused with the C field's bound ("must be in [-2147483648,
    # 2147483647]"), one inside it with the C library's ("rank = 2; must be in 0..<2").
    g = group()
    with pytest.raises(ep.InvalidArgumentError, match=rf"^rank={rank}; must be in \[0, 1\]$"):
        g.deactivate(rank)
    assert g.active_ranks == [0, 1]


def test_the_bench_refuses_a_json_path_that_is_a_folder_before_the_run(tmp_path, capsys, monkeypatch):
    # open(folder, "w") raised IsADirectoryError after the whole run.
    from expert_parallel import bench

    monkeypatch.setattr(bench, "run", lambda *arguments: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exited:
        bench.main(["--case", "tiny", "--iterations", "1", "--json", str(tmp_path)])
    assert exited.value.code == 2
    assert f"--json {tmp_path}: a folder; must name the file to write (checked before the run)" in capsys.readouterr().err


@contextlib.contextmanager
def library_unloaded():
    """The package as if it had not loaded the library yet, for a test of load() itself; the loaded
    one is back afterwards. load() holds a lock that is not re-entrant while it allocates (ctypes.CDLL
    makes a class), and a garbage collection may run at any allocation: one there finalised what
    earlier tests left in reference cycles (a group held by a pytest.raises traceback), whose
    __del__ calls the library, so load() again, and the test waited on the lock for good, idle
    (12 minutes in one order of the test files; a shuffled order of the same tests showed the stack
    load > CDLL.__init__ > GroupBase.__del__ > close > call > load). So those leftovers are
    collected first, while the real library is loaded, and none is collected until it is back."""
    from expert_parallel import _library

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    saved = _library._library, _library._path
    _library._library = _library._path = None
    try:
        yield _library
    finally:
        _library._library, _library._path = saved
        if enabled:
            gc.enable()


@pytest.fixture
def unloaded_library():
    with library_unloaded() as library:
        yield library


def test_a_collection_inside_load_finalises_no_earlier_group_there(tmp_path):
    # In a process of its own: a group and its handle left in a reference cycle, then
    # library_unloaded() and a collection forced inside load(). Without the collection first,
    # that one closed the group from inside load(), and the process waited on load()'s lock for good.
    import subprocess
    import sys
    from pathlib import Path

    from expert_parallel import _library

    here = Path(__file__).resolve().parent
    program = (
        "import gc, os, sys\n"
        f"sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]\n"
        "import expert_parallel as ep\n"
        "from expert_parallel import _library\n"
        "from test_hazards_session31 import library_unloaded\n"
        "gc.disable()\n"
        "g = ep.VirtualGroup(2, 4, 8, 2, 3, dtype='f32')\n"
        "cycle = [g, g.handle()]\n"
        "cycle.append(cycle)\n"
        "del g, cycle\n"
        "gc.enable()\n"
        "real = _library.candidates\n"
        "def candidates():\n"
        "    gc.collect()   # as one may run at any allocation in load()\n"
        "    return real()\n"
        "_library.candidates = candidates\n"
        f"os.environ['EP_LIBRARY'] = {str(tmp_path / 'not-the-library.so')!r}\n"
        "with library_unloaded():\n"
        "    try:\n"
        "        _library.load()\n"
        "    except ep.LibraryNotFoundError:\n"
        "        print('refused')\n")
    (tmp_path / "not-the-library.so").write_bytes(b"not a library\n")
    env = dict(os.environ, EP_LIBRARY=str(_library.library_path()))
    try:
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("load() waited on its own lock: a collection inside it closed a group left by earlier work")
    assert run.returncode == 0 and run.stdout == "refused\n", run.stderr


@pytest.mark.parametrize("content", [b"not a library\n", None], ids=["not ELF", "another library"])
def test_a_library_path_that_is_not_the_library_is_named(tmp_path, monkeypatch, content, unloaded_library):
    # ctypes' OSError ("file too short", "invalid ELF header") or, for a shared library without
    # the ABI's entry points, AttributeError ("undefined symbol: epGetAbiVersion") came out of
    # the first call.
    import ctypes.util
    import os

    from expert_parallel import _library

    if content is None:
        found = ctypes.util.find_library("z") or ctypes.util.find_library("m")
        if found is None:
            pytest.skip("no other shared library to load")
        path = next((os.path.join(d, found) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64",
                                                      "/usr/lib", "/lib") if os.path.isfile(os.path.join(d, found))), None)
        if path is None:
            pytest.skip(f"{found} not found on disk")
    else:
        path = tmp_path / "libexpert_parallel.so"
        path.write_bytes(content)
    monkeypatch.setenv("EP_LIBRARY", str(path))
    with pytest.raises(ep.LibraryNotFoundError, match=rf"^{re.escape(str(path))} is not a loadable libexpert_parallel.so of ABI "
                                                       rf"version \d+: .*; build it with `scripts/build-library`"):
        _library.load()


@pytest.mark.parametrize("dependency,advice", [
    ("libswiftCore.so", r"a library built by plain `swift build` loads the Swift runtime from the toolchain; put the toolchain's "
                        r"usr/lib/swift/linux on LD_LIBRARY_PATH, or build the library with `scripts/build-library`"),
    ("libnotthere.so.1", r"install it, or put the folder holding it on LD_LIBRARY_PATH$"),
])
def test_a_library_whose_dependency_is_missing_names_the_dependency(tmp_path, monkeypatch, dependency, advice, unloaded_library):
    # The loader's OSError for a dependency it did not find (a library built without the Swift
    # runtime linked in, where the toolchain's is not on the loader's path) was reported as "is not
    # a loadable libexpert_parallel.so ...; build it with scripts/build-library", and not chained.
    import ctypes

    from expert_parallel import _library

    path = tmp_path / "libexpert_parallel.so"
    path.write_bytes(b"\x7fELF")
    loader_error = OSError(f"{dependency}: cannot open shared object file: No such file or directory")

    def load(name, *arguments, **keywords):
        raise loader_error

    monkeypatch.setenv("EP_LIBRARY", str(path))
    monkeypatch.setattr(ctypes, "CDLL", load)
    with pytest.raises(ep.LibraryNotFoundError, match=rf"^{re.escape(str(path))} needs {re.escape(dependency)}, which the dynamic "
                                                       rf"loader did not find \({re.escape(str(loader_error))}\): {advice}") as caught:
        _library.load()
    assert "is not a loadable" not in str(caught.value)
    assert caught.value.__cause__ is loader_error


def test_a_real_library_whose_dependency_is_gone_names_it(tmp_path, monkeypatch, unloaded_library):
    # The same, from the dynamic loader itself: a library linked against one that is then removed.
    import shutil
    import subprocess

    from expert_parallel import _library

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "dep.c").write_text("int ep_test_dependency(void) { return 1; }\n")
    (tmp_path / "main.c").write_text("int ep_test_dependency(void);\nint ep_test_main(void) { return ep_test_dependency(); }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libepgone.so"), str(tmp_path / "dep.c")], check=True)
    path = tmp_path / "libexpert_parallel.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(path), str(tmp_path / "main.c"), f"-L{tmp_path}", "-lepgone"], check=True)
    (tmp_path / "libepgone.so").unlink()
    monkeypatch.setenv("EP_LIBRARY", str(path))
    with pytest.raises(ep.LibraryNotFoundError, match=rf"^{re.escape(str(path))} needs libepgone.so, which the dynamic loader did "
                                                       r"not find \(.*\): install it, or put the folder holding it on LD_LIBRARY_PATH$") as caught:
        _library.load()
    assert isinstance(caught.value.__cause__, OSError)


# -- torch.distributed process groups --------------------------------------------------------------


def test_a_process_group_that_is_not_one_is_named(tmp_path, monkeypatch):
    # dist.get_rank's ValueError ("Group pg is not registered, please create group with
    # torch.distributed.new_group API") came out of NCCLGroup.from_process_group and Buffer, naming
    # no argument; an unreadable LOCAL_WORLD_SIZE int()'s; a max_tokens_per_rank of a wrong kind
    # was taken by a CPU Buffer.
    import torch.distributed as dist

    from expert_parallel.compat.deep_ep import Buffer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for value in ("pg", 3):
            with pytest.raises(ep.InvalidArgumentError, match=rf"^process_group: {value!r} is not a torch.distributed process "
                                                               r"group \(Group .* is not registered"):
                ep.NCCLGroup.from_process_group(value, experts=4, hidden=8, top_k=2, max_tokens=2)
            with pytest.raises(ep.InvalidArgumentError, match=rf"^group: {value!r} is not a torch.distributed process group"):
                Buffer(value, device="cpu")
        with pytest.raises(ep.InvalidArgumentError, match=r"^max_tokens_per_rank='x'; must be an integer"):
            Buffer(dist.group.WORLD, device="cpu", max_tokens_per_rank="x")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
        with pytest.raises(ep.InvalidArgumentError, match=r"^LOCAL_WORLD_SIZE='eight' \(environment\); must be the number of ranks"):
            Buffer(dist.group.WORLD, device="cpu")
    finally:
        dist.destroy_process_group()


def test_rank_0s_unique_id_error_reaches_the_other_ranks_as_one_message():
    # The error was raised as cls(message, status): its text read "('rank 0 could not make the NCCL
    # unique id: ...', 8)".
    from expert_parallel.nccl_group import _share_unique_id

    class Relay:
        def get_global_rank(self, group, rank):
            return 0

        def broadcast_object_list(self, objects, src, group):
            objects[:] = [("error", "NcclError", "epGetNCCLUniqueId: libnccl.so.2 is not available", ep.NcclError.status)]

    with pytest.raises(ep.NcclError) as caught:
        _share_unique_id(Relay(), "pg", 1)
    assert str(caught.value) == "rank 0 could not make the NCCL unique id: epGetNCCLUniqueId: libnccl.so.2 is not available"
    assert caught.value.status == ep.NcclError.status


def test_a_deep_ep_event_that_is_not_one_is_named_and_a_mock_does_not_hang():
    # EventOverlap(3).current_stream_wait() reached torch (AssertionError "Torch not compiled with
    # CUDA enabled" here, a TypeError of wait_event on a GPU); a MagicMock as previous_event made
    # the unwrapping of .event loop forever.
    from unittest import mock

    from expert_parallel.compat.deep_ep import EventOverlap

    for value in (3, "event", torch.zeros(1)):
        with pytest.raises(ep.InvalidArgumentError, match=r"^EventOverlap.event: a \w+ \(.*\); must be an EventOverlap, an "
                                                          r"EventHandle, a CUDA event or None"):
            EventOverlap(value).current_stream_wait()
    EventOverlap(None).current_stream_wait()
    EventOverlap(EventOverlap(None)).current_stream_wait()
    buffer, x, idx, w = _buffer_step()
    with pytest.raises(ep.InvalidArgumentError, match=r"^previous_event: a MagicMock whose .event nests more than 8 deep"):
        buffer.get_dispatch_layout(idx, 4, previous_event=mock.MagicMock())
    buffer.get_dispatch_layout(idx, 4, previous_event=EventOverlap(None))
    buffer.destroy()


def test_a_deep_ep_event_chain_of_eight_wrappers_is_taken_and_of_nine_refused():
    # The bound is 8 wrappers ("more than 8 deep" is refused); a chain of exactly 8 that ends was
    # refused too (the loop unwrapped 8 times and never looked at what the 8th held).
    from expert_parallel.compat.deep_ep import EventOverlap, _events

    def chain(depth):
        event = None
        for _ in range(depth):
            event = EventOverlap(event)
        return event

    for depth in range(9):
        _events.wait(chain(depth), "cpu")
        EventOverlap(chain(depth)).current_stream_wait()   # (its .event: the chain)
    with pytest.raises(ep.InvalidArgumentError, match=r"^previous_event: a EventOverlap whose .event nests more than 8 deep"):
        _events.wait(chain(9), "cpu")
    with pytest.raises(ep.InvalidArgumentError, match=r"^EventOverlap.event: a EventOverlap whose .event nests more than 8 deep"):
        EventOverlap(chain(9)).current_stream_wait()


def test_the_ops_called_directly_name_a_meta_step_token_and_a_wrong_backward_argument():
    # torch.ops.expert_parallel.* are public: a meta step token sent combine to its fake
    # implementation, which returned uninitialised memory; backward_combine's tokens=-1 raised
    # torch's RuntimeError (another B was named "out"), backward_dispatch's gradient of one
    # dimension an IndexError, backward_combine's of another shape was named "expert_outputs".
    from expert_parallel.torch import Exchange

    exchange = Exchange(group(algorithm="ht"))
    ops = torch.ops.expert_parallel
    x, idx, w = step()
    sent = exchange.dispatch(x, idx, w)
    rows = torch.zeros_like(sent.tokens)
    refused(lambda: ops.combine(rows, sent.routing, None, torch.tensor(sent.step.item(), device="meta"), exchange.id),
            r"^step: a tensor on meta; must be the step token dispatch returned .*: a meta input runs the op's fake implementation")
    for tokens in (-1, 99):
        refused(lambda: ops.backward_combine(rows, None, sent.step, exchange.id, tokens),
                rf"^tokens={tokens}; must be 3, the tokens per rank of the step's dispatch")
    refused(lambda: ops.backward_combine(torch.zeros(2, 3, 8), None, sent.step, exchange.id, 3),
            r"^grad_received: shape \[2, 3, 8\]; must be \[2, 6, 8\], as dispatched.tokens")
    refused(lambda: ops.backward_combine(rows, torch.zeros(1), sent.step, exchange.id, 3),
            r"^grad_weights: shape \[1\]; must be \[2, 6, 2\], as dispatched.topk_weights")
    for shape in ((8,), (2, 2, 8)):
        refused(lambda: ops.backward_dispatch(torch.zeros(shape), sent.step, exchange.id),
                rf"^grad_combined: shape \[{', '.join(map(str, shape))}\]; must be \[2, 3, 8\], the step's tokens")
    refused(lambda: ops.combine(rows, sent.routing.to("meta"), None, sent.step, exchange.id), r"^topk_idx: a tensor on meta; must be on the group's device")
    refused(lambda: ops.backward_combine(rows, torch.zeros(2, 6, 2, device="meta"), sent.step, exchange.id, 3), r"^grad_weights: a tensor on meta")
    assert ops.backward_dispatch(torch.ones(2, 3, 8), sent.step, exchange.id).shape == sent.tokens.shape
