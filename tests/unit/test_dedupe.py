"""cloud.dedupe: a re-sent request is served once and its answer is never withheld."""
import pytest

from cloud.dedupe import DedupeWindow, Verdict


class Clock:
    def __init__(self):
        self.us = 1_000_000_000

    def __call__(self):
        return self.us


def test_first_copy_is_new_and_a_copy_while_it_is_served_is_dropped():
    w = DedupeWindow(clock=Clock())
    assert w.check("pi-1", 7) == (Verdict.NEW, None)
    assert w.check("pi-1", 7) == (Verdict.IN_FLIGHT, None)
    # the same request id from another device is another request
    assert w.check("pi-2", 7) == (Verdict.NEW, None)
    assert w.stats.new == 2 and w.stats.duplicates == 1


def test_a_resend_after_the_answer_gets_the_same_answer_again():
    clock = Clock()
    w = DedupeWindow(clock=clock)
    w.check("pi-1", 7)
    clock.us += 1000
    w.answered("pi-1", 7, "edgesplit/v1/f/pi-1/results", b"answer-bytes")
    clock.us += 5_000_000                       # the device re-sends 5 s later: it missed the answer
    verdict, stored = w.check("pi-1", 7)
    assert verdict is Verdict.ANSWERED
    assert stored == ("edgesplit/v1/f/pi-1/results", b"answer-bytes")
    assert w.stats.republished == 1


def test_a_resend_that_arrived_before_the_answer_left_is_dropped():
    clock = Clock()
    w = DedupeWindow(clock=clock)
    t_first = clock.us
    w.check("pi-1", 7, t_recv_us=t_first)
    t_resend = clock.us + 100                   # queued behind the original in the same batch run
    clock.us += 2000
    w.answered("pi-1", 7, "t", b"a")
    assert w.check("pi-1", 7, t_recv_us=t_resend) == (Verdict.OVERTAKEN, None)
    assert w.stats.overtaken == 1


def test_bounded_by_size_oldest_forgotten_first():
    w = DedupeWindow(max_entries=3, clock=Clock())
    for rid in range(5):
        w.check("d", rid)
    assert len(w) == 3
    assert ("d", 0) not in w and ("d", 1) not in w and ("d", 4) in w
    assert w.stats.forgotten == 2
    assert w.check("d", 0)[0] is Verdict.NEW     # forgotten: served again


def test_bounded_by_age():
    clock = Clock()
    w = DedupeWindow(max_age_s=10, clock=clock)
    w.check("d", 1)
    w.answered("d", 1, "t", b"a")
    clock.us += 5_000_000
    w.check("d", 2)
    clock.us += 6_000_000                       # 11 s after the first, 6 s after the second
    assert w.check("d", 1)[0] is Verdict.NEW
    assert w.check("d", 2)[0] is Verdict.IN_FLIGHT


def test_resends_do_not_keep_an_entry_alive():
    clock = Clock()
    w = DedupeWindow(max_age_s=10, clock=clock)
    w.check("d", 1)
    w.answered("d", 1, "t", b"a")
    for _ in range(3):
        clock.us += 3_000_000
        assert w.check("d", 1)[0] is Verdict.ANSWERED
    clock.us += 2_000_000
    assert w.check("d", 1)[0] is Verdict.NEW    # 11 s after the first copy


def test_forget_lets_the_next_copy_be_served():
    w = DedupeWindow(clock=Clock())
    w.check("d", 1)
    w.forget("d", 1)
    assert w.check("d", 1)[0] is Verdict.NEW


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        DedupeWindow(max_entries=0)
    with pytest.raises(ValueError):
        DedupeWindow(max_age_s=0)
