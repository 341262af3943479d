"""Unicorn 2.1.4 behaviours the modeled machine relies on (notes/unicorn-probe.md).

If an upgrade changes any of these, the executor in ``execmem.emu._unicorn`` must be
revisited: these tests are meant to fail loudly.
"""

from __future__ import annotations

import ctypes

import keystone
import pytest
import unicorn
from unicorn import arm64_const as a64
from unicorn import x86_const as x86

CODE = 0x10000
UNTIL = 0xFFFF_F000


def test_pinned_version() -> None:
    assert unicorn.__version__ == "2.1.4"


def arm64(src: str) -> tuple[unicorn.unicorn.Uc, ctypes.Array[ctypes.c_char], bytes]:
    """A Uc running `src` at CODE; keep the returned buffer alive while using it."""
    ks = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)
    code = bytes(ks.asm(src, CODE)[0])
    uc = unicorn.unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    buf = ctypes.create_string_buffer(0x10000)
    uc.mem_map_ptr(CODE, 0x10000, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
    ctypes.memmove(buf, code, len(code))
    return uc, buf, code


MOV_X0_2 = (0xD2800040).to_bytes(4, "little")  # mov x0, #2


def test_translated_block_runs_stale_bytes_until_removed() -> None:
    uc, buf, _ = arm64("mov x0, #1")
    uc.emu_start(CODE, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 1
    ctypes.memmove(buf, MOV_X0_2, 4)  # rewrite behind Unicorn's back
    uc.emu_start(CODE, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 1, "stale translation no longer reused"
    uc.ctl_remove_cache(CODE, CODE + 4)
    uc.emu_start(CODE, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 2


def test_count_zero_after_counted_runs_flushes_translations() -> None:
    uc, buf, _ = arm64("mov x0, #1\nb .")
    uc.emu_start(CODE, UNTIL, count=1)
    ctypes.memmove(buf, MOV_X0_2, 4)
    uc.emu_start(CODE, CODE + 4)  # count=0: every block is flushed
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 2


def test_block_containing_until_minus_one_is_dropped() -> None:
    uc, buf, _ = arm64("mov x0, #1\nnop")
    uc.emu_start(CODE, CODE + 4, count=1)  # `until` right after the code
    ctypes.memmove(buf, MOV_X0_2, 4)
    uc.emu_start(CODE, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 2


def test_read_hook_fires_before_the_load_and_can_supply_its_value() -> None:
    uc, buf, _ = arm64("ldr x0, [x1]")
    uc.reg_write(a64.UC_ARM64_REG_X1, CODE + 0x800)

    def on_read(uc_: object, access: int, addr: int, size: int, value: int, ud: object) -> None:
        ctypes.memmove(ctypes.addressof(buf) + addr - CODE, (0x1234).to_bytes(8, "little"), 8)

    uc.hook_add(unicorn.UC_HOOK_MEM_READ, on_read)
    uc.emu_start(CODE, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_X0) == 0x1234


def test_arm64_traps_reach_the_interrupt_hook() -> None:
    uc, _keep, _ = arm64("brk #0x100\nsvc #0\n.inst 0")
    seen: list[tuple[int, int]] = []

    def on_intr(uc_: unicorn.unicorn.Uc, intno: int, ud: object) -> None:
        seen.append((intno, uc_.reg_read(a64.UC_ARM64_REG_PC)))
        uc_.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    for pc in (CODE, CODE + 4, CODE + 8):
        uc.emu_start(pc, UNTIL, count=1)
    assert seen == [(7, CODE), (2, CODE + 8), (1, CODE + 8)]


def test_arm64_eret_drops_to_el0_so_the_model_performs_it() -> None:
    uc, _keep, _ = arm64("adr x9, target\nmsr elr_el1, x9\neret\ntarget: nop")
    for pc in (CODE, CODE + 4):
        uc.emu_start(pc, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_PSTATE) & 0xC == 0x4  # EL1
    uc.emu_start(CODE + 8, UNTIL, count=1)
    assert uc.reg_read(a64.UC_ARM64_REG_PC) == CODE + 12
    assert uc.reg_read(a64.UC_ARM64_REG_PSTATE) & 0xC == 0  # EL0
    assert not hasattr(a64, "UC_ARM64_REG_SPSR_EL1")


def test_x86_store_into_translated_code_page_restarts_the_instruction() -> None:
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    code = bytes(ks.asm("mov [rbx], rdx\nnop", CODE)[0])
    uc = unicorn.unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    buf = ctypes.create_string_buffer(0x10000)
    uc.mem_map_ptr(CODE, 0x10000, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
    ctypes.memmove(buf, code, len(code))
    uc.reg_write(x86.UC_X86_REG_RBX, CODE + 3)
    uc.emu_start(CODE, UNTIL, count=1)
    # The store happened but RIP did not move: QEMU's self-modifying-code check
    # restarted the instruction and count=1 ran out.
    assert uc.reg_read(x86.UC_X86_REG_RIP) == CODE
    uc.emu_start(CODE, CODE + 3, count=8)
    assert uc.reg_read(x86.UC_X86_REG_RIP) == CODE + 3


def test_raw_batch_register_api() -> None:
    import unicorn.unicorn_py3.unicorn as ucmod

    uc, _keep, _ = arm64("nop")
    ids = (ctypes.c_int * 2)(a64.UC_ARM64_REG_X3, a64.UC_ARM64_REG_X4)
    vals = (ctypes.c_uint64 * 2)(7, 9)
    ptrs = (ctypes.c_void_p * 2)(ctypes.addressof(vals), ctypes.addressof(vals) + 8)
    assert ucmod.uclib.uc_reg_write_batch(uc._uch, ids, ptrs, 2) == 0
    assert (uc.reg_read(a64.UC_ARM64_REG_X3), uc.reg_read(a64.UC_ARM64_REG_X4)) == (7, 9)


@pytest.mark.parametrize("pad", [0, 8])
def test_x86_serialize_is_not_decoded(pad: int) -> None:
    """SERIALIZE (0F 01 E8) is unknown to Unicorn: the model performs it itself."""
    uc = unicorn.unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    buf = ctypes.create_string_buffer(0x10000)
    uc.mem_map_ptr(CODE, 0x10000, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
    ctypes.memmove(ctypes.addressof(buf) + pad, b"\x0f\x01\xe8", 3)
    with pytest.raises(unicorn.unicorn.UcError):
        uc.emu_start(CODE + pad, UNTIL, count=1)
