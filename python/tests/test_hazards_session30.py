"""Hazards of extreme and odd argument values (session 30's probe), each now a named error, on the
CPU backend:

- an integer of more than 4300 digits, where a count is taken, raised Python's own ValueError (its
  text conversion refused) while naming it; one past a float's range as a ``timeout`` raised
  OverflowError;
- ``device="cuda:4294967296"`` wrapped to device 0 in the C struct's 32-bit field (so a GPU
  machine ran on the wrong device), ``"cuda:²"`` raised int()'s ValueError;
- a ``stream`` handle past 64 bits (or negative) reached ctypes (ArgumentError, or a wrapped
  pointer on the GPU);
- ``Exchange.combine`` of a Dispatched whose step token or routing was on ``meta`` ran the op's
  fake implementation and returned an uninitialised tensor; a token of several values, NaN or
  None, and a routing of the wrong shape or kind, raised ValueError / IndexError / AttributeError;
- DeepEP's ``Buffer.virtual`` took any ``device`` (torch.device's RuntimeError at the first call)
  and any ``timeout`` (infinity: the threading module's OverflowError in a waiting rank; NaN:
  a meeting that never timed out); ``run_ranks`` passed its timeout to ``Thread.join``;
  ``set_num_sms`` took 2**64; a ``num_worst_tokens`` padding that cannot be allocated let
  torch's RuntimeError out;
- the bench's ``--seed -1`` and a malformed ``--engine-json`` ended in tracebacks (the JSON one
  after the whole run)."""

import math

import numpy as np
import pytest
import torch

import expert_parallel as ep


def group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=3, dtype="f32")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def step():
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    idx = np.array([[[0, 1], [2, 3], [1, -1]]] * 2, np.int32)
    w = np.full((2, 3, 2), 0.5, np.float32)
    return x, idx, w


# -- numbers past what Python prints or a float holds ----------------------------------------------


@pytest.mark.parametrize("name", ["ranks", "max_tokens", "buffer_slots", "multiprocessors"])
@pytest.mark.parametrize("value", [10**5000, -10**5000], ids=["10**5000", "-10**5000"])
def test_an_integer_too_long_to_print_is_named_by_its_bits(name, value):
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{name}=-?an integer of 16610 bits; must be in \["):
        group(**{name: value})


@pytest.mark.parametrize("value", [10**400, 10**5000], ids=["10**400", "10**5000"])
def test_a_timeout_past_a_floats_range_is_named(value):
    with pytest.raises(ep.InvalidArgumentError, match=r"^timeout=an integer of \d+ bits; must be a number of seconds"):
        group(timeout=value)
    with pytest.raises(ep.InvalidArgumentError, match=r"^init_timeout=an integer of \d+ bits; must be a number of seconds"):
        ep.NCCLGroup(4, 8, 2, 2, rank=0, ranks=2, unique_id=bytes(128), device=0, init_timeout=value)


# -- device ordinals ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:4294967296", "cuda:2147483648", "cuda:" + "9" * 5000], ids=["2**32", "2**31", "5000 digits"])
def test_a_device_ordinal_past_32_bits_is_refused_not_wrapped(device):
    # 4294967296 was written into the C struct's int field as 0: the group ran on cuda:0.
    with pytest.raises(ep.InvalidArgumentError, match=r"^device='cuda:9*\d*'[^;]*: its ordinal must be in \[0, 2147483647\]"):
        group(device=device)
    with pytest.raises(ep.InvalidArgumentError, match=r"its ordinal must be in \[0, 2147483647\]"):
        ep.NCCLGroup(4, 8, 2, 2, rank=0, ranks=2, unique_id=bytes(128), device=device)


@pytest.mark.parametrize("device", ["cuda:²", "cuda:１"])
def test_a_device_ordinal_of_other_digits_is_refused(device):
    with pytest.raises(ep.InvalidArgumentError, match=r"^device='cuda:.'; must be 'cpu', 'cuda' or 'cuda:N'"):
        group(device=device)
    with pytest.raises(ep.InvalidArgumentError, match=r"^device='cuda:.'; must be a CUDA device"):
        ep.NCCLGroup(4, 8, 2, 2, rank=0, ranks=2, unique_id=bytes(128), device=device)


# -- stream handles ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [-1, 2**64, -2**63 - 1, 2**70])
@pytest.mark.parametrize("torch_inputs", [False, True])
def test_a_stream_handle_outside_64_bits_is_named_and_nothing_runs(stream, torch_inputs):
    g = group()
    x, idx, w = (torch.from_numpy(a) for a in step()) if torch_inputs else step()
    sent = g.dispatch(x, idx, w)
    received = (lambda: sent.received.numpy()) if torch_inputs else (lambda: sent.received)
    kept = received().copy()
    message = r"^stream=-?\d+; a CUstream handle must be in \[0, 18446744073709551615\]"
    with pytest.raises(ep.InvalidArgumentError, match=message):
        g.dispatch(x, idx, w, stream=stream)
    with pytest.raises(ep.InvalidArgumentError, match=message):
        g.combine(sent.received, sent.handle, stream=stream)
    with pytest.raises(ep.InvalidArgumentError, match=message):
        g.complete(stream=stream)
    # The refused dispatch took no buffer slot nor step: the first step's combine still runs.
    np.testing.assert_array_equal(received(), kept)
    g.combine(sent.received, sent.handle)
    g.dispatch(x, idx, w, stream=2**64 - 1)   # the bound itself is a handle (the CPU takes none)


# -- expert_parallel.torch: what combine reads from a Dispatched --------------------------------


def exchange_step(**settings):
    from expert_parallel.torch import Exchange

    ex = Exchange(group(**settings))
    x, idx, w = (torch.from_numpy(a) for a in step())
    return ex, ex.dispatch(x, idx, w)


@pytest.mark.parametrize("settings", [dict(), dict(algorithm="ht")])
@pytest.mark.parametrize("field", ["step", "routing"])
def test_a_dispatched_field_on_meta_is_refused_not_faked(settings, field):
    """A meta tensor among the op's inputs sent it to its fake implementation: combine returned
    an uninitialised tensor of the right shape."""
    ex, sent = exchange_step(**settings)
    given = sent._replace(**{field: getattr(sent, field).to("meta")})
    with pytest.raises(ep.InvalidArgumentError, match=rf"^dispatched\.{field}: .*meta"):
        ex.combine(sent.tokens, given)
    expected = ex.combine(sent.tokens, sent)   # the step is still live
    assert expected.device.type == "cpu"
    ex.close()


@pytest.mark.parametrize("token", [torch.tensor(float("nan")), torch.tensor([1, 2]), torch.tensor([]), None, 3,
                                   torch.tensor(True), torch.tensor(float("inf"))])
def test_a_step_token_of_another_kind_is_named(token):
    ex, sent = exchange_step()
    with pytest.raises(ep.InvalidArgumentError, match=r"^dispatched\.step: .*; must be the step token dispatch returned"):
        ex.combine(sent.tokens, sent._replace(step=token))
    ex.close()


def test_the_op_names_a_step_token_of_several_values():
    from expert_parallel.torch import _registry

    ex, sent = exchange_step()
    with pytest.raises(ep.InvalidArgumentError, match=r"^step: a torch.int64 tensor of shape \[2\]; must be the step token"):
        _registry.entry(ex.id).step(torch.tensor([1, 2]))
    ex.close()


@pytest.mark.parametrize("routing,message", [
    (None, r"^dispatched\.routing: a NoneType; must be a torch\.Tensor"),
    ([1], r"^dispatched\.routing: a list; must be a torch\.Tensor"),
    (torch.tensor(1), r"^dispatched\.routing: shape \[\]; must be \[2, B, 2\]"),
    (torch.zeros(3, dtype=torch.int32), r"^dispatched\.routing: shape \[3\]; must be \[2, B, 2\]"),
    (torch.zeros(2, 3, 2), r"^dispatched\.routing: dtype torch\.float32; must be torch\.int32 or torch\.int64"),
])
def test_a_routing_of_another_kind_is_named(routing, message):
    ex, sent = exchange_step()
    with pytest.raises(ep.InvalidArgumentError, match=message):
        ex.combine(sent.tokens, sent._replace(routing=routing))
    ex.close()


def test_weights_that_are_not_tensors_are_named():
    ex, sent = exchange_step(algorithm="ht", layout="expert_major_padded", alignment=4)
    with pytest.raises(ep.InvalidArgumentError, match=r"^dispatched\.topk_weights: a list; must be a torch\.Tensor or None"):
        ex.combine(sent.tokens, sent._replace(topk_weights=[1.0]))
    ex.close()


# -- compat.deep_ep ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["CPU", "cuda:x", None, 0, "", "meta", "cpu:0", "cuda:99999999999"])
def test_a_deep_ep_buffer_names_a_device_it_cannot_run_on(device):
    from expert_parallel.compat.deep_ep import Buffer

    with pytest.raises(ep.InvalidArgumentError, match=r"^device=.*; must be 'cpu', 'cuda' or 'cuda:N'"):
        Buffer.virtual(1, device=device)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, 0, 86401])
def test_a_deep_ep_buffer_names_a_timeout_past_the_groups_bound(timeout):
    from expert_parallel.compat.deep_ep import Buffer

    with pytest.raises(ep.InvalidArgumentError, match=r"^timeout=.*; must be in \(0, 86400\] seconds"):
        Buffer.virtual(2, timeout=timeout)


def test_an_infinite_timeout_no_longer_breaks_a_waiting_rank():
    """The first rank to arrive waited with Condition.wait(inf): OverflowError in its thread."""
    from expert_parallel.compat.deep_ep import Buffer

    with pytest.raises(ep.InvalidArgumentError):
        Buffer.virtual(2, timeout=math.inf)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, 10**400, "x"], ids=["nan", "inf", "-1", "10**400", "x"])
def test_run_ranks_names_a_timeout_threads_cannot_wait(timeout):
    from expert_parallel.compat.deep_ep import Buffer, run_ranks

    buffers = Buffer.virtual(1)
    with pytest.raises(ep.InvalidArgumentError, match=r"^timeout="):
        run_ranks(buffers, lambda b: 1, timeout=timeout)
    assert run_ranks(buffers, lambda b: 1, timeout=0) == [1]


@pytest.mark.parametrize("value", [2**64, 2**31])
def test_num_sms_is_bounded_by_the_groups_field(value):
    from expert_parallel.compat.deep_ep import Buffer, Config

    with pytest.raises(ep.InvalidArgumentError, match=rf"^num_sms={value}; must be an integer in \[2, 2147483646\]"):
        Config(value)   # (Config takes an odd one: its calls refuse that)
    with pytest.raises(ep.InvalidArgumentError, match=rf"^new_num_sms={value}; must be an even integer in \[2, 2147483646\]"):
        Buffer.set_num_sms(value)
    assert not Buffer._num_sms_set


def test_a_num_worst_tokens_padding_that_cannot_be_allocated_is_named(monkeypatch):
    from expert_parallel.compat.deep_ep import Buffer

    [b] = Buffer.virtual(1)
    idx = torch.tensor([[0, 1], [2, 3], [1, -1]])
    x, w = torch.randn(3, 8), torch.rand(3, 2)
    per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, 4)
    real = torch.Tensor.new_empty

    def failing(self, shape, *arguments, **keywords):
        if shape and shape[0] == 2**31 - 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476704 bytes. Error code 12 (Cannot allocate memory)")
        return real(self, shape, *arguments, **keywords)

    monkeypatch.setattr(torch.Tensor, "new_empty", failing)
    with pytest.raises(ep.OutOfMemoryError, match=r"^num_worst_tokens=2147483647: a \[2147483647, 8\] torch.float32 tensor of "
                                                  r"received rows needs 68719476704 bytes \(64.0 GiB\), which could not be allocated"):
        b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
                   topk_weights=w, num_worst_tokens=2**31 - 1)
    monkeypatch.undo()
    recv_x, _, _, _, handle, _ = b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                            num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, num_worst_tokens=4)
    assert recv_x.shape == (4, 8)
    b.destroy()


# -- the bench ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content,reason", [
    ("{bad", "JSONDecodeError"),
    ("[1, 2]", "a JSON list, not a list of objects"),
    ('{"cases": 5}', "a JSON dict, not a list of objects"),
    ('[{"combine": {"median": 1}}]', "KeyError: 'name'"),
])
def test_the_bench_refuses_an_engine_json_that_is_not_ep_benchs_before_the_run(tmp_path, capsys, content, reason):
    from expert_parallel import bench

    path = tmp_path / "engine.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--case", "tiny", "--iterations", "1", "--engine-json", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"--engine-json {path}: not ep-bench's --json output (a list of measurements): " in err and reason in err, err


def test_the_bench_refuses_a_negative_seed(capsys):
    from expert_parallel import bench

    with pytest.raises(SystemExit) as exited:
        bench.main(["--case", "tiny", "--seed", "-1"])
    assert exited.value.code == 2
    assert "--seed -1: must be ≥ 0" in capsys.readouterr().err
