"""More hazards a new user met (session 25's probe), each now a named error, on the CPU backend:

- a read-only NumPy array given as an output (``out=``) was written through (a read-only
  memmap crashed the process);
- a tensor on PyTorch's ``meta`` device (no memory) passed the device check of a CPU group, since
  ``get_device()`` is -1 for it as for the CPU: a meta ``topk_idx`` read as "not given" and the
  dispatch reused the previous step's routing;
- ``send_only`` and ``record_event`` took any truthy value (``send_only="false"`` ran a send-only
  dispatch), and a CPU group took any ``stream``."""

import mmap

import numpy as np
import pytest
import torch

import expert_parallel as ep


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32", algorithm="ht", layout="flat")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def step(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    idx = np.array([[[0, 1], [2, 3], [1, -1]]] * 2, np.int32)
    w = rng.random((2, 3, 2)).astype(np.float32)
    return x, idx, w


def read_only(shape, dtype=np.float32):
    array = np.zeros(shape, dtype)
    array.flags.writeable = False
    return array


def read_only_map(shape):
    """A read-only memory map: writing it through the library crashed the process."""
    size = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, size, prot=mmap.PROT_READ), np.float32).reshape(shape)


@pytest.mark.parametrize("make", [read_only, read_only_map])
def test_a_read_only_output_is_refused_and_left_as_it_was(make):
    g = group()
    x, idx, w = step()
    sent = g.dispatch(x, idx, w)
    out = make((2, 3, 8))
    with pytest.raises(ep.InvalidArgumentError, match=r"^out: a read-only NumPy array"):
        g.combine(sent.received, sent.handle, out=out)
    with pytest.raises(ep.InvalidArgumentError, match=r"^out\[0\]: a read-only NumPy array"):
        g.combine(sent.received, sent.handle, out=[make((3, 8)), np.zeros((3, 8), np.float32)])
    assert not out.any()
    recv = make((2,) + tuple(g.recv_shape))
    routing = (np.zeros((2,) + tuple(g.recv_routing_shape), np.int32), np.zeros((2,) + tuple(g.recv_routing_shape), np.float32))
    with pytest.raises(ep.InvalidArgumentError, match=r"^out tokens: a read-only NumPy array"):
        g.dispatch(x, idx, w, out=(recv,) + routing)
    with pytest.raises(ep.InvalidArgumentError, match=r"^out topk_weights: a read-only NumPy array"):
        g.dispatch(x, idx, w, out=(np.zeros_like(recv), routing[0], make(routing[1].shape)))
    assert not recv.any()
    # Inputs may be read-only: the library only reads them.
    frozen = [np.array(a) for a in (x, idx, w)]
    for a in frozen:
        a.flags.writeable = False
    again = g.dispatch(*frozen)
    np.testing.assert_array_equal(again.received, g.dispatch(x, idx, w).received)


@pytest.mark.parametrize("argument", ["xs", "topk_idx", "topk_weights"])
def test_a_meta_tensor_is_refused_by_a_cpu_group(argument):
    g = group()
    x, idx, w = (torch.from_numpy(a) for a in step())
    first = g.dispatch(x, idx, w)
    kept = first.received.clone()
    other = torch.from_numpy(step(1)[1][:, ::-1].copy())   # another routing
    given = {"xs": x, "topk_idx": other, "topk_weights": w}
    given[argument] = given[argument].to("meta")
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{argument}: on meta; must be on cpu"):
        g.dispatch(given["xs"], given["topk_idx"], given["topk_weights"])
    # Nothing ran: the step is the first one's, whose combine still works.
    torch.testing.assert_close(first.received, kept)
    g.combine(first.received, first.handle)


def test_meta_expert_outputs_are_refused():
    g = group()
    sent = g.dispatch(*(torch.from_numpy(a) for a in step()))
    with pytest.raises(ep.InvalidArgumentError, match=r"^expert_outputs: on meta; must be on cpu"):
        g.combine(sent.received.to("meta"), sent.handle)


@pytest.mark.parametrize("call", ["dispatch", "combine"])
@pytest.mark.parametrize("option,value", [("send_only", "false"), ("send_only", 1), ("record_event", "yes"), ("record_event", None)])
def test_flags_take_true_or_false_only(call, option, value):
    g = group()
    x, idx, w = step()
    sent = g.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{option}={value!r} \(type {type(value).__name__}\); must be True or False"):
        if call == "dispatch":
            g.dispatch(x, idx, w, **{option: value})
        else:
            g.combine(sent.received, sent.handle, **{option: value})
    g.combine(sent.received, sent.handle)   # nothing pending: the refused call ran nothing
    g.dispatch(x, idx, w)


def test_a_cpu_group_names_a_stream_of_the_wrong_kind():
    g = group()
    x, idx, w = step()
    with pytest.raises(ep.InvalidArgumentError, match=r"^stream: a str; must be a torch.cuda.Stream or an int CUstream handle"):
        g.dispatch(x, idx, w, stream="s")
    sent = g.dispatch(x, idx, w, stream=0)   # a handle is accepted (the CPU takes none)
    with pytest.raises(ep.InvalidArgumentError, match=r"^stream: a list"):
        g.combine(sent.received, sent.handle, stream=[1])


@pytest.mark.parametrize("argument", ["x", "topk_idx", "topk_weights"])
def test_the_torch_ops_refuse_a_meta_tensor(argument):
    from expert_parallel.torch import Exchange

    ex = Exchange(group())
    given = dict(zip(("x", "topk_idx", "topk_weights"), (torch.from_numpy(a) for a in step())))
    given[argument] = given[argument].to("meta")
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{argument}: device meta; must be the group's \(cpu\)"):
        ex.dispatch(given["x"], given["topk_idx"], given["topk_weights"])
    ex.close()


@pytest.mark.parametrize("dtype,name", [(np.float32, "f32"), (np.float16, "f16"), (np.uint8, "u8"), (np.dtype("float32"), "f32")])
def test_numpy_scalar_types_name_a_dtype(dtype, name):
    assert group(dtype=dtype).dtype == name


@pytest.mark.parametrize("dtype", [np.int32, float, int])
def test_other_types_are_no_dtype(dtype):
    with pytest.raises(ep.InvalidArgumentError, match=r"^dtype=<class '.*'>; must be 'bf16', 'f16', 'f32' or 'u8'"):
        group(dtype=dtype)


def test_a_traced_token_count_is_named_by_its_value():
    """Under torch.compile(dynamic=True) a B past max_tokens was named by its symbol (s27)."""
    from expert_parallel.torch import Exchange

    ex = Exchange(group())
    fn = torch.compile(lambda x, i, w: ex.combine(ex.dispatch(x, i, w).tokens, ex.dispatch(x, i, w)), fullgraph=True,
                       backend="aot_eager", dynamic=True)

    def inputs(b):
        i = torch.zeros(2, b, 2, dtype=torch.int32)
        i[..., 1] = 1
        return torch.randn(2, b, 8), i, torch.ones(2, b, 2)

    fn(*inputs(2))
    with pytest.raises(Exception, match=r"x: 5 tokens per rank; must be ≤ max_tokens \(3\)"):
        fn(*inputs(5))
    ex.close()


@pytest.mark.parametrize("settings,message", [
    (dict(top_k=40), r"top_k = 40; must be ≤ experts \(4\)"),
    (dict(max_tokens=0), r"max_tokens = 0; must be ≥ 1"),
    (dict(alignment=4, layout="flat"), r"alignment = 4; must be 0 or 1 unless the layout is 'expert_major_padded'"),
    (dict(hidden=100, fp8="float32"), r"hidden = 100; must be a multiple of 128, the block of FP8 scale mode 'float32'"),
    (dict(hidden=64, dtype="u8", fp8="e8m0", fp8_source="pass_through"),
     r"dtype = u8; must be bf16, f16 or f32 with fp8 \('pass_through' 'e8m0'\): combine runs in it"),
])
def test_the_librarys_errors_name_the_settings_as_the_package_does(settings, message):
    # The C layer names epGroupConfig_t's fields and enumerators (topK, maxTokensPerRank, epLayoutExpertMajorPadded,
    # epFP8E8M0Block32, epUInt8).
    with pytest.raises(ep.InvalidArgumentError, match=message):
        group(**settings)


def test_an_overflow_names_max_recv_tokens():
    g = group(max_recv_tokens=3)
    x, idx, w = step()
    idx[...] = [0, 1]
    with pytest.raises(ep.ReceiveOverflowError, match=r"would receive 6 rows but max_recv_tokens is 3"):
        g.dispatch(x, idx, w)


@pytest.mark.parametrize("call", ["dispatch", "combine"])
def test_a_numpy_bool_flag_is_named_by_its_numpy_type(call):
    # type(np.False_).__name__ is "bool": the message read "send_only=np.False_ (type bool); must be
    # True or False", naming the type the value is refused for not being.
    g = group()
    x, idx, w = step()
    sent = g.dispatch(x, idx, w)
    with pytest.raises(ep.InvalidArgumentError, match=r"^send_only=np\.False_ \(type numpy\.bool_?\); must be True or False"):
        if call == "dispatch":
            g.dispatch(x, idx, w, send_only=np.False_)
        else:
            g.combine(sent.received, sent.handle, send_only=np.False_)
    g.combine(sent.received, sent.handle)


def test_a_numpy_bool_tuning_switch_is_named_by_its_numpy_type():
    with pytest.raises(ep.InvalidArgumentError, match=r"^tuning\['full_grid'\]=np\.True_ \(type numpy\.bool_?\); must be True or False"):
        ep.VirtualGroup(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", tuning={"full_grid": np.True_})
