"""What a forked child can and cannot do with the parent's texts (dual mapping).

The code is mapped nowhere writable (writes go through ``pwrite`` on the file), so
the child inherits only the read+execute views: it may call the parent's functions,
and the backend refuses to write, reserve or unmap in the child."""

from __future__ import annotations

import ctypes
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from programs import ADD, ADD_T, needs_programs, traps

from execmem._errors import ForkedProcessError
from execmem.native import NativeBackend, _procmaps


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


pytestmark = needs_programs



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


def test_child_keeps_rx_view_and_nothing_writable() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, ADD)
        b.map(r)
        path = next(v.path for v in _procmaps.read_maps() if v.overlaps(r.address, r.size))

        def child() -> dict[str, object]:
            vmas = _procmaps.read_maps()
            refused: list[bool] = []
            report: dict[str, object] = {
                "file_perms": sorted({v.perms for v in vmas if v.path == path}),
                "view_perms": [v.perms for v in vmas if v.overlaps(r.address, r.size)],
                "call": ADD_T(r.address)(20, 22),
                "forked": b.forked,
            }
            for attempt in (
                lambda: b.write(r, 0, traps(4)),
                lambda: b.atomic_store(r, 0, traps(4)),
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
            "file_perms": ["r-xs"],
            "view_perms": ["r-xs"],
            "call": 42,
            "forked": True,
            "refused": [True, True, True, True],
        }
        # The parent is untouched: same code, still callable, still writable by execmem.
        assert ctypes.string_at(r.address, len(ADD)) == ADD
        assert ADD_T(r.address)(1, 2) == 3
        b.write(r, 0, ADD)


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
