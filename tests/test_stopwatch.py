"""The training clock (`train.Stopwatch`) on a clock the test moves: only the spans between start
and a pause count, marks read back in order as running totals, and on CUDA the device is waited for
only where time is read."""

import time

import pytest
import torch

from speedrun import train
from speedrun.runlog import mfu
from speedrun.train import Stopwatch


class FakeClock:
    """`time` for speedrun.train, with a perf_counter that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(train, "time", fake)
    return fake


def run_steps(watch, clock, steps, seconds):
    for step, s in zip(steps, seconds):
        clock.advance(s)
        watch.mark(step)


def test_paused_spans_are_not_counted_and_marks_read_back_as_running_totals(clock):
    watch = Stopwatch(torch.device("cpu"), elapsed_ms=500.0)  # resumed: 0.5 s of training before
    clock.advance(7.0)  # before the start: not counted
    with watch.paused():  # a validation before the first step (step 0, or the resumed step)
        clock.advance(3.0)
    assert not watch.running and watch.total_ms == 500.0
    watch.start()
    run_steps(watch, clock, [1, 2, 3], [1.0, 2.0, 0.5])
    assert watch.laps() == [(1, 1500.0), (2, 3500.0), (3, 4000.0)]
    assert watch.laps() == []  # each mark is read once
    run_steps(watch, clock, [4], [0.25])
    with watch.paused():
        assert watch.total_ms == 4250.0
        clock.advance(60.0)  # a validation
    run_steps(watch, clock, [5, 6], [1.0, 1.0])
    # the mark before the pause keeps its time, and the minute inside it is in no total
    assert watch.laps() == [(4, 4250.0), (5, 5250.0), (6, 6250.0)]
    clock.advance(0.75)
    assert watch.stop() == watch.total_ms == 7000.0
    clock.advance(30.0)
    watch.start()
    run_steps(watch, clock, [7], [1.0])
    totals = [ms for _, ms in watch.laps()]
    assert totals == [8000.0]


def test_totals_on_the_real_clock_grow_and_leave_out_a_pause():
    watch = Stopwatch(torch.device("cpu"))
    watch.start()
    for step in range(1, 4):
        sum(range(10_000))
        watch.mark(step)
    with watch.paused():
        time.sleep(0.5)
    watch.mark(4)
    laps = watch.laps()
    assert [step for step, _ in laps] == [1, 2, 3, 4]
    totals = [ms for _, ms in laps]
    assert 0 < totals[0] and totals == sorted(totals)
    assert watch.stop() >= totals[-1] and watch.total_ms < 500


class FakeEvent:
    """A CUDA event on a fake device timeline: `record` stamps the device's time, `synchronize`
    waits for it (the host waits for the device only through it or `torch.cuda.synchronize`)."""

    device_ms = 0.0
    waits: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = FakeEvent.device_ms

    def synchronize(self):
        FakeEvent.waits.append(("event", self.at))

    def elapsed_time(self, end):
        return end.at - self.at


def test_on_cuda_steps_are_marked_without_waiting_for_the_device(monkeypatch):
    FakeEvent.device_ms, FakeEvent.waits = 0.0, []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: FakeEvent.waits.append(("device", device)))
    device = torch.device("cuda", 0)
    watch = Stopwatch(device, elapsed_ms=10.0)
    watch.start()
    assert FakeEvent.waits == [("device", device)]  # a span starts with an idle device
    for step in range(1, 4):
        FakeEvent.device_ms += 2.0
        watch.mark(step)
    assert len(FakeEvent.waits) == 1  # marking queues an event and nothing else
    assert watch.laps() == [(1, 12.0), (2, 14.0), (3, 16.0)]
    assert FakeEvent.waits[1:] == [("event", 6.0)]  # reading waits once, for the last mark only
    with watch.paused():
        assert FakeEvent.waits[2:] == [("event", 6.0)] and watch.total_ms == 16.0
        FakeEvent.device_ms += 100.0
    assert FakeEvent.waits[3:] == [("device", device)]
    FakeEvent.device_ms += 1.0
    watch.mark(4)
    assert watch.laps() == [(4, 17.0)]


def test_mfu_is_model_flops_over_every_devices_peak():
    assert mfu(6e9, 1e4, 1e15, 2) == pytest.approx(6e13 / 2e15)
    assert mfu(6e9, 1e4, None, 1) is None
