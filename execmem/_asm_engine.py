"""Keystone and Capstone: in this process, or in a disposable helper process.

Every in-process assembly opens its own Keystone handle and closes it after: a handle
carries state from one call to the next that Keystone 0.9.2 gets wrong.  Its source
manager keeps a line-number cache pointing into the previous call's (freed) source,
and the next diagnostic Keystone prints (an error or a warning such as "memory
operand is only for determining the size") scans memory from that stale pointer:
a later, unrelated call crashed the process (``SourceMgr::clearBuffers`` does not
reset ``LineNoCache``; measured).  It costs some 20-40 microseconds of CPU per call
on x86-64 (docs/asm.md).

Capstone handles are cached per architecture.  One lock serializes both engines; it
is a :class:`~execmem._locks.SetupLock`, so a fork while another thread assembles
leaves the child a fresh lock.  It is re-entrant because a Python signal handler runs
in the main thread between two bytecodes of whatever the main thread was doing,
possibly inside ``asm`` with the lock held.  The handler's call runs to completion
before the interrupted one resumes (the C calls themselves are never interrupted),
but the wrappers make several C calls on one handle that share its state
(``Cs.disasm`` calls ``cs_disasm`` then ``cs_errno``), so a nested decode - which can
only come from the thread holding the lock - uses its own Capstone handle, one per
nesting depth (a nested assembly has its own Keystone handle anyway).

:class:`Helper` runs Keystone in a child process (``_asm_helper.py``) for inputs that
could end or stall this one: a crash there is an answer (``KeystoneFailure`` with
``crashed=True``), and the child's CPU time per request is bounded
(``HELPER_CPU_SECONDS``); running over it is a ``timed_out`` failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

import capstone
import keystone

from execmem import arch as _arch
from execmem._asm_operands import radix_free
from execmem._errors import UnsupportedError
from execmem._locks import SetupLock

_lock = SetupLock("assembler and decoder handles")
_depth = 0  # decodes in progress on the thread holding _lock (nesting: signal handlers)
_disassemblers: dict[tuple[str, int], Any] = {}

#: CPU time one helper request may use: the issue's "no call runs more than about a
#: second in C".  (The arm64 tests under QEMU, ten times slower, raise it.)
HELPER_CPU_SECONDS = 1.0
#: Wall-clock bound on one helper request: a backstop behind its CPU bound, generous
#: because a loaded machine stretches one CPU second.
HELPER_WALL_SECONDS = 30.0
_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_asm_helper.py")


class KeystoneFailure(Exception):
    """Keystone refused a source (``errno``), or the helper process died or timed out."""

    def __init__(self, message: str, errno: int | None = None, *, crashed: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.crashed = crashed or timed_out
        self.timed_out = timed_out


def assemble(spec: _arch.ArchSpec, syntax: _arch.AsmSyntax, text: str, address: int) -> bytes:
    """Keystone's output for ``text`` in this process (``KeystoneFailure`` if refused)."""
    assert spec.engines.keystone is not None
    failure: KeystoneFailure | None = None
    with _lock:  # see the module docstring
        ks = keystone.Ks(*spec.engines.keystone)  # a fresh handle: see the module docstring
        if syntax.keystone_option is not None:
            ks.syntax = syntax.keystone_option
        try:
            code, _count = ks.asm(text, address, as_bytes=True)
        except keystone.KsError as exc:  # (the exception, and its reference to ks, end here)
            code, failure = b"", KeystoneFailure(str(exc), exc.errno)
        del ks  # ks_close, under the lock
    if failure is not None:
        raise failure
    return bytes(code or b"")


def assemble_own(spec: _arch.ArchSpec, source: str, address: int) -> bytes:
    """Keystone's output for execmem's own ``source`` (the model's guest programs, the
    host routines, herd's instructions) in ``spec``'s first syntax, every number written
    in hex first: once any handle of the process has had an option set (``asm(...,
    syntax="att")`` sets one), Keystone reads unprefixed numbers as hex, so ``#10``
    would be 16 (``radix_free``).  ``KeystoneFailure`` if refused."""
    syntax = spec.asm.syntaxes[0] if spec.asm is not None else _arch.AsmSyntax("default")
    try:
        text = radix_free(source)
    except ValueError:  # a token read as a number that is none (a numeric label: "1b")
        raise KeystoneFailure(f"a number radix_free cannot read in {source!r}") from None
    return assemble(spec, syntax, text, address)


class Helper:
    """One helper process, started at the first request and ended by :meth:`close`."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):  # it died with input unread
                    proc.stdin.close()
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._errors is not None:
            self._errors.close()
            self._errors = None

    def _start(self) -> subprocess.Popen[bytes]:
        if not sys.executable:
            raise KeystoneFailure("this interpreter cannot start the helper process (sys.executable is empty)", crashed=True)
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - kept open until close()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors
            )
        except OSError as exc:
            raise KeystoneFailure(f"the helper process could not start: {exc}", crashed=True) from None
        return self._proc

    def _died(self, proc: subprocess.Popen[bytes], *, timed_out: bool = False) -> KeystoneFailure:
        """The failure to report once the helper died (or was ended for taking too long)."""
        proc.kill()
        status = proc.wait()
        last = ""
        if self._errors is not None:
            self._errors.seek(0)
            lines = self._errors.read()[-4096:].decode("ascii", "replace").strip().splitlines()
            last = lines[-1] if lines else ""
        self.close()
        if timed_out:
            return KeystoneFailure(f"Keystone did not finish within {HELPER_WALL_SECONDS:g} s", timed_out=True)
        if status == -signal.SIGPROF:  # its CPU bound (see _asm_helper)
            return KeystoneFailure(f"Keystone ran for more than {HELPER_CPU_SECONDS:g} s of CPU time", timed_out=True)
        detail = f": {last}" if last else f" (exit status {status})"
        return KeystoneFailure(f"Keystone ended its process{detail}", crashed=True)

    def assemble(self, spec: _arch.ArchSpec, syntax: _arch.AsmSyntax, text: str, address: int) -> bytes:
        """Keystone's output for ``text`` in the helper process (``KeystoneFailure``)."""
        if self._proc is not None and self._proc.poll() is not None:
            self.close()  # it died since the last request
        proc = self._proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None
        source = text.encode("ascii")
        header = {
            "engine": spec.engines.keystone, "syntax": syntax.keystone_option, "address": address,
            "size": len(source), "cpu": HELPER_CPU_SECONDS,
        }
        try:
            proc.stdin.write(json.dumps(header).encode() + b"\n" + source)
            proc.stdin.flush()
        except OSError:
            raise self._died(proc) from None
        deadline = time.monotonic() + HELPER_WALL_SECONDS
        reader = _Reader(proc.stdout.fileno(), deadline)
        line = reader.line()
        if line is None:
            raise self._died(proc, timed_out=time.monotonic() >= deadline)
        answer = json.loads(line)
        if not answer["ok"]:
            raise KeystoneFailure(answer["message"], answer["errno"])
        code = reader.exactly(answer["size"])
        if code is None:
            raise self._died(proc, timed_out=time.monotonic() >= deadline)
        return code


class _Reader:
    """Reads a pipe up to a deadline (``None``: end of file or deadline passed)."""

    def __init__(self, fd: int, deadline: float) -> None:
        self._fd, self._deadline, self._buffer = fd, deadline, bytearray()

    def _more(self) -> bool:
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            left = self._deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return False
        chunk = os.read(self._fd, 1 << 20)
        self._buffer += chunk
        return bool(chunk)

    def line(self) -> bytes | None:
        while (end := self._buffer.find(b"\n")) < 0:
            if not self._more():
                return None
        out = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return out

    def exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not self._more():
                return None
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


# -- decoding ---------------------------------------------------------------------------------


def _capstone(spec: _arch.ArchSpec, depth: int) -> Any:
    if spec.engines.capstone is None:
        raise UnsupportedError(f"Capstone cannot decode {spec.name}")
    cs = _disassemblers.get((spec.name, depth))
    if cs is None:
        cs = _disassemblers[spec.name, depth] = capstone.Cs(*spec.engines.capstone)
    return cs


def normalize(mnemonic: str) -> str:
    """Capstone spells conditional branches by condition (``b.ne``); patch rules use
    the architecture's class name (``b.cond``, Arm ARM C6.2.26).  Prefixes Capstone
    folds into the mnemonic (``rep movsb``) are dropped."""
    mnemonic = mnemonic.lower().rsplit(" ", 1)[-1]
    if mnemonic.startswith(("b.", "bc.")):
        return "b.cond"
    return mnemonic


def decode(spec: _arch.ArchSpec, code: bytes | bytearray, address: int) -> list[tuple[int, int, str, str]]:
    """``(address, size, mnemonic, operands)`` for each instruction of ``code`` from its
    start, up to the first bytes Capstone cannot decode."""
    global _depth
    with _lock:  # nesting (signal handlers): see the module docstring
        cs = _capstone(spec, _depth)
        _depth += 1
        try:
            return list(cs.disasm_lite(bytes(code), address))
        finally:
            _depth -= 1


def decode_one(spec: _arch.ArchSpec, code: bytes, address: int) -> str | None:
    """The normalized mnemonic if ``code`` is exactly one whole instruction, else ``None``."""
    insns = decode(spec, code, address)
    if len(insns) != 1 or insns[0][1] != len(code):
        return None
    return normalize(insns[0][2])


__all__ = ["Helper", "KeystoneFailure", "assemble", "decode", "decode_one", "normalize"]
