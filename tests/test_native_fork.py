"""What a forked child can and cannot do with the parent's texts (dual mapping).

The writable alias is ``MADV_DONTFORK``: the child inherits the read+execute views
(and may call the parent's functions) but has no writable view of that memory, so it
can never change the parent's code; the backend refuses to work in the child."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
from collections.abc import Callable
from typing import Any

import pytest

from execmem._errors import ForkedProcessError
from execmem.native import NativeBackend, _procmaps


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="test programs are x86-64 code"
)

ADD = bytes.fromhex("488d0437c3")  # lea rax, [rdi + rsi]; ret
ADD_T = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def _fork(child: Callable[[], dict[str, object]]) -> tuple[dict[str, object], int]:
    """Run ``child()`` in a forked child; returns its JSON report and its wait status."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return to pytest
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(child()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return (json.loads(data) if data else {}), status


def test_child_keeps_rx_view_but_has_no_writable_alias() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, ADD)
        b.map(r)
        (alias,) = [rng for rng in b.owned_ranges() if rng[0] != r.address]

        def child() -> dict[str, object]:
            vmas = _procmaps.read_maps()
            refused: list[bool] = []
            report: dict[str, object] = {
                "alias_mapped": any(v.overlaps(*alias) for v in vmas),
                "view_perms": [v.perms for v in vmas if v.overlaps(r.address, r.size)],
                "call": ADD_T(r.address)(20, 22),
                "forked": b.forked,
            }
            for attempt in (
                lambda: b.write(r, 0, b"\xcc"),
                lambda: b.atomic_store(r, 0, b"\xcc"),
                lambda: b.reserve(4096, 16),
                lambda: b.unmap(r),
            ):
                try:
                    attempt()
                    refused.append(False)
                except ForkedProcessError:
                    refused.append(True)
            report["refused"] = refused
            b.close()  # allowed in the child: drops only the child's copies
            return report

        report, status = _fork(child)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report == {
            "alias_mapped": False,
            "view_perms": ["r-xs"],
            "call": 42,
            "forked": True,
            "refused": [True, True, True, True],
        }
        # The parent is untouched: same code, still callable, alias still there.
        assert ctypes.string_at(r.address, len(ADD)) == ADD
        assert ADD_T(r.address)(1, 2) == 3
        assert any(v.overlaps(*alias) and v.perms == "rw-s" for v in _procmaps.read_maps())
        b.write(r, 0, ADD)  # the parent can still write


def test_child_writing_to_the_alias_address_faults() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, ADD)
        b.map(r)
        (alias,) = [rng for rng in b.owned_ranges() if rng[0] != r.address]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            import faulthandler

            faulthandler.disable()
            ctypes.memmove(alias[0], b"\xcc", 1)  # no mapping there in the child: SIGSEGV
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert ADD_T(r.address)(2, 3) == 5
        assert ctypes.string_at(r.address, 8)[: len(ADD)] == ADD


def test_trap_fill_really_traps() -> None:
    """Executing filler (never-written or freed bytes) raises SIGTRAP, never runs on."""
    with NativeBackend("dual") as b:
        r = b.reserve(4096, 16)
        b.map(r)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            import faulthandler

            faulthandler.disable()
            ctypes.CFUNCTYPE(None)(r.address + 100)()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTRAP
