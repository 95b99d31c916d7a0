"""Finalizers and the group's lock: garbage collection runs on whichever thread triggers it, and
the docs suggest holding ``group.lock`` for a whole step (``with group.lock:`` around dispatch,
the experts, combine). A finalizer that waited for that lock (a collected handle releasing its
step, a step token's callback, a dropped Exchange) stalled a worker thread until the step ended,
and deadlocked a holder that waits for the worker. They no longer wait; what they leave is done
by the lock's next holder, or by the handles' own finalizers."""

import gc
import threading

import pytest

import expert_parallel as ep

torch = pytest.importorskip("torch")


def _routing():
    return torch.tensor([[[0, 1], [2, 3]]] * 2, dtype=torch.int32)


def _collect_on_another_thread_while_holding(lock, timeout=2.0):
    """Runs gc.collect() on a worker thread while this thread holds `lock` (``with group.lock:``,
    as the docs suggest for a whole step, the experts run meanwhile, here by a worker); True when the
    worker's collection finished while the lock was held."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (gc.collect(), done.set()), daemon=True)
    with lock:
        worker.start()
        finished = done.wait(timeout)
    worker.join(timeout)
    return finished


def _garbage(make):
    """make()'s garbage (a reference cycle holding it), made with the collector off so that
    nothing collects it before the test does."""
    was = gc.isenabled()
    gc.disable()
    try:
        value = make()
        cycle = [value]
        cycle.append(cycle)
        del value, cycle
    except BaseException:
        if was:
            gc.enable()
        raise
    return was


def _collected_while_held(make, lock):
    """make()'s garbage collected on a worker thread while this thread holds `lock`: True when
    the collection finished meanwhile (no finalizer waited for the lock)."""
    was = _garbage(make)
    try:
        return _collect_on_another_thread_while_holding(lock)
    finally:
        if was:
            gc.enable()


def test_a_handle_collected_on_another_thread_does_not_wait_for_the_group_lock():
    """_HeldHandle.__del__ -> release() -> _release_step takes the group's lock: a collection on
    a worker thread while the caller holds group.lock blocks the worker until the lock is
    released (a deadlock where the holder waits for that worker)."""
    group = ep.VirtualGroup(2, 4, 8, 2, 4)
    assert _collected_while_held(group.handle, group.lock), "the finalizer waited for the group's lock"


def test_a_step_token_freed_on_another_thread_does_not_wait_for_the_group_lock():
    """A step token's weak-reference callback (_registry.Entry._retire) takes the group's lock too."""
    from expert_parallel.torch import Exchange

    group = ep.VirtualGroup(2, 4, 8, 2, 4)
    exchange = Exchange(group)

    def dispatched():
        return exchange.dispatch(torch.randn(2, 2, 8, dtype=torch.bfloat16), _routing(), torch.ones(2, 2, 2))

    from expert_parallel.torch import _registry

    entry = _registry.entry(exchange.id)
    assert _collected_while_held(dispatched, group.lock), "the token's callback waited for the group's lock"
    # The step left at once; its handle went to the pool by the lock's next holder (the next step).
    assert not entry.live and len(entry._retired) == 1 and not entry.free
    sent = dispatched()
    assert not entry._retired and len(entry.live) == 1 and not entry.free   # (the retired handle serves it)
    assert exchange.combine(sent.tokens, sent).shape == (2, 2, 8)


def test_an_exchange_collected_on_another_thread_does_not_wait_for_the_group_lock():
    """An Exchange's finalizer (weakref.finalize -> _registry.unregister -> Entry.close) takes the
    group's lock too."""
    from expert_parallel.torch import Exchange

    group = ep.VirtualGroup(2, 4, 8, 2, 4)
    from expert_parallel.torch import _registry

    numbers = []

    def made():
        exchange = Exchange(group)
        numbers.append(exchange.id)
        sent = exchange.dispatch(torch.randn(2, 2, 8, dtype=torch.bfloat16), _routing(), torch.ones(2, 2, 2))
        exchange.combine(sent.tokens, sent)   # (its handle back in the pool: released by its own finalizer)
        return exchange

    assert _collected_while_held(made, group.lock), "the exchange's finalizer waited for the group's lock"
    gc.collect()
    assert numbers[0] not in _registry._entries   # (closed and forgotten: no live step)
    again = Exchange(group)
    sent = again.dispatch(torch.randn(2, 2, 8, dtype=torch.bfloat16), _routing(), torch.ones(2, 2, 2))
    assert again.combine(sent.tokens, sent).shape == (2, 2, 8)
