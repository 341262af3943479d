"""The live-patch rule (``JitText.update``) and branch retargeting (``JitText.retarget``).

Other threads may be executing a LIVE text while it is patched, so a patch must be
one single-copy-atomic store (inside one aligned word, ``PatchRule.word``) that
replaces one whole instruction by one whole instruction of the same length: a
thread then runs either the old instruction or the new one.  A patch that starts or
ends inside an instruction would make a thread that already decoded part of it run
a mix (x86), so *where instructions begin* matters, and a standalone decode of the
patched bytes cannot tell (``b8 2a 00 00 00`` is ``mov eax, 42``, while its last
four bytes alone decode as other instructions).  The boundaries are found by
decoding the text's current contents (the shadow copy ``JitText.read`` returns)
from its start.

Data embedded in a text (a constant after ``ret``) decodes as whatever its bytes
spell.  Where the architecture's instructions have one size (arm64), boundaries
do not depend on decoding and undecodable words are skipped.  Where they vary
(x86-64), bytes that do not decode stop the sweep: a patch after them is refused,
since its boundaries cannot be established.  Data that happens to decode can
shift the sweep's boundaries after it; keep constants after the code you patch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from execmem._asm_engine import decode, decode_one, normalize
from execmem._backend import Backend
from execmem._errors import UnsafePatchError, UnsupportedError
from execmem.arch import ArchSpec

SAFE_ALTERNATIVE = (
    "publish a new text with the new code, swap the pointer callers use to reach it, "
    "and free the old text (its memory is reclaimed after the next epoch)"
)


class Instruction(NamedTuple):
    offset: int
    size: int
    mnemonic: str | None  # None: an undecodable word of a fixed-size architecture
    text: str

    def __str__(self) -> str:
        return f"{self.text!r} ({self.size} bytes at +{self.offset:#x})"


def instructions(spec: ArchSpec, shadow: bytes | bytearray, address: int, end: int) -> Iterator[Instruction]:
    """The instructions of a text from its start until one reaches ``end``; raises
    ``UnsafePatchError`` where undecodable bytes hide the boundaries (see above)."""
    fixed = spec.insn_align == spec.max_insn_size
    pos = 0
    while pos < end:
        for at, size, mnemonic, operands in decode(spec, shadow[pos : end + spec.max_insn_size], address + pos):
            yield Instruction(at - address, size, normalize(mnemonic), f"{mnemonic} {operands}".strip())
            pos = at - address + size
            if pos >= end:
                return
        if not fixed:
            raise UnsafePatchError(
                f"the bytes at +{pos:#x} ({bytes(shadow[pos : pos + 4]).hex()}) do not decode as {spec.name} "
                "instructions, so instruction boundaries after them cannot be established (data in the text?)"
            )
        yield Instruction(pos, spec.insn_align, None, bytes(shadow[pos : pos + spec.insn_align]).hex())
        pos += spec.insn_align


def check_patch(spec: ArchSpec, backend: Backend, address: int, shadow: bytes | bytearray, offset: int, new: bytes) -> None:
    """Raise ``UnsafePatchError`` unless storing ``new`` at ``offset`` of the text at
    ``address`` (currently ``shadow``) is allowed while other threads may run it."""
    rule = spec.patch_rule
    at = address + offset
    where = f"patch of {len(new)} bytes at {at:#x}"
    if not new:
        raise UnsafePatchError(f"{where}: nothing to patch")
    if not backend.concurrent_patch_safe:
        raise UnsafePatchError(
            f"{where}: in {backend.mode} mode an atomic store makes the page briefly "
            f"non-executable, so threads running it would fault; {SAFE_ALTERNATIVE}"
        )
    if len(new) > rule.max_size or at // rule.word != (at + len(new) - 1) // rule.word:
        raise UnsafePatchError(
            f"{where}: a live patch must lie within one naturally aligned {rule.word}-byte word "
            f"({rule.why}; `.balign {rule.word}` before a patchable instruction places it so); {SAFE_ALTERNATIVE}"
        )
    if not rule.whole_instruction:
        return
    end = offset + len(new)
    covered = [insn for insn in instructions(spec, shadow, address, end) if insn.offset + insn.size > offset]
    first, last = covered[0], covered[-1]
    if first.offset != offset or last.offset + last.size != end:
        cut = first if first.offset != offset else last
        raise UnsafePatchError(f"{where}: not one whole instruction: it would cut {cut} ({rule.why}); {SAFE_ALTERNATIVE}")
    if len(covered) > 1:
        names = ", ".join(map(str, covered))
        raise UnsafePatchError(
            f"{where}: replaces {len(covered)} instructions ({names}), not one whole instruction: a thread "
            f"between them would run a mix; {SAFE_ALTERNATIVE}"
        )
    new_mnemonic = decode_one(spec, new, at)
    if first.mnemonic is None or new_mnemonic is None:
        which = f"the old bytes {first}" if first.mnemonic is None else "the new bytes"
        raise UnsafePatchError(
            f"{where}: {which} are not exactly one whole {spec.name} instruction of {len(new)} bytes "
            f"({rule.why}); {SAFE_ALTERNATIVE}"
        )
    if rule.mnemonics and (first.mnemonic not in rule.mnemonics or new_mnemonic not in rule.mnemonics):
        bad = first.mnemonic if first.mnemonic not in rule.mnemonics else new_mnemonic
        raise UnsafePatchError(
            f"{where}: {bad!r} may not be modified while other CPUs may execute it ({rule.why}); {SAFE_ALTERNATIVE}"
        )


def retargeted(spec: ArchSpec, shadow: bytes | bytearray, address: int, offset: int, target: int) -> bytes:
    """The direct branch at ``offset`` of the text at ``address`` rewritten to reach
    ``target``, with its length kept (``ArchSpec.direct_branches``)."""
    names = " or ".join(branch.name for branch in spec.direct_branches)
    if not names:
        raise UnsupportedError(f"execmem knows no {spec.name} branch encoding to retarget")
    if not 0 <= target < 1 << 64:
        raise UnsafePatchError(f"retarget: {target:#x} is outside the 64-bit address space")
    insn = next(i for i in instructions(spec, shadow, address, offset + 1) if i.offset + i.size > offset)
    code = bytes(shadow[insn.offset : insn.offset + insn.size])
    branch = next((b for b in spec.direct_branches if b.matches(code)), None)
    if insn.offset != offset or branch is None:
        what = f"is inside {insn}" if insn.offset != offset else f"is {insn}"
        raise UnsafePatchError(f"retarget at {address + offset:#x}: that {what}, not a direct {names}")
    encoded = branch.encode(code, address + offset, target)
    if encoded is None:
        raise UnsafePatchError(
            f"retarget at {address + offset:#x}: {target:#x} is out of reach of {branch.name} "
            f"(a {branch.bits}-bit displacement in units of {branch.scale} bytes); {SAFE_ALTERNATIVE}"
        )
    return encoded


__all__ = ["SAFE_ALTERNATIVE", "Instruction", "check_patch", "instructions", "retargeted"]
