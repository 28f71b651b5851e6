"""The EMA update on a CPU runs beside the caller: same values as inline, readers and errors wait for it."""

import os
import threading

import pytest
import torch

from pixeldit.parallel import ema as ema_module
from pixeldit.parallel.ema import Fragment, ShardedEMA, a_core_is_free


@pytest.fixture(autouse=True)
def free_core(monkeypatch):
    """The tests below take the beside-the-step path whatever this machine's core count."""
    monkeypatch.setattr(ema_module, "a_core_is_free", lambda: True)


def _ema(masters, decay=0.9, warmup=True):
    fragments = [Fragment(f"p{i}", tuple(m.shape), 0, m.view(-1)) for i, m in enumerate(masters)]
    return ShardedEMA(fragments, decay, warmup)


def test_updates_give_the_inline_recurrence_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    masters = [torch.randn(7, 5, generator=gen), torch.randn(300, generator=gen)]
    ema = _ema(masters)
    expected = [m.clone() for m in masters]
    for n in range(5):
        ema.settle()  # what the trainer does before the optimizer changes the masters
        for m in masters:
            m.add_(torch.randn(m.shape, generator=gen))
        ema.update()
        weight = 1.0 - min(0.9, (1 + n) / (10 + n))
        for e, m in zip(expected, masters):
            e.lerp_(m, weight)
    for got, want in zip(ema.shadow, expected):
        assert torch.equal(got.view(want.shape), want)
    assert ema.updates == 5


def test_update_returns_before_the_lerp_and_readers_wait_for_it(monkeypatch):
    release, started = threading.Event(), threading.Event()
    lerp = ema_module._lerp

    def held(*args):
        started.set()
        assert release.wait(10), "the test never released the update"
        lerp(*args)
    monkeypatch.setattr(ema_module, "_lerp", held)
    masters = [torch.ones(4)]
    ema = _ema(masters, warmup=False)
    ema._shadow[0].zero_()
    ema.update()  # returns while the update is held
    assert started.wait(10) and ema._shadow[0].sum() == 0
    read = []
    reader = threading.Thread(target=lambda: read.append(ema.shadow[0].clone()))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive(), "shadow was read while the update was in flight"
    release.set()
    reader.join(10)
    assert torch.allclose(read[0], torch.full((4,), 0.1))


def test_an_error_in_the_update_is_raised_to_the_next_caller(monkeypatch):
    def broken(*args):
        raise RuntimeError("lerp failed")
    monkeypatch.setattr(ema_module, "_lerp", broken)
    ema = _ema([torch.ones(3)])
    ema.update()
    with pytest.raises(RuntimeError, match="lerp failed"):
        ema.settle()
    ema.settle()  # reported once; the EMA is usable again


def test_with_every_core_busy_the_update_is_done_when_it_returns(monkeypatch):
    monkeypatch.setattr(ema_module, "a_core_is_free", lambda: False)
    ema = _ema([torch.ones(4)], warmup=False)
    ema._shadow[0].zero_()
    ema.update()
    assert ema._pending is None and ema._worker is None
    assert torch.allclose(ema._shadow[0], torch.full((4,), 0.1))


def test_a_core_is_free_compares_the_intra_op_threads_with_the_cores():
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(cores)
        assert not a_core_is_free()
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert a_core_is_free()
    finally:
        torch.set_num_threads(threads)
