"""bpf: a classic BPF (cBPF, the tcpdump / SO_ATTACH_FILTER language) JIT for x86-64.

    python -m execmem.examples.bpf            # compile the bundled filters, run on sample packets

A cBPF program is a list of (code, jt, jf, k) instructions over an accumulator A,
an index register X and 16 scratch words M[]; it returns how many bytes of the
packet to accept (0 = drop).  ``compile`` turns it into one x86-64 function
``filter(packet, length) -> accepted``; ``interpret`` is the reference
interpreter.  Loads outside the packet return 0 from the program, as the kernel
does.

The bundled filters are what ``tcpdump -d`` prints for ``ip``, ``tcp port 80``
and ``udp and dst port 53`` on Ethernet.
"""

from __future__ import annotations

import argparse
import ctypes
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import execmem

# Instruction classes and fields (linux/filter.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X_SRC = 0x00, 0x08
RET_A = 0x10
TAX, TXA = 0x00, 0x80


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0


class BPFError(ValueError):
    """The program is not a valid cBPF program."""


FILTERS: dict[str, list[Insn]] = {
    # tcpdump -d ip
    "ip": [Insn(0x28, 0, 0, 12), Insn(0x15, 0, 1, 0x800), Insn(0x6, 0, 0, 262144), Insn(0x6, 0, 0, 0)],
    # tcpdump -d 'tcp port 80' (IPv4 part)
    "tcp port 80": [
        Insn(0x28, 0, 0, 12), Insn(0x15, 0, 10, 0x800), Insn(0x30, 0, 0, 23), Insn(0x15, 0, 8, 6),
        Insn(0x28, 0, 0, 20), Insn(0x45, 6, 0, 0x1FFF), Insn(0xB1, 0, 0, 14), Insn(0x48, 0, 0, 14),
        Insn(0x15, 2, 0, 80), Insn(0x48, 0, 0, 16), Insn(0x15, 0, 1, 80), Insn(0x6, 0, 0, 262144),
        Insn(0x6, 0, 0, 0),
    ],
    # tcpdump -d 'udp and dst port 53' (IPv4 part)
    "udp dst port 53": [
        Insn(0x28, 0, 0, 12), Insn(0x15, 0, 8, 0x800), Insn(0x30, 0, 0, 23), Insn(0x15, 0, 6, 17),
        Insn(0x28, 0, 0, 20), Insn(0x45, 4, 0, 0x1FFF), Insn(0xB1, 0, 0, 14), Insn(0x48, 0, 0, 16),
        Insn(0x15, 0, 1, 53), Insn(0x6, 0, 0, 262144), Insn(0x6, 0, 0, 0),
    ],
}

MASK32 = 0xFFFF_FFFF


def validate(prog: Sequence[Insn]) -> None:
    """The kernel's checks that matter here: jumps forward and in range, ends in RET."""
    if not prog or len(prog) > 4096:
        raise BPFError("a program has 1..4096 instructions")
    for pc, ins in enumerate(prog):
        cls = ins.code & 0x07
        if cls == JMP:
            op = ins.code & 0xF0
            targets = [pc + 1 + ins.k] if op == JA else [pc + 1 + ins.jt, pc + 1 + ins.jf]
            if any(t >= len(prog) for t in targets):
                raise BPFError(f"instruction {pc}: jump out of the program")
        elif (cls in (LD, LDX) and ins.code & 0xE0 == MEM and not 0 <= ins.k < 16) or (cls in (ST, STX) and not 0 <= ins.k < 16):
            raise BPFError(f"instruction {pc}: scratch index {ins.k} out of range")
        elif cls == ALU and ins.code & 0xF0 in (DIV, MOD) and ins.code & 0x08 == K and ins.k == 0:
            raise BPFError(f"instruction {pc}: division by constant zero")
    if prog[-1].code & 0x07 != RET:
        raise BPFError("the last instruction must be a RET")


def interpret(prog: Sequence[Insn], packet: bytes) -> int:
    """Reference semantics (linux/net/core/filter.c, classic BPF)."""
    validate(prog)
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(offset: int, size: int) -> int | None:
        if offset < 0 or offset + size > len(packet):
            return None
        return int.from_bytes(packet[offset : offset + size], "big")

    while True:
        ins = prog[pc]
        cls, k = ins.code & 0x07, ins.k & MASK32
        pc += 1
        if cls in (LD, LDX):
            mode, size = ins.code & 0xE0, {W: 4, H: 2, B: 1}[ins.code & 0x18]
            if mode == IMM:
                v = k
            elif mode == LEN:
                v = len(packet)
            elif mode == MEM:
                v = mem[k]
            elif mode == MSH and cls == LDX:
                b = load(k, 1)
                if b is None:
                    return 0
                v = (b & 0xF) * 4
            else:
                got = load(k + (x if mode == IND else 0), size)
                if got is None:
                    return 0
                v = got
            if cls == LD:
                a = v
            else:
                x = v
        elif cls == ST:
            mem[k] = a
        elif cls == STX:
            mem[k] = x
        elif cls == ALU:
            op, src = ins.code & 0xF0, (x if ins.code & 0x08 else k)
            if op == NEG:
                a = -a & MASK32
            elif op in (DIV, MOD):
                if src == 0:
                    return 0
                a = a // src if op == DIV else a % src
            else:
                a = {ADD: a + src, SUB: a - src, MUL: a * src, OR: a | src, AND: a & src,
                     LSH: a << (src & 31) if src < 32 else 0, RSH: a >> src if src < 32 else 0, XOR: a ^ src}[op] & MASK32
        elif cls == JMP:
            op = ins.code & 0xF0
            if op == JA:
                pc += k
            else:
                src = x if ins.code & 0x08 else k
                taken = {JEQ: a == src, JGT: a > src, JGE: a >= src, JSET: bool(a & src)}[op]
                pc += ins.jt if taken else ins.jf
        elif cls == RET:
            return a if ins.code & 0x18 == RET_A else k
        elif cls == MISC:
            if ins.code & 0xF8 == TXA:
                a = x
            else:
                x = a


def compile_x86(prog: Sequence[Insn]) -> str:
    """A = eax, X = ebx, packet = rdi, length = esi, M[] on the stack."""
    validate(prog)
    # M[] starts at zero (the interpreter's and the kernel's view of scratch memory)
    out = ["push rbx", "sub rsp, 72", "xor eax, eax", "xor ebx, ebx"]
    out += [f"mov qword ptr [rsp + {8 * i}], rax" for i in range(8)]

    def bounds(size: int) -> list[str]:
        # r8 = offset; the program returns 0 unless offset + size <= length
        return [f"lea r9, [r8 + {size}]", "cmp r9, rsi", "ja fail"]

    for pc, ins in enumerate(prog):
        out.append(f"L{pc}:")
        cls, k = ins.code & 0x07, ins.k & MASK32
        if cls in (LD, LDX):
            mode, size = ins.code & 0xE0, {W: 4, H: 2, B: 1}[ins.code & 0x18]
            dst = "eax" if cls == LD else "ebx"
            if mode == IMM:
                out.append(f"mov {dst}, {k:#x}")
            elif mode == LEN:
                out.append(f"mov {dst}, esi")
            elif mode == MEM:
                out.append(f"mov {dst}, dword ptr [rsp + {4 * k}]")
            else:
                out.append(f"mov r8d, {k:#x}")
                if mode == IND:
                    out.append("add r8, rbx")
                out += bounds(size if mode != MSH else 1)
                if mode == MSH:
                    out += ["movzx ebx, byte ptr [rdi + r8]", "and ebx, 15", "shl ebx, 2"]
                elif size == 4:
                    out += [f"mov {dst}, dword ptr [rdi + r8]", f"bswap {dst}"]
                elif size == 2:
                    # big-endian 16-bit load: swap the two bytes of the low half
                    out += [f"movzx {dst}, word ptr [rdi + r8]", f"rol {dst[1:]}, 8"]
                else:
                    out.append(f"movzx {dst}, byte ptr [rdi + r8]")
        elif cls in (ST, STX):
            out.append(f"mov dword ptr [rsp + {4 * k}], {'eax' if cls == ST else 'ebx'}")
        elif cls == ALU:
            op = ins.code & 0xF0
            src = "ebx" if ins.code & 0x08 else f"{k:#x}"
            if op == NEG:
                out.append("neg eax")
            elif op in (ADD, SUB, OR, AND, XOR):
                out.append(f"{ {ADD: 'add', SUB: 'sub', OR: 'or', AND: 'and', XOR: 'xor'}[op]} eax, {src}")
            elif op == MUL:
                out.append(f"imul eax, {src}" if src == "ebx" else f"imul eax, eax, {src}")
            elif op in (LSH, RSH):
                shift = "shl" if op == LSH else "shr"
                if src == "ebx":
                    # counts >= 32 give 0, like the interpreter
                    out += ["mov ecx, ebx", "cmp ecx, 31", f"ja zero{pc}", f"{shift} eax, cl", f"jmp done{pc}",
                            f"zero{pc}:", "xor eax, eax", f"done{pc}:"]
                else:
                    out.append(f"{shift} eax, {k}" if k < 32 else "xor eax, eax")
            elif op in (DIV, MOD):
                if src == "ebx":
                    out += ["test ebx, ebx", "jz fail", "mov ecx, ebx"]
                else:
                    out.append(f"mov ecx, {k:#x}")
                out += ["xor edx, edx", "div ecx"]
                if op == MOD:
                    out.append("mov eax, edx")
        elif cls == JMP:
            op = ins.code & 0xF0
            if op == JA:
                out.append(f"jmp L{pc + 1 + k}")
            else:
                src = "ebx" if ins.code & 0x08 else f"{k:#x}"
                t, f = f"L{pc + 1 + ins.jt}", f"L{pc + 1 + ins.jf}"
                if op == JSET:
                    out += [f"test eax, {src}", f"jnz {t}", f"jmp {f}"]
                else:
                    cond = {JEQ: "je", JGT: "ja", JGE: "jae"}[op]
                    out += [f"cmp eax, {src}", f"{cond} {t}", f"jmp {f}"]
        elif cls == RET:
            out += ([] if ins.code & 0x18 == RET_A else [f"mov eax, {k:#x}"]) + ["jmp exit"]
        elif cls == MISC:
            out.append("mov eax, ebx" if ins.code & 0xF8 == TXA else "mov ebx, eax")
    out += ["fail:", "xor eax, eax", "exit:", "add rsp, 72", "pop rbx", "ret"]
    return "\n".join(out)


class Filter:
    """A compiled cBPF program (x86-64 host)."""

    def __init__(self, prog: Sequence[Insn], allocator: execmem.Allocator | None = None) -> None:
        if execmem.arch.host().name != "x86_64":
            raise execmem.UnsupportedError("the bpf example generates x86-64 code")
        self.prog = list(prog)
        source = compile_x86(self.prog)
        self.allocator = allocator or execmem.default_allocator()
        size = len(execmem.asm(source, address=0))
        self.text = self.allocator.jit_text_alloc(size)
        self.text.write(0, execmem.asm(source, address=self.text.address))
        self.text.map()
        self._fn = self.text.function(ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint64)

    def __call__(self, packet: bytes) -> int:
        return int(self._fn(packet, len(packet)))

    def free(self) -> None:
        self.text.free()


def packet(proto: int, sport: int, dport: int, *, ethertype: int = 0x800, frag: int = 0) -> bytes:
    """A minimal Ethernet + IPv4 + TCP/UDP header."""
    eth = b"\x00" * 12 + struct.pack("!H", ethertype)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, frag, 64, proto, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    return eth + ip + struct.pack("!HH", sport, dport) + b"\0" * 16


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m execmem.examples.bpf", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    samples = {
        "tcp 1234->80": packet(6, 1234, 80),
        "tcp 80->999": packet(6, 80, 999),
        "udp 5353->53": packet(17, 5353, 53),
        "udp 53->5353": packet(17, 53, 5353),
        "arp": packet(6, 1, 80, ethertype=0x806),
        "ip fragment": packet(6, 1234, 80, frag=5),
        "truncated": packet(6, 1234, 80)[:30],
    }
    allocator = execmem.Allocator()
    print(f"{'filter':18} " + " ".join(f"{name:>13}" for name in samples))
    status = 0
    for name, prog in FILTERS.items():
        f = Filter(prog, allocator)
        row = []
        for pkt in samples.values():
            got, want = f(pkt), interpret(prog, pkt)
            status |= got != want
            row.append(f"{'accept' if got else 'drop':>13}")
        print(f"{name:18} " + " ".join(row))
    allocator.close()
    if status:
        print("JIT and interpreter disagree", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
