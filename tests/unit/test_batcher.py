"""Micro-batching: frames that arrive together run together; nothing is lost on close."""
import threading
import time

from cloud.batcher import MicroBatcher


def test_items_that_arrive_together_form_batches_up_to_max():
    batches = []
    gate = threading.Event()

    def process(batch):
        gate.wait(5)                  # hold the first batch so the rest pile up
        batches.append(list(batch))

    b = MicroBatcher(process, max_batch=8, max_wait_s=0.005)
    for i in range(50):
        b.put(i)
    gate.set()
    assert b.close(10)
    assert [x for batch in batches for x in batch] == list(range(50))   # all, once, in order
    assert max(len(x) for x in batches) == 8
    assert len(batches) < 50


def test_a_lone_item_waits_at_most_about_max_wait():
    done = threading.Event()
    b = MicroBatcher(lambda batch: done.set(), max_batch=32, max_wait_s=0.005)
    b.put("x")
    assert done.wait(2)
    b.close(2)


def test_close_processes_everything_queued_and_refuses_more():
    seen = []
    b = MicroBatcher(lambda batch: (time.sleep(0.01), seen.extend(batch)), max_batch=4, max_wait_s=0)
    for i in range(40):
        b.put(i)
    assert b.close(10)
    assert seen == list(range(40))
    assert b.put(99) is False


def test_a_failing_batch_does_not_stop_the_batcher():
    seen = []

    def process(batch):
        if 0 in batch:
            raise RuntimeError("boom")
        seen.extend(batch)

    b = MicroBatcher(process, max_batch=1, max_wait_s=0)
    for i in range(5):
        b.put(i)
    assert b.close(5)
    assert seen == [1, 2, 3, 4]
