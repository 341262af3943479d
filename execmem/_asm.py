"""Assembly (Keystone) and single-instruction decoding (Capstone) for the public API.

``asm`` returns machine code for the text of one architecture.  Keystone reports
*that* a source failed, rarely *where*: the failing line is found by assembling
prefixes of the source (binary search), each followed by stub definitions of the
labels the cut-off lines define, so that forward references in the prefix still
resolve and the first prefix that fails ends at the culprit.  The search is
confirmed (the prefix one line shorter must succeed) and falls back to a linear
scan when Keystone's behaviour is not monotonic in the prefix.

``decode_one`` is what ``JitText.update`` uses to check the patch rule: whether
some bytes are exactly one whole instruction, and its (normalized) mnemonic.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import capstone
import keystone

from execmem import arch as _arch
from execmem._errors import AssemblyError, UnsupportedError

_LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:(?!:)")

_lock = threading.Lock()
_assemblers: dict[str, Any] = {}
_disassemblers: dict[str, Any] = {}


def _keystone(spec: _arch.ArchSpec) -> Any:
    if spec.engines.keystone is None:
        raise UnsupportedError(
            f"Keystone has no {spec.name} assembler; write the code as bytes "
            "(or `.word` directives assembled elsewhere) and pass them to JitText.write"
        )
    with _lock:
        ks = _assemblers.get(spec.name)
        if ks is None:
            ks = _assemblers[spec.name] = keystone.Ks(*spec.engines.keystone)
        return ks


def _assemble(spec: _arch.ArchSpec, source: str, address: int) -> bytes:
    """Raw Keystone call; raises ``keystone.KsError``."""
    ks = _keystone(spec)
    with _lock:  # a Keystone handle is not thread-safe
        encoding, _count = ks.asm(source, address)
    return bytes(encoding or b"")


def _labels(lines: list[str]) -> list[str]:
    """Labels defined by ``lines`` (also after ``;`` statement separators)."""
    found: list[str] = []
    for line in lines:
        for statement in line.split(";"):
            rest = statement
            while True:
                match = _LABEL.match(rest)
                if match is None:
                    break
                found.append(match.group(1))
                rest = rest[match.end() :]
    return found


def _prefix_fails(spec: _arch.ArchSpec, lines: list[str], k: int, address: int) -> bool:
    """Whether the first ``k`` lines fail to assemble, with later labels stubbed."""
    stubs = [f"{label}:" for label in _labels(lines[k:])]
    try:
        _assemble(spec, "\n".join(lines[:k] + stubs), address)
    except keystone.KsError:
        return True
    return False


def _failing_line(spec: _arch.ArchSpec, lines: list[str], address: int) -> int | None:
    """1-based number of the first failing line, or ``None`` if it cannot be isolated."""
    lo, hi = 0, len(lines)  # invariant (when monotonic): prefix lo passes, prefix hi fails
    if _prefix_fails(spec, lines, 0, address):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _prefix_fails(spec, lines, mid, address):
            hi = mid
        else:
            lo = mid
    if _prefix_fails(spec, lines, hi, address) and not _prefix_fails(spec, lines, hi - 1, address):
        return hi
    for k in range(1, len(lines) + 1):  # not monotonic: scan
        if _prefix_fails(spec, lines, k, address):
            return k
    return None


def asm(source: str, arch: str | None = None, address: int = 0) -> bytes:
    """Assemble ``source`` for ``arch`` (default: the host) as if placed at ``address``.

    Raises ``AssemblyError`` naming the failing line, ``UnsupportedError`` for an
    architecture Keystone cannot assemble (riscv64).
    """
    if not isinstance(source, str):
        raise TypeError(f"asm() source must be str, not {type(source).__name__}")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"asm() arch must be str or None, not {type(arch).__name__}")
    if isinstance(address, bool) or not isinstance(address, int):
        raise TypeError(f"asm() address must be int, not {type(address).__name__}")
    if not 0 <= address < 1 << 64:
        raise AssemblyError(f"address {address:#x} is outside the 64-bit address space")
    spec = _arch.get(arch)
    _keystone(spec)
    try:
        return _assemble(spec, source, address)
    except keystone.KsError as exc:
        error = exc
    lines = source.split("\n")
    line = _failing_line(spec, lines, address)
    if line is None:
        raise AssemblyError(f"{spec.name}: {error} (the failing line could not be isolated)") from None
    text = lines[line - 1].strip()
    raise AssemblyError(f"{spec.name}: line {line}: {text!r}: {error}") from None


def _capstone(spec: _arch.ArchSpec) -> Any:
    if spec.engines.capstone is None:
        raise UnsupportedError(f"Capstone cannot decode {spec.name}")
    cs = _disassemblers.get(spec.name)
    if cs is None:
        cs = _disassemblers[spec.name] = capstone.Cs(*spec.engines.capstone)
    return cs


def _normalize(mnemonic: str) -> str:
    """Capstone spells conditional branches by condition (``b.ne``); patch rules use
    the architecture's class name (``b.cond``, Arm ARM C6.2.26)."""
    mnemonic = mnemonic.lower()
    if mnemonic.startswith(("b.", "bc.")):
        return "b.cond"
    return mnemonic


def decode_one(spec: _arch.ArchSpec, code: bytes, address: int) -> str | None:
    """The normalized mnemonic if ``code`` is exactly one whole instruction, else ``None``."""
    with _lock:
        cs = _capstone(spec)
        insns = list(cs.disasm(bytes(code), address, 2))
    if len(insns) != 1 or insns[0].size != len(code):
        return None
    return _normalize(insns[0].mnemonic)


__all__ = ["asm", "decode_one"]
