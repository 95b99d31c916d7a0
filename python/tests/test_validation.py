"""Wrong arguments raise an ExpertParallelError (InvalidArgumentError is also a ValueError and a
TypeError) whose message names the argument; calls out of order raise InvalidUsageError."""

import os

import numpy as np
import pytest

import expert_parallel as ep


def small_group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def step_inputs(tokens=(2, 1), hidden=8, dtype=np.float32, index=np.int32):
    xs = [np.ones((b, hidden), dtype) for b in tokens]
    idx = [np.array([[0, 3], [1, 2]][:b], index) for b in tokens]
    weights = [np.full((b, 2), 0.5, np.float32) for b in tokens]
    return xs, idx, weights


def raises(match, cls=ep.InvalidArgumentError):
    return pytest.raises(cls, match=match)


def test_error_classes():
    assert issubclass(ep.InvalidArgumentError, ValueError)
    assert issubclass(ep.InvalidArgumentError, TypeError)
    for cls in (ep.InvalidArgumentError, ep.InvalidUsageError, ep.ReceiveOverflowError, ep.RankTimeoutError,
                ep.PeerFailedError, ep.InactiveRankError, ep.CudaError, ep.LibraryNotFoundError):
        assert issubclass(cls, ep.ExpertParallelError)


@pytest.mark.parametrize("overrides,match", [
    (dict(experts=5), r"experts = 5; must be a multiple of ranks \(2\)"),
    (dict(top_k=0), r"top_k = 0; must be ≥ 1"),
    (dict(ranks=65, experts=65), r"ranks = 65; must be in 1...64"),
    (dict(hidden=3), r"hidden = 3; .*multiple of 8 bytes"),
    (dict(hidden=2**40), r"hidden = 1099511627776; must be ≤ 2147483647"),
    (dict(algorithm="ht", layout="rank_major"), r"layout = 'rank_major'; is not a layout of algorithm 'ht': LL takes 'expert_major' or 'rank_major', HT takes 'flat' or 'expert_major_padded'"),
    (dict(layout="expert-major"), r"layout='expert-major'; must be one of 'expert_major'"),
    (dict(algorithm="fast"), r"algorithm='fast'; must be one of 'll', 'ht'"),
    (dict(dtype="int8"), r"dtype='int8'"),
    (dict(device="tpu"), r"device='tpu'"),
    (dict(ranks="2"), r"ranks='2'; must be an integer"),
    (dict(top_k=2**31), r"top_k=2147483648; must be in"),
    (dict(max_recv_tokens=10), r"max_recv_tokens = 10; must be None for LL"),
    (dict(algorithm="ht", layout="expert_major_padded", alignment=2000), r"alignment = 2000; must be in 1\.\.\.1024"),
    # The C ABI's 0 = 1 was taken (and ran as 1) where the message above says 1...1024; a negative one said [0, 2^31 - 1].
    (dict(algorithm="ht", layout="expert_major_padded", alignment=0), r"^alignment = 0; must be in 1\.\.\.1024$"),
    (dict(algorithm="ht", layout="expert_major_padded", alignment=-1), r"^alignment = -1; must be in 1\.\.\.1024$"),
    # Past 32 bits the refusal named the range of the check made before the layout's: [-2^31, 2^31 - 1], for
    # expert_major_padded (whose bound is 1...1024) and for the other layouts (which said [0, 2^31 - 1] before).
    (dict(algorithm="ht", layout="expert_major_padded", alignment=2**40), r"^alignment = 1099511627776; must be in 1\.\.\.1024$"),
    (dict(algorithm="ht", layout="expert_major_padded", alignment=-2**40), r"^alignment = -1099511627776; must be in 1\.\.\.1024$"),
    (dict(alignment=-2**40), r"^alignment=-1099511627776; must be in \[0, 2147483647\]$"),
    (dict(alignment=4), r"alignment = 4; must be 0 or 1 unless the layout is 'expert_major_padded'"),
    (dict(timeout=-1.0), r"timeout = -1.0"),
])
def test_configuration_errors_name_the_field(overrides, match):
    with raises(match):
        small_group(**overrides)


def test_dispatch_checks_every_argument_and_names_it():
    group = small_group()
    xs, idx, w = step_inputs()
    with raises(r"xs: 1 entries; must be one per rank \(2\)"):
        group.dispatch(xs[:1], idx, w)
    with raises(r"xs\[1\]: dtype float16; must be f32"):
        group.dispatch([xs[0], xs[1].astype(np.float16)], idx, w)
    with raises(r"xs\[0\]: shape \[2, 4\]; must be \[\*, 8\]"):
        group.dispatch([xs[0][:, :4].copy(), xs[1]], idx, w)
    with raises(r"xs\[0\]: not C-contiguous"):
        group.dispatch([np.ones((2, 16), np.float32)[:, ::2], xs[1]], idx, w)
    with raises(r"xs\[1\]: 4 tokens; must be ≤ max_tokens \(3\)"):
        group.dispatch([xs[0], np.ones((4, 8), np.float32)], idx, w)
    with raises(r"xs\[0\]: a list; must be a NumPy array or a PyTorch tensor"):
        group.dispatch([[[1.0] * 8], xs[1]], idx, w)
    with raises(r"topk_idx\[0\]: dtype float32; must be i32 or i64"):
        group.dispatch(xs, [idx[0].astype(np.float32), idx[1]], w)
    with raises(r"topk_idx\[1\]: shape \[2, 2\]; must be \[1, 2\]"):
        group.dispatch(xs, [idx[0], idx[0]], w)
    with raises(r"topk_weights\[0\]: dtype float64; must be f32"):
        group.dispatch(xs, idx, [w[0].astype(np.float64), w[1]])
    with raises(r"rank 1: invalid argument: topk_idx\[token 0, column 1\] = 9; must be -1 or in \[0, 4\)"):
        group.dispatch(xs, [idx[0], np.array([[0, 9]], np.int32)], w)
    with raises(r"rank 0: invalid argument: topk_idx token 1 names expert 2 twice \(columns 0 and 1\)"):
        group.dispatch(xs, [np.array([[0, 3], [2, 2]], np.int64), idx[1]], w)
    # Stacked arrays (one C call) name the entry the same way, by the package's keyword.
    with raises(r"rank 1: invalid argument: topk_idx\[token 0, column 1\] = 9; must be -1 or in \[0, 4\)"):
        group.dispatch(np.ones((2, 1, 8), np.float32), np.array([[[0, 3]], [[0, 9]]], np.int32), np.ones((2, 1, 2), np.float32))
    # The group still works after rejected calls.
    out = group.dispatch(xs, idx, w)
    assert out.layout[0].expert_counters == [2, 1]


def test_layouts_that_send_weights_require_them():
    group = small_group(layout="rank_major")
    xs, idx, _ = step_inputs()
    with raises(r"topk_weights: None; layout 'rank_major' sends the weights with the tokens"):
        group.dispatch(xs, idx)


def test_combine_checks_its_handle_and_expert_outputs():
    group = small_group()
    xs, idx, w = step_inputs()
    first = group.dispatch(xs, idx, w)
    with raises(r"expert_outputs\[1\]: shape \[2, 3, 8\]; must be \[2, 6, 8\]"):
        group.combine([first.tokens[0], np.zeros((2, 3, 8), np.float32)], first.handle)
    with raises(r"expert_outputs\[0\]: dtype float16; must be f32"):
        group.combine([first.tokens[0].astype(np.float16), first.tokens[1]], first.handle)
    with raises("handle: must be the handle of a dispatch of this group"):
        small_group().combine(first.tokens, first.handle)
    with raises("handle: must be"):
        group.combine(first.tokens, "handle")
    second = group.dispatch(xs, idx, w)
    with raises(r"handle: from step 1, but the group has dispatched step 2 since", ep.InvalidUsageError):
        group.combine(first.tokens, first.handle)
    group.combine(second.tokens, second.handle)


def test_library_messages_name_element_types_as_the_dtype_keyword_does():
    # The C layer names them as epDataType_t does ("elementType = epUInt8"); the package's messages
    # by its dtype strings.
    from expert_parallel.errors import python_names

    group = small_group(dtype="u8")
    xs, idx, w = step_inputs(dtype=np.uint8)
    out = group.dispatch(xs, idx, w)
    with raises(r"rank 0: invalid configuration: dtype = u8; combine needs bf16, f16 or f32 \(u8 is dispatch only\)$"):
        group.combine(out.tokens, out.handle)
    assert python_names("inputs.tokens.dtype = epFloat8E4M3; must be epInt32 or epInt64") == "inputs.tokens.dtype = e4m3; must be i32 or i64"
    # The entry points a C message asks for, as the group's methods.
    assert python_names("call epGroupComplete for the pending send-only dispatch first") == "complete() the pending send-only dispatch first"
    assert python_names("epComplete needs a dispatch or combine issued with phase epPhaseSendOnly") == "complete() needs a dispatch or combine issued with send_only=True"
    assert python_names("masked inactive; clean it (epGroupCleanRanks) before calling") == "masked inactive; clean it (clean()) before calling"
    assert python_names("void (epGroupCheckStatus names it); epGroupCleanRanks was called") == "void (check() names it); clean() was called"
    assert python_names("(this call: epBackward, HT)") == "(this call: backward, HT)"


def test_ll_expert_major_combine_needs_weights_given_to_dispatch_or_to_combine():
    group = small_group()
    xs, idx, w = step_inputs()
    out = group.dispatch(xs, idx)  # LL expert-major dispatch does not need them
    with raises(r"topk_weights: given neither to dispatch nor to combine"):
        group.combine(out.tokens, out.handle)
    assert [c.shape for c in group.combine(out.tokens, out.handle, direction="backward")] == [(2, 8), (1, 8)]
    with raises(r"topk_weights\[1\]: shape \[2, 2\]; must be \[1, 2\]"):
        group.combine(out.tokens, out.handle, topk_weights=[w[0], w[0]])
    with raises(r"topk_weights: given to combine, but the backward pass takes no weights"):
        group.combine(out.tokens, out.handle, direction="backward", topk_weights=w)
    assert [c.shape for c in group.combine(out.tokens, out.handle, topk_weights=w)] == [(2, 8), (1, 8)]


def test_only_the_forward_ll_expert_major_combine_takes_weights():
    for algorithm, layout in (("ll", "rank_major"), ("ht", "flat"), ("ht", "expert_major_padded")):
        group = small_group(algorithm=algorithm, layout=layout)
        xs, idx, w = step_inputs()
        out = group.dispatch(xs, idx, w)
        with raises(rf"topk_weights: given to combine, but the forward combine of layout '{layout}' takes no weights"):
            group.combine(out.tokens, out.handle, topk_weights=w)


def test_backward_ht_needs_weight_gradients():
    group = small_group(algorithm="ht")
    xs, idx, w = step_inputs()
    out = group.dispatch(xs, idx, w)
    with raises("weight_gradients: None; the backward pass of HT needs them"):
        group.combine(out.tokens, out.handle, direction="backward")
    with raises("weight_gradients: only the backward pass of HT takes weight gradients"):
        group.combine(out.tokens, out.handle, weight_gradients=out.topk_weights)
    with raises(r"weight_gradients\[0\]: shape \[3\]; must be \[6, 2\]"):
        group.combine(out.tokens, out.handle, direction="backward", weight_gradients=[np.zeros(3, np.float32)] * 2)


def test_library_errors_carry_the_status():
    group = small_group()
    xs, idx, w = step_inputs()
    with pytest.raises(ep.ExpertParallelError) as caught:
        group.dispatch(xs, [idx[0], np.array([[0, -2]], np.int32)], w)
    assert caught.value.status == 1 and caught.value.status_name == "epInvalidArgument"
    assert str(caught.value).startswith("epGroupUpdateAll: rank 1: invalid argument: topk_idx[token 0, column 1] = -2")


def test_mask_calls_check_the_rank():
    group = small_group()
    with raises(r"^rank=2; must be in \[0, 1\]"):
        group.deactivate(2)
    with raises(r"ranks\[0\]=5; must be in \[0, 1\]"):
        group.clean([5])
    # The entry is named by its index in the ranks given (it read "ranks[...]=5" wherever it was).
    with raises(r"^ranks\[2\]=5; must be in \[0, 1\]"):
        group.clean([0, 1, 5])
    assert group.active_ranks == [0, 1]   # (nothing cleaned or masked by the refused call)


def test_a_closed_group_refuses_calls():
    group = small_group()
    group.close()
    with raises("the group is closed", ep.InvalidUsageError):
        group.dispatch(*step_inputs())


@pytest.mark.skipif(os.environ.get("EP_GPU_TESTS") == "1", reason="a machine without a GPU")
def test_a_gpu_group_without_a_gpu_fails_cleanly():
    with pytest.raises(ep.CudaError):
        small_group(device="cuda:0")


@pytest.mark.parametrize("stacked", [False, True])
def test_a_new_step_on_a_handle_has_none_of_the_last_steps_weights(stacked):
    # A handle's next step dispatched without weights: its LL expert-major combine needs some, not the last step's.
    group = small_group()
    xs, idx, w = step_inputs(tokens=(2, 2))
    if stacked:
        xs, idx, w = np.stack(xs), np.stack(idx), np.stack(w)
    h = group.handle()
    d = group.dispatch(xs, idx, w, handle=h)
    group.combine(d.tokens, d.handle)
    d = group.dispatch(xs, idx, handle=h)
    with raises(r"topk_weights: given neither to dispatch nor to combine"):
        group.combine(d.tokens, d.handle)
    assert [c.shape for c in group.combine(d.tokens, d.handle, topk_weights=w)] == [(2, 8), (2, 8)]
    d = group.dispatch(xs, idx, w, handle=h)
    d = group.dispatch(xs, idx, handle=h, direction="backward")   # a new step too, whatever its direction
    with raises(r"topk_weights: given neither to dispatch nor to combine"):
        group.combine(d.tokens, d.handle)
