"""GuardedLock: re-entry by the owner is refused, other threads wait, a fork frees it."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from execmem._errors import BadStateError
from execmem._guard import GuardedLock


def test_owner_reentry_is_refused_and_leaves_the_lock_held() -> None:
    lock = GuardedLock("the thing")
    with lock:
        with pytest.raises(BadStateError, match="the thing was entered again"), lock:
            pass
        assert lock._lock._is_owned()  # type: ignore[attr-defined]
    assert not lock._lock._is_owned()  # type: ignore[attr-defined]
    with lock:  # free again
        pass


def test_other_threads_wait() -> None:
    lock = GuardedLock("x")
    order: list[str] = []
    with lock:
        th = threading.Thread(target=lambda: (lock.__enter__(), order.append("other"), lock.__exit__(None, None, None)))
        th.start()
        th.join(0.05)
        assert th.is_alive() and order == []
        order.append("owner")
    th.join(5)
    assert order == ["owner", "other"]


def test_a_fork_while_another_thread_holds_it_frees_it_in_the_child() -> None:
    lock = GuardedLock("x")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    th = threading.Thread(target=hold)
    th.start()
    held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: no holder thread exists here
            signal.alarm(5)  # a deadlock ends as SIGALRM, not as a hung test
            code = 1
            try:
                with lock:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        th.join(5)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
