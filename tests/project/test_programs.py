"""The per-architecture test programs (``tests/programs.py``) mean what they say on
this host: each one published natively and called."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator

import programs as P
import pytest
from programs import needs_programs, published

import execmem
from execmem.native import NativeBackend

pytestmark = needs_programs


@pytest.fixture
def allocator() -> Iterator[execmem.Allocator]:
    backend = NativeBackend()
    a = execmem.Allocator(backend=backend, pack_size=1 << 16)
    yield a
    a.close()
    backend.close()


def test_arithmetic(allocator: execmem.Allocator) -> None:
    add = P.ADD_T(published(allocator, P.ADD).address)
    assert add(40, 2) == 42 and add(-5, 3) == -2
    total = P.UNARY_T(published(allocator, P.SUM).address)
    assert [total(n) for n in (1, 2, 10, 20000)] == [1, 3, 55, 20000 * 20001 // 2]
    fib = P.UNARY_T(published(allocator, P.FIB).address)
    assert [fib(n) for n in (0, 1, 2, 10, 90)] == [0, 1, 1, 55, 2880067194370816120]
    assert P.CONST_T(published(allocator, P.RET + P.traps(4)).address)  # callable, result unspecified


@pytest.mark.parametrize("value", [0, 7, 0xFFFF, 0x10000, 0x7FFFFFFF, -1])
def test_const_and_busy(allocator: execmem.Allocator, value: int) -> None:
    t = published(allocator, P.const(value))
    assert len(P.const(value)) == P.CONST_SIZE
    assert P.CONST_T(t.address)() == ctypes.c_int(value).value
    assert P.CONST_T(published(allocator, P.busy(value, 1000)).address)() == ctypes.c_int(value).value


def test_calls(allocator: execmem.Allocator) -> None:
    add = published(allocator, P.ADD)
    caller = published(allocator, build=lambda at: P.call_plus_one(add.address, at))
    assert P.ADD_T(caller.address)(20, 21) == 42
    pointer = ctypes.c_void_p(add.address)
    through = published(allocator, P.CALL_POINTER)
    fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(through.address)
    # The pointer is the first argument, so the callee adds the pointer to the second.
    assert fn(ctypes.addressof(pointer), 5) == ctypes.addressof(pointer) + 5


def test_spin_returns_when_the_flag_is_set(allocator: execmem.Allocator) -> None:
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(published(allocator, P.SPIN).address)
    flag = ctypes.c_uint64(0)
    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(fn(ctypes.addressof(flag))))
    caller.start()
    caller.join(0.2)
    assert caller.is_alive() and not results
    flag.value = 1
    caller.join(10)
    assert results == [7]


def test_switch_is_patched_by_update(allocator: execmem.Allocator) -> None:
    switch = P.Switch((1, 2, 0x12345))
    t = published(allocator, size=64, build=switch.code)
    fn = t.function(ctypes.c_int)
    assert fn() == 1
    for index in (2, 1, 0):
        t.update(0, switch.patch(index, t.address))
        assert fn() == switch.values[index]
    word = switch.word(1, t.address)
    assert len(word) == P.HOST.patch_rule.word and word.startswith(switch.patch(1, t.address))


def test_run_in_child_ends_a_child_that_no_signal_reaches() -> None:
    """A child blocking SIGALRM (as one hung inside QEMU cannot take it) is killed from
    the parent after twice its timeout: a hang fails a test, never stalls the suite."""
    def stuck() -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
        return 0

    started = time.monotonic()
    status = P.run_in_child(stuck, timeout=1)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert time.monotonic() - started < 30
    assert P.exited(P.run_in_child(lambda: 3), 3)
