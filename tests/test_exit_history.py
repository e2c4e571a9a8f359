"""ExitHistory: exited members stay resolvable for the linger, compactly."""

from elsa.core.membership import ExitHistory


def test_find_expire_and_pid_reuse_within_a_second():
    now = [1000.2]
    h = ExitHistory(linger=15.0, clock=lambda: now[0])
    h.add(42, jid=7, start_ticks=500)
    h.add(42, jid=8, start_ticks=900)   # pid 42 reused and exited in the same second
    assert h.find(42, 500, tolerance=1) == 7
    assert h.find(42, 900, tolerance=1) == 8
    assert h.find(42, None, tolerance=1) == 8   # no start time: the latest exit
    assert h.find(42, 700, tolerance=1) is None  # neither process
    assert h.find(43, None, tolerance=1) is None
    now[0] = 1005.0
    h.add(43, jid=9, start_ticks=1)
    assert len(h) == 2 and len(h.generations) == 2
    now[0] = 1015.9                      # the 1000 s generation is still within 15 s
    h.expire()
    assert h.find(42, 500, 1) == 7
    now[0] = 1016.0                      # now all of second 1000 is older than 15 s
    h.expire()
    assert h.find(42, 500, 1) is None and h.find(43, 1, 1) == 9
    h.linger = 0.0                       # SIGHUP may shorten it
    h.expire()
    assert len(h) == 0


def test_expiry_keeps_a_pid_that_exited_again_later():
    now = [1000.0]
    h = ExitHistory(linger=5.0, clock=lambda: now[0])
    h.add(42, jid=7, start_ticks=500)
    now[0] = 1003.0
    h.add(42, jid=8, start_ticks=800)    # the pid reused, in a newer generation
    now[0] = 1006.5                      # second 1000 expires, 1003 stays
    h.expire()
    assert h.find(42, 500, 1) is None and h.find(42, 800, 1) == 8
    now[0] = 1010.0
    h.expire()
    assert h.find(42, 800, 1) is None and not h._newest
