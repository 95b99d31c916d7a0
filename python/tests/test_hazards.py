"""Hazards a new user met (issue 13, item 8), each now an error that names its cause or a safe
behaviour, on the CPU backend with NumPy (no GPU):

- arrays in non-native byte order are rejected, naming the argument and the byte order (the
  library reads native numbers, so a big-endian array gave wrong sums);
- a group shared between threads gives every call its own result (each call holds the group's
  lock; a dispatch and its combine held together give the whole step);
- an option of the wrong type raises InvalidArgumentError naming the option, the value and what
  it accepts (it raised a bare TypeError);
- a buffer that cannot exist or cannot be allocated raises ep.OutOfMemoryError (a MemoryError)
  naming the buffer and its bytes."""

import inspect
import re
import sys
import threading

import numpy as np
import pytest

import expert_parallel as ep

R, E, H, K, B = 4, 8, 64, 2, 16
FOREIGN = ">" if sys.byteorder == "little" else "<"
FOREIGN_NAME = "big-endian" if FOREIGN == ">" else "little-endian"


def small_group(**overrides):
    settings = dict(ranks=2, experts=4, hidden=8, top_k=2, max_tokens=2, dtype="f32", device="cpu")
    settings.update(overrides)
    return ep.VirtualGroup(**settings)


def small_step():
    xs = [np.full((1, 8), 1.0, np.float32), np.full((1, 8), 2.0, np.float32)]
    idx = [np.array([[0, 3]], np.int32)] * 2
    weights = [np.array([[0.25, 0.5]], np.float32)] * 2
    return xs, idx, weights


def foreign(array):
    """`array` with the same values in the other byte order."""
    return array.astype(array.dtype.newbyteorder(FOREIGN))


# -- byte order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["xs", "topk_idx", "topk_weights"])
def test_dispatch_rejects_foreign_byte_order_naming_the_argument(argument):
    group = small_group()
    xs, idx, weights = small_step()
    chosen = {"xs": xs, "topk_idx": idx, "topk_weights": weights}[argument]
    chosen[1] = foreign(chosen[1])
    assert np.array_equal(chosen[1], chosen[0] if argument != "xs" else 2 * chosen[0])  # same values
    with pytest.raises(ep.InvalidArgumentError, match=rf"{argument}\[1\]: byte order {FOREIGN_NAME} "
                                                      rf"\(dtype '\{FOREIGN}.\d'\); must be the machine's native"):
        group.dispatch(xs, idx, weights)


def test_combine_rejects_foreign_byte_order():
    group = small_group()
    out = group.dispatch(*small_step())
    outputs = [out.tokens[0], foreign(out.tokens[1])]
    with pytest.raises(ep.InvalidArgumentError, match=rf"expert_outputs\[1\]: byte order {FOREIGN_NAME}"):
        group.combine(outputs, out.handle)
    # the native arrays still combine: 0.25 * 2 + 0.5 * 2 for rank 1's token
    assert group.combine(out.tokens, out.handle)[1][0, 0] == 1.5


def test_bf16_bits_in_foreign_byte_order_are_rejected():
    group = small_group(dtype="bf16")
    xs, idx, weights = small_step()
    xs = [np.full((1, 8), 0x3F80, np.uint16), foreign(np.full((1, 8), 0x3F80, np.uint16))]
    with pytest.raises(ep.InvalidArgumentError, match=rf"xs\[1\]: byte order {FOREIGN_NAME}"):
        group.dispatch(xs, idx, weights)


def test_explicit_native_byte_order_is_accepted():
    group = small_group()
    xs, idx, weights = small_step()
    native = "<" if sys.byteorder == "little" else ">"
    xs = [x.astype(native + "f4") for x in xs]
    out = group.dispatch(xs, idx, weights)
    assert group.combine(out.tokens, out.handle)[1][0, 0] == 1.5


# -- one group, several threads -----------------------------------------------------------------


def random_step(seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(R)]
    idx = [np.stack([rng.choice(E, K, replace=False) for _ in range(B)]).astype(np.int32) for _ in range(R)]
    weights = [rng.random((B, K)).astype(np.float32) for _ in range(R)]
    return xs, idx, weights


@pytest.fixture
def shared():
    """A group and, per seed, its inputs and the results of a dispatch and combine run alone."""
    group = ep.VirtualGroup(ranks=R, experts=E, hidden=H, top_k=K, max_tokens=B, dtype="f32", device="cpu")
    expected = {}
    for seed in range(8):
        step = random_step(seed)
        out = group.dispatch(*step)
        expected[seed] = (step, [t.copy() for t in out.tokens], out.layout,
                          [c.copy() for c in group.combine(out.tokens, out.handle)])
    yield group, expected
    group.close()


def run_threads(work, seeds):
    failures = []

    def guarded(seed):
        try:
            work(seed)
        except BaseException as error:  # reported by the test, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def test_threads_sharing_a_group_get_their_own_dispatch(shared):
    """Threads with a handle each and their own output arrays (out=) share a group safely: the
    group's calls never interleave, and nothing a thread reads is another thread's."""
    group, expected = shared
    wrong = []

    def work(seed):
        step, tokens, layout, _ = expected[seed]
        mine = [np.full_like(t, 7) for t in tokens]
        with group.handle() as handle:
            for _ in range(40):
                out = group.dispatch(*step, handle=handle, out=(mine, None, None))
                # Rows outside the received zones are unspecified: compare the received ones.
                used = [[row for e in range(layout[r].expert_counters.__len__())
                         for row in range(e * R * B, e * R * B + layout[r].expert_counters[e])] for r in range(R)]
                if (not all(np.array_equal(got.reshape(-1, H)[rows], want.reshape(-1, H)[rows])
                            for got, want, rows in zip(out.tokens, tokens, used)) or out.layout != layout):
                    wrong.append(seed)

    run_threads(work, range(8))
    assert wrong == []


def test_threads_holding_the_lock_run_whole_steps(shared):
    group, expected = shared

    def work(seed):
        step, _, _, combined = expected[seed]
        for _ in range(20):
            with group.lock:   # the results are views of the group's buffers: read them under the lock
                out = group.dispatch(*step)
                y = group.combine(out.tokens, out.handle)
                assert all(np.array_equal(got, want) for got, want in zip(y, combined)), f"seed {seed}"

    run_threads(work, range(8))


def test_threads_interleaving_steps_get_their_result_or_a_named_error(shared):
    """Without the lock held across a step, another thread's dispatch may come between a dispatch
    and its combine: that combine is refused (InvalidUsageError naming the steps), never wrong."""
    group, expected = shared
    refused = []

    def work(seed):
        step, _, _, combined = expected[seed]
        mine = [np.empty_like(c) for c in combined]
        for _ in range(20):
            out = group.dispatch(*step)
            try:
                # The expert outputs may be rewritten by another thread's dispatch into the same
                # slot; copied here, they are this thread's (or the combine is refused).
                y = group.combine([t.copy() for t in out.tokens], out.handle, out=mine)
            except ep.InvalidUsageError as error:
                assert "handle: from step" in str(error)
                refused.append(seed)
                continue
            assert all(np.array_equal(got, want) for got, want in zip(y, combined)), f"seed {seed}"

    run_threads(work, range(8))


def test_every_call_of_every_group_holds_the_lock():
    for cls, names in ((ep.VirtualGroup, ["dispatch", "combine", "complete", "handle", "deactivate", "clean", "check",
                                          "close", "_layout_of"]),
                       (ep.NCCLGroup, ["update", "dispatch", "combine", "complete", "handle", "check", "close",
                                       "_layout_of"])):
        for name in names:
            method = getattr(cls, name)
            # @locked, or (the data path) the same lock taken in line: a with statement, or
            # acquire() and a try whose finally releases it
            source = inspect.getsource(method)
            takes = (hasattr(method, "__wrapped__") or "with self._lock:" in source
                     or (re.search(r"\n        lock = self\._lock\b.*\n        lock\.acquire\(\).*\n        try:\n", source) is not None
                         and re.search(r"\n        finally:\n            lock\.release\(\)\n$", source) is not None))
            assert takes, f"{cls.__name__}.{name} does not take the lock"
        assert hasattr(cls.active_ranks.fget, "__wrapped__")


def test_the_data_path_holds_the_lock_over_the_library_call_and_releases_it_on_every_exit():
    """dispatch and combine (the common call's in-line path and the general one) hold the group's
    lock while the library runs, and have released it after they return or raise."""
    torch = pytest.importorskip("torch")
    group = small_group(max_tokens=1)
    lock = group._lock
    held = []
    for name in ("_fn_dispatch_stacked", "_fn_combine_stacked", "_fn_update", "_fn_dispatch", "_fn_combine"):
        def probe(*arguments, call=getattr(group, name), name=name):
            held.append((name, lock._is_owned()))
            return call(*arguments)
        setattr(group, name, probe)
    stacked = [torch.from_numpy(np.stack(a)) for a in small_step()]
    for step in (stacked, small_step()):
        out = group.dispatch(*step)
        assert not lock._is_owned()
        group.combine(out.received if out.received is not None else out.tokens, out.handle)
        assert not lock._is_owned()
    assert {name for name, _ in held} == {"_fn_dispatch_stacked", "_fn_combine_stacked", "_fn_update", "_fn_dispatch", "_fn_combine"}
    assert all(owned for _, owned in held), held
    for call in (lambda: group.dispatch(stacked[0].double(), *stacked[1:]), lambda: group.combine(stacked[0], out.handle)):
        with pytest.raises(ep.InvalidArgumentError):
            call()
        assert not lock._is_owned()
    taken = []   # (another thread takes it at once: nothing left it held)
    other = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False) and (lock.release() or True)))
    other.start()
    other.join()
    assert taken == [True]


def test_the_lock_is_reentrant_and_per_group():
    first, second = small_group(), small_group()
    assert first.lock is not second.lock
    with first.lock:
        out = first.dispatch(*small_step())  # the calls take the lock the caller holds
        first.combine(out.tokens, out.handle)
        assert first.active_ranks == [0, 1]


# -- options of the wrong type ------------------------------------------------------------------


@pytest.mark.parametrize("option,value,accepted", [
    ("algorithm", ["ll"], "'ll', 'ht'"),
    ("layout", ["flat"], "'expert_major', 'rank_major', 'flat', 'expert_major_padded'"),
    ("overflow", ["fail"], "'fail', 'drop'"),
    ("algorithm", {"ll": 1}, "'ll', 'ht'"),
    ("overflow", 0, "'fail', 'drop'"),
])
def test_group_options_of_the_wrong_type(option, value, accepted):
    with pytest.raises(ep.InvalidArgumentError) as caught:
        small_group(**{option: value})
    text = str(caught.value)
    assert text.startswith(f"{option}={value!r} (type {type(value).__name__}); must be one of {accepted}"), text


@pytest.mark.parametrize("call", ["dispatch", "combine"])
@pytest.mark.parametrize("option,value,accepted", [
    ("direction", ["forward"], "'forward', 'backward'"),
    ("launch", ["single"], "'single', 'per_rank'"),
    ("direction", None, "'forward', 'backward'"),
])
def test_call_options_of_the_wrong_type(call, option, value, accepted):
    group = small_group()
    out = group.dispatch(*small_step())
    with pytest.raises(ep.InvalidArgumentError, match=rf"^{option}={value!r}".replace("[", r"\[").replace("]", r"\]")
                       + rf" \(type {type(value).__name__}\); must be one of {accepted}"):
        if call == "dispatch":
            group.dispatch(*small_step(), **{option: value})
        else:
            group.combine(out.tokens, out.handle, **{option: value})
    group.combine(out.tokens, out.handle)  # the refused call changed nothing


@pytest.mark.parametrize("out,match", [
    (3, r"^out: a int; must be one tensor per rank \(2\)"),
    (True, r"^out: a bool; must be one tensor per rank \(2\)"),
    ("ab", r"^out: a str; must be one tensor per rank \(2\)"),
    ([np.zeros((1, 8), np.float32)], r"^out: 1 entries; must be one tensor per rank \(2\)"),
])
def test_the_callers_outputs_of_the_wrong_kind_are_named(out, match):
    # They raised a bare TypeError ('int' object is not subscriptable).
    group = small_group()
    step = group.dispatch(*small_step())
    with pytest.raises(ep.InvalidArgumentError, match=match):
        group.combine(step.tokens, step.handle, out=out)
    with pytest.raises(ep.InvalidArgumentError, match=match.replace("^out:", "^out tokens:")):
        group.dispatch(*small_step(), out=(out, None, None))
    group.combine(step.tokens, step.handle)   # the refused calls changed nothing


@pytest.mark.parametrize("kind", ["dict by rank", "dict", "set"])
def test_the_callers_outputs_in_a_container_of_another_kind_are_named(kind):
    # README: out= takes per-rank lists or one stacked array, and "another kind is refused saying
    # what out= must be". A container of R entries of another kind was taken by its len(): a dict
    # keyed by rank ran the call and returned the dict's keys as the results ([0, 1]), another
    # dict raised a bare KeyError, a set a bare TypeError ('set' object is not subscriptable).
    group = small_group()
    step = group.dispatch(*small_step())

    def make(shape):
        arrays = [np.zeros(shape, np.float32) for _ in range(2)]
        if kind == "dict by rank":
            return dict(enumerate(arrays))
        if kind == "dict":
            return {"a": arrays[0], "b": arrays[1]}
        return {1, 2}   # (arrays are unhashable: a set of two of anything)

    name = {"dict by rank": "dict", "dict": "dict", "set": "set"}[kind]
    with pytest.raises(ep.InvalidArgumentError, match=rf"^out: a {name}; must be one tensor per rank \(2\)"):
        group.combine(step.tokens, step.handle, out=make((1, 8)))
    with pytest.raises(ep.InvalidArgumentError, match=rf"^out tokens: a {name}; must be one tensor per rank \(2\)"):
        group.dispatch(*small_step(), out=(make(group.recv_shape), None, None))
    group.combine(step.tokens, step.handle)   # the refused calls changed nothing


@pytest.mark.parametrize("value", [3, 1.0, "01"])
def test_clean_takes_an_iterable_of_ranks(value):
    group = small_group()
    group.deactivate(1)
    with pytest.raises(ep.InvalidArgumentError, match=rf"^ranks={value!r} \(type {type(value).__name__}\); must be "
                                                      r"an iterable of rank numbers in \[0, 1\]"):
        group.clean(value)
    assert group.active_ranks == [0]
    group.clean([1])
    assert group.active_ranks == [0, 1]


# -- buffers that cannot fit ------------------------------------------------------------------


def test_a_buffer_larger_than_any_address_space_is_refused_at_creation():
    # LL expert-major receive buffer: [L, R * max_tokens, hidden] = [2, 2**31, 2**30] f32 = 2**64 bytes
    with pytest.raises(ep.OutOfMemoryError) as caught:
        small_group(hidden=2**30, max_tokens=2**30)
    error = caught.value
    assert isinstance(error, MemoryError) and isinstance(error, ep.ExpertParallelError)
    assert "the receive buffer" in str(error) and "[2, 2147483648, 1073741824] f32" in str(error)
    assert f"{2**64} bytes (16.0 EiB)" in str(error) and "max_tokens" in str(error)


def test_a_buffer_that_cannot_be_allocated_names_itself_and_its_bytes():
    # [2, 2 * 2**30, 2**26] f32 = 2**60 bytes: a valid size that no machine can allocate
    group = small_group(hidden=2**26, max_tokens=2**30)
    xs = [np.zeros((1, 2**26), np.float32)] * 2  # calloc'd: address space, no memory
    idx = [np.array([[0, 3]], np.int32)] * 2
    weights = [np.array([[0.25, 0.5]], np.float32)] * 2
    with pytest.raises(MemoryError) as caught:
        group.dispatch(xs, idx, weights)
    error = caught.value
    assert isinstance(error, ep.OutOfMemoryError) and isinstance(error, ep.ExpertParallelError)
    text = str(error)
    # The group's receive buffers of one buffer slot: every rank's [2, 2 * 2**30, 2**26] at once.
    assert text.startswith(f"buffer slot 0 tokens: [2, 2, {2 * 2**30}, {2**26}] f32 needs {2**61} bytes (2.0 EiB), "
                           "which could not be allocated"), text
    assert "lower max_tokens or hidden" in text


def test_the_allocator_names_numpy_size_errors(monkeypatch):
    """Allocation failures of NumPy (MemoryError, ValueError for sizes it cannot represent) become
    OutOfMemoryError naming the buffer."""
    from expert_parallel import _abi, _arrays

    allocate = _arrays.Allocator(np.zeros(1, np.float32))

    def too_big(*arguments, **keywords):
        raise ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size.")

    monkeypatch.setattr(np, "zeros", too_big)
    with pytest.raises(ep.OutOfMemoryError, match=r"^combined tokens\[0\]: \[4, 8\] f32 needs 128 bytes, which could "
                                                  r"not be allocated: array is too big"):
        allocate.zeros((4, 8), _abi.F32, name="combined tokens[0]")


def test_an_event_to_wait_for_must_be_an_event_on_the_gpu_and_is_moot_on_the_cpu():
    # A GPU group's stream waits for wait_event (torch.cuda.Event); anything else raised whatever
    # torch raised for it. A CPU group's calls run at once: nothing to wait for.
    from expert_parallel import _fast

    for event in (3, "ready", object()):
        with pytest.raises(ep.InvalidArgumentError, match=rf"^wait_event: a {type(event).__name__}; must be a torch.cuda.Event"):
            _fast.wait(0, None, event)
    group = small_group()
    out = group.dispatch(*small_step(), wait_event=object())
    group.combine(out.tokens, out.handle, wait_event=object())
