"""Profiler and debugger output read back and compared with the texts: the perf map
line by line, the jitdump file record by record (parsed here from perf's
specification, and the code compared with process memory), and GDB's JIT list
walked through ``__jit_debug_descriptor`` with each in-memory ELF symbol file parsed.
Also: sharing, closing, fork, the environment variables, failures, and the cost of
nothing when off.  The real ``gdb`` and ``perf`` runs are in test_debuginfo_tools.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paths
import pytest
from programs import Switch, needs_programs

import execmem
from execmem import JitText
from execmem._errors import SystemCallError, UnsupportedError
from execmem.arch import host
from execmem.native import _libc

ROOT = paths.ROOT
PACK = 1 << 16


def codes(rng: random.Random, texts: list[JitText]) -> list[bytes]:
    """Arbitrary bytes (never executed here): what is compared is where they end up."""
    return [bytes(rng.randrange(256) for _ in range(t.size)) for t in texts]


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(scope="module", autouse=True)
def remove_this_process_perf_map() -> Iterator[None]:
    """The tests append to this process's perf map; it goes with them unless it was there."""
    path = Path(f"/tmp/perf-{os.getpid()}.map")
    existed = path.exists()
    yield
    if not existed:
        path.unlink(missing_ok=True)


# -- the perf map -------------------------------------------------------------------------------


def perf_map_lines(since: int) -> list[tuple[int, int, str]]:
    """``START SIZE name`` lines of this process's perf map after byte ``since``
    (other tests of this process append to the same file)."""
    with open(f"/tmp/perf-{os.getpid()}.map", "rb") as f:
        f.seek(since)
        text = f.read().decode()
    out = []
    for line in text.splitlines():
        start, size, name = line.split(" ", 2)
        out.append((int(start, 16), int(size, 16), name))
    return out


def descriptors_of(path: str | Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the one listdir used, closed since
    return links.count(str(path))


def perf_map_size() -> int:
    try:
        return os.path.getsize(f"/tmp/perf-{os.getpid()}.map")
    except FileNotFoundError:
        return 0


def test_perf_map_has_one_line_per_published_text(rng: random.Random) -> None:
    since = perf_map_size()
    with execmem.Allocator(pack_size=PACK, perf_map=True) as a:
        one = a.jit_text_alloc(40, name="first one")
        one.write(0, b"\xcc")
        one.map()
        batch = a.jit_text_alloc_many([16, 100, 64], names=["b0", None, "b2 with spaces"])
        execmem.publish(batch, codes(rng, batch))
        unpublished = a.jit_text_alloc(16, name="never published")
        unpublished.free()
        one.free()  # no line goes: the format cannot remove one
        expected = [(t.address, t.size, t.name) for t in (one, *batch)]
        assert perf_map_lines(since) == expected
        path = f"/tmp/perf-{os.getpid()}.map"
        assert a.stats()["debuginfo"]["perf_map"] == {"path": path, "lines": 4, "on": True}
        assert descriptors_of(path) == 1
    assert descriptors_of(path) == 0  # closed with the allocator
    assert perf_map_lines(since)[2][2] == f"jit_{batch[1].address:x}"


# -- jitdump ------------------------------------------------------------------------------------

HEADER = struct.Struct("<IIIIIIQQ")
PREFIX = struct.Struct("<IIQ")
LOAD = struct.Struct("<IIQQQQ")


def read_jitdump(path: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The file header and records, as perf's jitdump-specification.txt lays them out."""
    data = path.read_bytes()
    magic, version, total, machine, _pad, pid, timestamp, flags = HEADER.unpack_from(data)
    header = {"magic": magic, "version": version, "total_size": total, "elf_mach": machine,
              "pid": pid, "timestamp": timestamp, "flags": flags}
    records = []
    at = total
    while at < len(data):
        kind, size, stamp = PREFIX.unpack_from(data, at)
        record: dict[str, Any] = {"id": kind, "timestamp": stamp}
        if kind == 0:  # JIT_CODE_LOAD
            rpid, tid, vma, code_addr, code_size, index = LOAD.unpack_from(data, at + PREFIX.size)
            name_at = at + PREFIX.size + LOAD.size
            end = data.index(b"\x00", name_at)
            record.update(pid=rpid, tid=tid, vma=vma, code_addr=code_addr, code_size=code_size,
                          code_index=index, name=data[name_at:end].decode(), code=data[end + 1 : at + size])
        records.append(record)
        at += size
    assert at == len(data), "the last record runs past the end of the file"
    return header, records


def loads(records: list[dict[str, Any]]) -> list[tuple[int, int, str, bytes]]:
    return [(r["code_addr"], r["code_size"], r["name"], r["code"]) for r in records if r["id"] == 0]


def test_jitdump_records_every_published_text_with_its_bytes(tmp_path: Path, rng: random.Random) -> None:
    started = time.monotonic_ns()
    with execmem.Allocator(pack_size=PACK, jitdump=tmp_path) as a:
        single = a.jit_text_alloc(24, name="single")
        single.write(0, codes(rng, [single])[0])
        single.map()
        batch = a.jit_text_alloc_many([16, 64, 200], names=["m0", "m1", None])
        execmem.publish(batch, codes(rng, batch))
        inplace = a.jit_text_alloc(32, name="in place")
        inplace.map_rw_inplace()
        inplace.write(0, b"\x90" * 32)
        inplace.finalize()
        published = [single, *batch, inplace]
        # What the records say is what memory holds.
        memory = [ctypes.string_at(t.address, t.size) for t in published]
        assert memory == [t.read() for t in published]
        path = tmp_path / f"jit-{os.getpid()}.dump"
        header, records = read_jitdump(path)
        assert loads(records) == [(t.address, t.size, t.name, m) for t, m in zip(published, memory, strict=True)]
        maps = Path("/proc/self/maps").read_text()
        marker = [line for line in maps.splitlines() if line.endswith(str(path))]
        assert len(marker) == 1 and marker[0].split()[1] == "r-xp"  # what perf record looks for
    assert str(path) not in Path("/proc/self/maps").read_text()
    header, records = read_jitdump(path)
    assert header == {"magic": 0x4A695444, "version": 1, "total_size": 40, "elf_mach": host().elf.machine,  # type: ignore[union-attr]
                      "pid": os.getpid(), "timestamp": header["timestamp"], "flags": 0}
    assert records[-1]["id"] == 3 and [r["id"] for r in records[:-1]] == [0] * 5  # JIT_CODE_CLOSE last
    stamps = [header["timestamp"]] + [r["timestamp"] for r in records]
    assert started <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.monotonic_ns()
    indexes = [r["code_index"] for r in records if r["id"] == 0]
    assert indexes == list(range(5))
    assert {r["pid"] for r in records if r["id"] == 0} == {os.getpid()}
    assert all(r["vma"] == r["code_addr"] for r in records if r["id"] == 0)


@needs_programs
def test_jitdump_live_update_writes_a_new_load_record(tmp_path: Path) -> None:
    switch = Switch((1, 2, 3, 4))  # live patches in the host's patchable shape
    with execmem.Allocator(pack_size=PACK, jitdump=tmp_path) as a:
        t = a.jit_text_alloc(64, name="patched")
        t.write(0, switch.code(t.address))
        t.map()
        t.update(0, switch.patch(1, t.address))
        assert t.function(ctypes.c_int)() == 2
        after = ctypes.string_at(t.address, t.size)
        with a.batch():
            t.update(0, switch.patch(2, t.address))
            t.update(0, switch.patch(3, t.address))
        final = ctypes.string_at(t.address, t.size)
        assert t.function(ctypes.c_int)() == 4
    _, records = read_jitdump(tmp_path / f"jit-{os.getpid()}.dump")
    got = loads(records)
    assert [g[:3] for g in got] == [(t.address, 64, "patched")] * 3  # publish, update, one batch
    assert got[1][3] == after and got[2][3] == final and final.startswith(switch.image(3, t.address))
    assert [r["code_index"] for r in records if r["id"] == 0] == [0, 1, 2]


def test_jitdump_file_is_shared_by_the_allocators_of_a_process(tmp_path: Path, rng: random.Random) -> None:
    path = tmp_path / f"jit-{os.getpid()}.dump"
    a = execmem.Allocator(pack_size=PACK, jitdump=tmp_path)
    b = execmem.Allocator(pack_size=PACK, jitdump=str(tmp_path) + "/.")  # the same directory
    ta, tb = a.jit_text_alloc(16, name="a"), b.jit_text_alloc(16, name="b")
    execmem.publish([ta], codes(rng, [ta]))
    execmem.publish([tb], codes(rng, [tb]))  # (texts of two allocators: one publish each)
    a.close()
    _, records = read_jitdump(path)
    assert [r["id"] for r in records] == [0, 0]  # b still writes: no close record yet
    tc = b.jit_text_alloc(16, name="c")
    execmem.publish([tc], codes(rng, [tc]))
    b.close()
    # Opened again by this process: appended to, numbering continued, one header.
    with execmem.Allocator(pack_size=PACK, jitdump=tmp_path) as c:
        td = c.jit_text_alloc(16, name="d")
        execmem.publish([td], codes(rng, [td]))
    _, records = read_jitdump(path)
    assert [(r["id"], r.get("name"), r.get("code_index")) for r in records] == [
        (0, "a", 0), (0, "b", 1), (0, "c", 2), (3, None, None), (0, "d", 3), (3, None, None),
    ]


# -- the GDB JIT interface ----------------------------------------------------------------------


class Entry(ctypes.Structure):
    """struct jit_code_entry, declared here from the GDB manual."""

    _fields_ = (("next_entry", ctypes.c_void_p), ("prev_entry", ctypes.c_void_p),
                ("symfile_addr", ctypes.c_void_p), ("symfile_size", ctypes.c_uint64))


class Descriptor(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("action_flag", ctypes.c_uint32),
                ("relevant_entry", ctypes.c_void_p), ("first_entry", ctypes.c_void_p))


class LinkMap(ctypes.Structure):
    """struct link_map's public head (<link.h>): the dynamic loader's list of objects."""

    _fields_ = (("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p), ("l_ld", ctypes.c_void_p),
                ("l_next", ctypes.c_void_p), ("l_prev", ctypes.c_void_p))


def descriptor() -> Descriptor:
    """``__jit_debug_descriptor`` found as a debugger finds it: by name, in the objects
    of the loader's list (``_r_debug.r_map``: version int, then the list head)."""
    r_debug = ctypes.addressof(ctypes.c_int.in_dll(ctypes.CDLL(None), "_r_debug"))
    at = ctypes.c_void_p.from_address(r_debug + ctypes.sizeof(ctypes.c_void_p)).value
    found = []
    while at:
        link = LinkMap.from_address(at)
        name = (link.l_name or b"").decode()
        if name.startswith("/"):
            # OSError: not loadable by name (the vDSO); ValueError: no such symbol.
            with contextlib.suppress(OSError, ValueError):
                found.append(Descriptor.in_dll(ctypes.CDLL(name), "__jit_debug_descriptor"))
        at = link.l_next
    assert len(found) == 1, f"{len(found)} loaded objects define __jit_debug_descriptor"
    return found[0]


def elf_symbols(image: bytes) -> tuple[int, list[tuple[str, int, int, int]], list[tuple[str, int, int, int]]]:
    """(e_machine, sections as (name, type, address, size), function symbols as
    (name, value, size, section index)) of an ELF-64 little-endian image."""
    assert image[:4] == b"\x7fELF" and image[4] == 2 and image[5] == 1
    (machine,) = struct.unpack_from("<H", image, 18)
    shoff, = struct.unpack_from("<Q", image, 40)
    shnum, shstrndx = struct.unpack_from("<HH", image, 60)
    headers = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + 64 * i) for i in range(shnum)]
    names = headers[shstrndx]

    def string(table: tuple[int, ...], offset: int) -> str:
        start = table[4] + offset
        return image[start : image.index(b"\x00", start)].decode()

    sections = [(string(names, h[0]), h[1], h[3], h[5]) for h in headers]
    symbols = []
    for h in headers:
        if h[1] == 2:  # SHT_SYMTAB
            strtab = headers[h[6]]
            for i in range(h[5] // 24):
                st_name, info, _, shndx, value, size = struct.unpack_from("<IBBHQQ", image, h[4] + 24 * i)
                if info & 0xF == 2:  # STT_FUNC
                    symbols.append((string(strtab, st_name), value, size, shndx))
    return machine, sections, symbols


def registered() -> list[tuple[str, int, int]]:
    """Every symbol file in GDB's list, walked from the descriptor: (name, start, size)."""
    out = []
    d = descriptor()
    assert d.version == 1 and d.action_flag == 0
    at, before = d.first_entry, None
    while at:
        entry = Entry.from_address(at)
        assert entry.prev_entry == before
        machine, sections, symbols = elf_symbols(ctypes.string_at(entry.symfile_addr, entry.symfile_size))
        assert machine == host().elf.machine  # type: ignore[union-attr]
        ((name, value, size, index),) = symbols
        section = sections[index]
        assert section[0] == ".text" and (section[2], section[3]) == (value, size)
        out.append((name, value, size))
        before, at = at, entry.next_entry
    return out


def test_gdb_list_holds_exactly_the_live_texts(rng: random.Random) -> None:
    with execmem.Allocator(pack_size=PACK, gdb=True) as a, execmem.Allocator(pack_size=PACK, gdb=True) as b:
        before = set(registered())
        texts = a.jit_text_alloc_many([16, 48, 64], names=["g0", None, "g2"])
        execmem.publish(texts, codes(rng, texts))
        other = b.jit_text_alloc(128, name="other allocator")
        other.map()
        mine = {(t.name, t.address, t.size) for t in (*texts, other)}
        assert set(registered()) - before == mine
        texts[1].free()
        mine.discard((texts[1].name, texts[1].address, texts[1].size))
        assert set(registered()) - before == mine
        assert a.stats()["debuginfo"]["gdb"]["registered"] == 2
        a.close()
        assert set(registered()) - before == {("other allocator", other.address, 128)}
    assert set(registered()) == before


def writable_and_executable() -> set[str]:
    """The process's mappings that are writable and executable at once (other tests of
    this process may have made some: Unicorn's, libffi closures')."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line for line in lines if {"w", "x"} <= set(line.split()[1])}


def test_the_outputs_make_no_mapping_writable_and_executable(tmp_path: Path) -> None:
    before = writable_and_executable()
    with execmem.Allocator(pack_size=PACK, gdb=True, jitdump=tmp_path, perf_map=True) as a:
        a.jit_text_alloc(16).map()
        maps = Path("/proc/self/maps").read_text()
        assert "execmem-gdbjit" in maps and f"jit-{os.getpid()}.dump" in maps
        assert writable_and_executable() <= before


def test_the_return_instruction_of_every_architecture_decodes_as_ret() -> None:
    import capstone

    for name in execmem.arch.names():
        spec = execmem.arch.get(name)
        assert spec.elf is not None and spec.engines.capstone is not None
        decoder = capstone.Cs(*spec.engines.capstone)
        (insn,) = decoder.disasm(spec.elf.ret, 0)
        assert insn.mnemonic == "ret" and insn.size == len(spec.elf.ret), name


# -- environment, fork, failures, cost --------------------------------------------------------------


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_environment_variables_turn_on_the_default_allocators_sinks(tmp_path: Path) -> None:
    code = (
        "import execmem, os\n"
        "t = execmem.jit_text_alloc(16, name='from_env')\n"
        "t.write(0, b'\\xcc'); t.map()\n"
        "print(os.getpid(), t.address, sorted(execmem.default_allocator().stats()['debuginfo']))\n"
    )
    done = run_python(code, {"EXECMEM_PERF_MAP": "1", "EXECMEM_JITDUMP": str(tmp_path), "EXECMEM_GDB": "1"})
    assert done.returncode == 0, done.stderr
    pid, address, sinks = done.stdout.split(" ", 2)
    assert sinks.strip() == "['gdb', 'jitdump', 'perf_map']"
    perf_map = Path(f"/tmp/perf-{pid}.map")
    try:
        assert perf_map.read_text() == f"{int(address):x} 10 from_env\n"
    finally:
        perf_map.unlink()
    _, records = read_jitdump(tmp_path / f"jit-{pid}.dump")
    assert [(r["id"], r.get("name")) for r in records] == [(0, "from_env"), (3, None)]  # closed at exit
    off = run_python("import execmem; print(execmem.default_allocator().stats()['debuginfo'])",
                     {"EXECMEM_PERF_MAP": "0", "EXECMEM_JITDUMP": "", "EXECMEM_GDB": ""})
    assert off.stdout == "{}\n", off.stderr
    bad = run_python("import execmem; execmem.jit_text_alloc(16)", {"EXECMEM_GDB": "yes"})
    assert bad.returncode == 1 and "UnsupportedError: EXECMEM_GDB='yes': set it to 1" in bad.stderr


def test_a_forked_child_writes_its_own_jitdump_never_the_parents(tmp_path: Path) -> None:
    code = (
        "import execmem, os\n"
        "def pub(name):\n"
        "    t = execmem.jit_text_alloc(16, name=name); t.write(0, b'\\xcc'); t.map()\n"
        "pub('parent before')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    pub('child')\n"
        "    raise SystemExit(0)\n"  # a normal exit: finalizers run in the child
        "os.waitpid(pid, 0)\n"
        "pub('parent after')\n"
        "print(os.getpid(), pid)\n"
    )
    done = run_python(code, {"EXECMEM_JITDUMP": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    parent, child = map(int, done.stdout.split())
    header, records = read_jitdump(tmp_path / f"jit-{parent}.dump")
    assert header["pid"] == parent
    assert [(r["id"], r.get("name"), r.get("pid")) for r in records] == [
        (0, "parent before", parent), (0, "parent after", parent), (3, None, None),
    ]
    header, records = read_jitdump(tmp_path / f"jit-{child}.dump")
    assert header["pid"] == child
    assert [(r["id"], r.get("name"), r.get("pid")) for r in records] == [(0, "child", child), (3, None, None)]


def test_bad_options_are_clear_errors_and_leave_nothing_open(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SystemCallError, match=r"open\(.*missing/jit-.*ENOENT"):
        execmem.Allocator(jitdump=tmp_path / "missing")
    with pytest.raises(TypeError, match="perf_map must be True or False"):
        execmem.Allocator(perf_map=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="jitdump must be a directory path"):
        execmem.Allocator(jitdump=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gdb must be True or False"):
        execmem.Allocator(gdb="yes")  # type: ignore[arg-type]
    from execmem._memory_backend import MemoryBackend

    backend = MemoryBackend("x86_64")
    with pytest.raises(UnsupportedError, match="memory backend"):
        execmem.Allocator(backend=backend, perf_map=True)
    backend.close()
    marker = _libc.PROT_READ | _libc.PROT_EXEC
    with (
        _libc.inject("mmap", 1, when=lambda args: args[2] == marker and args[4] != -1),
        pytest.raises(SystemCallError, match=r"marker of .*noexec"),
    ):
        execmem.Allocator(jitdump=tmp_path)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert list(tmp_path.iterdir()) == []  # the file made before the failure is gone


def test_jitdump_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "someone else's"
    target.write_bytes(b"precious")
    dump = tmp_path / f"jit-{os.getpid()}.dump"
    dump.symlink_to(target)
    with execmem.Allocator(jitdump=tmp_path):
        assert not dump.is_symlink() and dump.read_bytes()[:4] == b"DTiJ"  # JiTD, little-endian
    assert target.read_bytes() == b"precious"


def test_a_failing_sink_is_turned_off_with_a_warning_and_publishing_goes_on(tmp_path: Path) -> None:
    with execmem.Allocator(pack_size=PACK, perf_map=True, jitdump=tmp_path) as a:
        sink = next(s for s in a._debug._sinks if s.what == "perf_map")  # type: ignore[union-attr]
        read_only = os.open("/dev/null", os.O_RDONLY)
        os.dup2(read_only, sink._fd)  # its descriptor now refuses writes (EBADF)
        os.close(read_only)
        t = a.jit_text_alloc(16, name="still published")
        t.write(0, b"\xcc")
        with pytest.warns(RuntimeWarning, match=r"perf_map turned off after an error: .*write\(/tmp/perf-.*EBADF"):
            t.map()
        assert t.state is execmem.TextState.LIVE
        info = a.stats()["debuginfo"]
        assert info["perf_map"]["on"] is False and "EBADF" in info["perf_map"]["error"]
        assert info["jitdump"]["on"] is True and info["jitdump"]["load_records"] == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a.jit_text_alloc(16).map()  # no second warning: the sink is off
        assert a.stats()["debuginfo"]["jitdump"]["load_records"] == 2


def test_nothing_is_attached_when_everything_is_off() -> None:
    with execmem.Allocator(pack_size=PACK) as a:
        assert a._debug is None and a.stats()["debuginfo"] == {}



def test_the_benchmark_row_times_every_configuration(tmp_path: Path) -> None:
    """``execmem bench`` prints this row; here only its shape (timings are never asserted)."""
    from execmem.bench import _debuginfo

    result = _debuginfo.debuginfo_benchmark(20, 1)
    rows = {(r["config"], r["batched"]): r for r in result["rows"]}
    assert set(rows) == {(c, b) for c in _debuginfo.CONFIGS for b in (False, True)}
    assert all(r["us_per_function"] > 0 for r in rows.values())
    assert rows["off", True]["extra_us_per_function"] == 0
    text = "\n".join(_debuginfo.table_lines(result))
    assert "one by one: off " in text and "all " in text and "gdb " in text


def test_an_allocator_dropped_without_close_closes_its_files(tmp_path: Path) -> None:
    import gc

    a = execmem.Allocator(pack_size=PACK, perf_map=True, jitdump=tmp_path)
    t = a.jit_text_alloc(16)
    t.write(0, b"\xcc")
    t.map()
    dump = tmp_path / f"jit-{os.getpid()}.dump"
    assert descriptors_of(dump) == 1
    del a, t
    gc.collect()
    assert descriptors_of(dump) == 0 and descriptors_of(f"/tmp/perf-{os.getpid()}.map") == 0
    assert [r["id"] for r in read_jitdump(dump)[1]] == [0, 3]
