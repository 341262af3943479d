"""The two ELF files GDB's JIT interface needs, written by hand (no compiler at run time).

* :func:`shared_object`: a tiny shared object whose dynamic symbol table defines
  ``__jit_debug_register_code`` (a function that only returns) and
  ``__jit_debug_descriptor`` (the list head GDB reads).  GDB looks both up by name in
  the objects the process has loaded, so they must live in one the dynamic loader
  mapped; ``_gdbjit`` loads this one with ``ctypes``.
* :func:`symbol_file`: the in-memory "symbol file" registered for one text: one
  section at the text's address and one function symbol over its bytes, which is all
  GDB needs to name the text in a backtrace and in ``info symbol``.

Formats: System V gABI (ELF-64 object file format, version 1.5), little-endian and
64-bit as every architecture execmem supports; what is specific to an architecture
(``e_machine``, ``e_flags``, the return instruction) is the arch layer's
:class:`~execmem.arch.ElfIdentity`.  Only what the readers use is written: glibc's
loader needs the program headers, ``PT_DYNAMIC`` with a SysV hash table, and
``PT_GNU_STACK`` (without it the loader would make the stack executable for us); BFD,
GDB's reader, needs the section headers and a symbol table.
"""

from __future__ import annotations

import struct

from execmem.arch import ElfIdentity

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_DYN = struct.Struct("<qQ")

#: ELFMAG, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE.
_IDENT = b"\x7fELF\x02\x01\x01\x00".ljust(16, b"\x00")
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_DYNAMIC, PT_GNU_STACK = 1, 2, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_HASH, SHT_DYNAMIC, SHT_NOBITS, SHT_DYNSYM = 1, 2, 3, 5, 6, 8, 11
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
STB_GLOBAL, STT_OBJECT, STT_FUNC = 1, 1, 2
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 0, 4, 5, 6, 10, 11, 14

REGISTER_CODE = "__jit_debug_register_code"
DESCRIPTOR = "__jit_debug_descriptor"
SONAME = "libexecmem-gdbjit.so"
#: struct jit_descriptor { uint32_t version = 1; uint32_t action_flag; two pointers }.
DESCRIPTOR_IMAGE = struct.pack("<IIQQ", 1, 0, 0, 0)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class _Strings:
    """An ELF string table being built: offsets of the strings added."""

    def __init__(self) -> None:
        self.data = bytearray(b"\x00")

    def add(self, text: str) -> int:
        offset = len(self.data)
        self.data += text.encode() + b"\x00"
        return offset


def _header(elf: ElfIdentity, kind: int, phnum: int, shoff: int, shnum: int) -> bytes:
    phoff = _EHDR.size if phnum else 0
    return _EHDR.pack(
        _IDENT, kind, elf.machine, 1, 0, phoff, shoff, elf.flags,
        _EHDR.size, _PHDR.size, phnum, _SHDR.size, shnum, shnum - 1,  # .shstrtab comes last
    )


def shared_object(elf: ElfIdentity, page_size: int) -> bytes:
    """The shared object defining the GDB JIT interface's two symbols (see the module
    docstring); segments are aligned to ``page_size``, the host's page size."""
    dynstr = _Strings()
    register_name, descriptor_name, soname = (dynstr.add(s) for s in (REGISTER_CODE, DESCRIPTOR, SONAME))
    phnum = 4
    hash_at = _EHDR.size + phnum * _PHDR.size
    # SysV hash table with one bucket: the loader walks the chain 2 -> 1 and compares
    # names, whatever their hashes are (gABI "Hash Table").
    hash_table = struct.pack("<6I", 1, 3, 2, 0, 0, 1)
    dynsym_at = _align(hash_at + len(hash_table), 8)
    dynstr_at = dynsym_at + 3 * _SYM.size
    text_at = _align(dynstr_at + len(dynstr.data), 16)
    rx_end = text_at + len(elf.ret)
    rw_at = _align(rx_end, page_size)
    dynamic_entries = 7
    data_at = rw_at + dynamic_entries * _DYN.size
    rw_end = data_at + len(DESCRIPTOR_IMAGE)
    symbols = b"".join((
        _SYM.pack(0, 0, 0, 0, 0, 0),
        _SYM.pack(register_name, STB_GLOBAL << 4 | STT_FUNC, 0, 4, text_at, len(elf.ret)),
        _SYM.pack(descriptor_name, STB_GLOBAL << 4 | STT_OBJECT, 0, 6, data_at, len(DESCRIPTOR_IMAGE)),
    ))
    dynamic = b"".join(_DYN.pack(tag, value) for tag, value in (
        (DT_HASH, hash_at), (DT_STRTAB, dynstr_at), (DT_SYMTAB, dynsym_at),
        (DT_STRSZ, len(dynstr.data)), (DT_SYMENT, _SYM.size), (DT_SONAME, soname), (DT_NULL, 0),
    ))
    # Non-allocated sections after the segments: a .symtab copy for readers that
    # prefer it, then the section names and headers.
    symtab_at = rw_end
    strtab_at = symtab_at + len(symbols)
    names = _Strings()
    sections = [
        (".hash", SHT_HASH, SHF_ALLOC, hash_at, len(hash_table), 2, 0, 8, 4),
        (".dynsym", SHT_DYNSYM, SHF_ALLOC, dynsym_at, len(symbols), 3, 1, 8, _SYM.size),
        (".dynstr", SHT_STRTAB, SHF_ALLOC, dynstr_at, len(dynstr.data), 0, 0, 1, 0),
        (".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text_at, len(elf.ret), 0, 0, 16, 0),
        (".dynamic", SHT_DYNAMIC, SHF_ALLOC | SHF_WRITE, rw_at, len(dynamic), 3, 0, 8, _DYN.size),
        (".data", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE, data_at, len(DESCRIPTOR_IMAGE), 0, 0, 8, 0),
        (".symtab", SHT_SYMTAB, 0, symtab_at, len(symbols), 8, 1, 8, _SYM.size),
        (".strtab", SHT_STRTAB, 0, strtab_at, len(dynstr.data), 0, 0, 1, 0),
    ]
    shstrtab_at = strtab_at + len(dynstr.data)
    headers = [_SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, kind, flags, offset, size, link, info, align, entsize in sections:
        address = offset if flags & SHF_ALLOC else 0  # segments are mapped at their offsets
        headers.append(_SHDR.pack(names.add(name), kind, flags, address, offset, size, link, info, align, entsize))
    shstrtab_name = names.add(".shstrtab")
    headers.append(_SHDR.pack(shstrtab_name, SHT_STRTAB, 0, 0, shstrtab_at, len(names.data), 0, 0, 1, 0))
    shoff = _align(shstrtab_at + len(names.data), 8)
    programs = b"".join((
        _PHDR.pack(PT_LOAD, PF_R | PF_X, 0, 0, 0, rx_end, rx_end, page_size),
        _PHDR.pack(PT_LOAD, PF_R | PF_W, rw_at, rw_at, rw_at, rw_end - rw_at, rw_end - rw_at, page_size),
        _PHDR.pack(PT_DYNAMIC, PF_R | PF_W, rw_at, rw_at, rw_at, len(dynamic), len(dynamic), 8),
        _PHDR.pack(PT_GNU_STACK, PF_R | PF_W, 0, 0, 0, 0, 0, 16),
    ))
    image = bytearray(shoff)
    for offset, piece in (
        (0, _header(elf, ET_DYN, phnum, shoff, len(headers))),
        (_EHDR.size, programs),
        (hash_at, hash_table),
        (dynsym_at, symbols),
        (dynstr_at, dynstr.data),
        (text_at, elf.ret),
        (rw_at, dynamic),
        (data_at, DESCRIPTOR_IMAGE),
        (symtab_at, symbols),
        (strtab_at, dynstr.data),
        (shstrtab_at, names.data),
    ):
        image[offset : offset + len(piece)] = piece
    return bytes(image) + b"".join(headers)


# The symbol file's fixed parts: section names, and where the symbol table starts.
_SYMFILE_NAMES = _Strings()
_TEXT_NAME, _SYMTAB_NAME, _STRTAB_NAME, _SHSTRTAB_NAME = (
    _SYMFILE_NAMES.add(s) for s in (".text", ".symtab", ".strtab", ".shstrtab")
)
_SYMFILE_SHSTRTAB = bytes(_SYMFILE_NAMES.data)
_NULL_SYMBOL = _SYM.pack(0, 0, 0, 0, 0, 0)
_NULL_SECTION = _SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def symbol_file(elf: ElfIdentity, address: int, size: int, name: str) -> bytes:
    """An ELF executable naming ``[address, address + size)`` ``name``: section
    ``.text`` there (``SHT_NOBITS``: GDB reads the code from the process), one global
    function symbol over it.  Addresses are absolute, so GDB relocates nothing."""
    strtab = b"\x00" + name.encode() + b"\x00"
    symtab_at = _EHDR.size
    strtab_at = symtab_at + 2 * _SYM.size
    shstrtab_at = strtab_at + len(strtab)
    shoff = _align(shstrtab_at + len(_SYMFILE_SHSTRTAB), 8)
    return b"".join((
        _header(elf, ET_EXEC, 0, shoff, 5),
        _NULL_SYMBOL,
        _SYM.pack(1, STB_GLOBAL << 4 | STT_FUNC, 0, 1, address, size),
        strtab,
        _SYMFILE_SHSTRTAB,
        bytes(shoff - shstrtab_at - len(_SYMFILE_SHSTRTAB)),
        _NULL_SECTION,
        _SHDR.pack(_TEXT_NAME, SHT_NOBITS, SHF_ALLOC | SHF_EXECINSTR, address, 0, size, 0, 0, 1, 0),
        _SHDR.pack(_SYMTAB_NAME, SHT_SYMTAB, 0, 0, symtab_at, 2 * _SYM.size, 3, 1, 8, _SYM.size),
        _SHDR.pack(_STRTAB_NAME, SHT_STRTAB, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0),
        _SHDR.pack(_SHSTRTAB_NAME, SHT_STRTAB, 0, 0, shstrtab_at, len(_SYMFILE_SHSTRTAB), 0, 0, 1, 0),
    ))


__all__ = ["DESCRIPTOR", "REGISTER_CODE", "SONAME", "shared_object", "symbol_file"]
