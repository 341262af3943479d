"""The modeled machine's address space, defined once.

Virtual addresses of static regions equal their physical addresses; dynamic pages
are translated through page-table entries that live in model memory.

=================  ==========================================================
0x0010_0000        guest code, 64 KiB per CPU (``Machine.load``)
0x0080_0000        data (``Machine.alloc``), every location on its own cache line
0x00F0_0000        one stack page per CPU
0x0F00_0000        page-table entries of dynamic pages (physical, mapped VA == PA)
0x1000_0000        physical frames of dynamic pages; also their writable alias
                   (the kernel's linear map, VA == PA)
0x4000_0000        dynamic (page-table mapped) pages, up to 0x8000_0000
0xFFFF_E000        the return address that resumes a CPU's host program
0xFFFF_F000        a page no region may use (the executor's stop address)
=================  ==========================================================
"""

from __future__ import annotations

PAGE = 0x1000
CODE_BASE = 0x0010_0000
CODE_STRIDE = 0x1_0000
DATA_BASE = 0x0080_0000
STACK_BASE = 0x00F0_0000
PT_BASE = 0x0F00_0000
FRAME_BASE = 0x1000_0000
DYNAMIC_BASE = 0x4000_0000
DYNAMIC_LIMIT = 0x8000_0000
#: Returning to this address from guest code resumes the CPU's host program.
RETURN_MAGIC = 0xFFFF_E000
#: ``emu_start`` stops there (never reached: no guest region may contain it).
UNTIL = 0xFFFF_F000


def page_of(address: int) -> int:
    """The first address of the page holding ``address``."""
    return address - address % PAGE
