"""The pooled worker's executor for push sends (``workers.worker.GreenletExecutor``): at most
``limit`` sends run at once, the rest wait in order without blocking the submitter, and every
send's answer (or error) reaches its callback."""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event

from workers.worker import GreenletExecutor


def test_at_most_limit_run_at_once_the_rest_wait_in_order_and_all_answer() -> None:
    executor = GreenletExecutor("apns", 3)
    release = gevent.event.Event()
    running: list[int] = []
    peak = [0]
    started: list[int] = []

    def send(i: int) -> int:
        started.append(i)
        running.append(i)
        peak[0] = max(peak[0], len(running))
        release.wait()
        running.remove(i)
        if i == 4:
            raise ValueError("provider exploded")
        return i * 10

    answers: list[Any] = []
    sends = [executor.submit(send, i) for i in range(10)]  # never blocks, whatever the limit
    for sent in sends:
        sent.add_done_callback(answers.append)
    gevent.sleep(0.01)
    assert started == [0, 1, 2] and executor.running == 3 and len(executor.waiting) == 7
    release.set()
    with gevent.Timeout(5):
        while len(answers) < 10:
            gevent.sleep(0.001)
    assert peak[0] == 3 and started == list(range(10))  # first come, first served
    assert executor.running == 0 and not executor.waiting
    for i, sent in enumerate(sends):
        if i == 4:
            try:
                sent.result()
            except ValueError as exc:
                assert "exploded" in str(exc)
            else:
                raise AssertionError("the send's error was lost")
        else:
            assert sent.result() == i * 10
    late: list[Any] = []
    sends[0].add_done_callback(late.append)  # already done: called at once
    assert late == [sends[0]]
