"""Background: the callback's worker thread (order, back-pressure, milestones, failures)."""

import threading
import time

import pytest

from lightning_repsim.callbacks._background import Background


def test_jobs_run_in_order_on_one_other_thread():
    worker = Background(max_pending=3)
    seen = []
    for i in range(6):
        worker.submit(f"job {i}", lambda done, i=i: seen.append((i, threading.current_thread().name)))
    worker.drain()
    assert [i for i, _ in seen] == list(range(6))
    threads = {name for _, name in seen}
    assert len(threads) == 1 and threads != {threading.current_thread().name}
    worker.close()


def test_submit_blocks_while_max_pending_jobs_are_unfinished():
    worker = Background(max_pending=2)
    release = threading.Event()
    worker.submit("a", lambda done: release.wait(5))
    worker.submit("b", lambda done: None)
    assert worker.pending == 2
    blocked = threading.Thread(target=worker.submit, args=("c", lambda done: None))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # waiting for "a" to finish
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    worker.close()
    assert worker.pending == 0


def test_wait_milestones_waits_for_the_durable_part_only():
    worker = Background()
    stored, finish = threading.Event(), threading.Event()

    def work(done):
        time.sleep(0.1)
        stored.set()
        done()
        finish.wait(5)  # the figures, still being drawn

    worker.submit("step 3", work)
    worker.wait_milestones()
    assert stored.is_set() and worker.pending == 1
    finish.set()
    worker.close()


def test_failures_come_back_with_label_and_context_and_do_not_stop_later_jobs():
    worker = Background()
    ran = []

    def fail(done):
        raise RuntimeError("boom")

    worker.submit("the snapshot of global step 4", fail, context=4)
    worker.submit("next", lambda done: ran.append(1), context=8)
    worker.wait_milestones()  # a failed job still releases waiters
    worker.drain()
    failures = worker.failures()
    assert [(f.label, f.context, type(f.error)) for f in failures] == [
        ("the snapshot of global step 4", 4, RuntimeError)
    ]
    assert "boom" in failures[0].traceback and ran == [1]
    assert worker.failures() == []  # handed over once
    worker.close()


def test_close_then_reuse_starts_a_new_thread():
    worker = Background()
    worker.submit("a", lambda done: None)
    worker.close()
    out = []
    worker.submit("b", lambda done: out.append(2))
    worker.close()
    assert out == [2]


@pytest.mark.parametrize("max_pending", [1, 4])
def test_drain_returns_only_when_everything_ran(max_pending):
    worker = Background(max_pending=max_pending)
    out = []
    for i in range(5):
        worker.submit(str(i), lambda done, i=i: (time.sleep(0.01), out.append(i)))
    worker.drain()
    assert out == [0, 1, 2, 3, 4]
    worker.close()


def test_initializer_runs_in_the_worker_thread_only():
    import torch

    before = torch.get_num_threads()
    worker = Background(initializer=lambda: torch.set_num_threads(1))
    seen = []
    worker.submit("a", lambda done: seen.append(torch.get_num_threads()))
    worker.close()
    assert seen == [1] and torch.get_num_threads() == before
