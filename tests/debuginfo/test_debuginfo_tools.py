"""The real tools on named JIT code: ``gdb`` names the JIT frame of a crash in a
backtrace and in ``info symbol`` (also after attaching to a running process, from
the registered list), and ``perf record`` / ``perf inject --jit`` / ``perf report``
attribute samples to the JIT function by name.  Each is skipped, with the reason,
where the tool is missing or cannot run here."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import paths
import pytest

ROOT = paths.ROOT
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the JIT code here is x86-64"),
]
GDB = shutil.which("gdb")
PERF = shutil.which("perf")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")
needs_perf = pytest.mark.skipif(PERF is None, reason="perf is not installed (apt-get install linux-perf)")

CRASH = """
import execmem
freed = execmem.jit_text_alloc(16, name="freed_before_the_crash")
freed.write(0, execmem.asm("ret"))
freed.map()
t = execmem.jit_text_alloc(16, name="crash_in_jit")
t.write(0, execmem.asm("nop\\nud2\\nret", address=t.address))
t.map()
print(f"freed {freed.address:#x} crash {t.address:#x}", flush=True)
freed.free()
t.function(None)()
"""

# Quiet, no debuginfod, no init files; then what the test asks.
GDB_PRELUDE = ["-q", "-batch", "-nx", "-ex", "set debuginfod enabled off", "-ex", "set pagination off"]


def gdb(*args: str, timeout: float = 180) -> str:
    assert GDB is not None
    done = subprocess.run([GDB, *GDB_PRELUDE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "EXECMEM_GDB": "1"}, cwd=ROOT)
    return done.stdout + done.stderr


@needs_gdb
def test_gdb_names_the_jit_frame_of_a_crash(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = gdb("-ex", "run", "-ex", "bt", "-ex", "info symbol $pc", "--args", sys.executable, str(script))
    found = re.search(r"freed (0x[0-9a-f]+) crash (0x[0-9a-f]+)", out)
    assert found, out
    crash = int(found[2], 16)
    # "Program received ..." single-threaded, "Thread N \"python\" received ..." otherwise
    # (the membarrier probe runs in a thread of its own).
    assert re.search(r"(Program|Thread \d+ \S+) received signal SIGILL", out), out
    frame0 = next(line for line in out.splitlines() if line.startswith("#0 "))
    assert re.fullmatch(rf"#0\s+0x0*{crash + 1:x} in crash_in_jit \(\)", frame0), frame0  # ud2 after the nop
    assert "crash_in_jit + 1 in section .text" in out, out
    # The freed text was unregistered: gdb names nothing there any more.
    after = gdb("-ex", "run", "-ex", f"info symbol {found[1]}", "--args", sys.executable, str(script))
    assert re.search(rf"No symbol matches {found[1]}", after), after


@needs_gdb
def test_the_readme_gdb_session_on_the_bf_example() -> None:
    """A hardware breakpoint on a JIT function by name (dual mode maps the code nowhere
    writable, not even for ptrace, so ``break`` cannot patch in an int3), and a
    backtrace naming two JIT frames: the I/O callback and the program calling it."""
    out = gdb("-ex", "set breakpoint pending on", "-ex", "hbreak bf_putc", "-ex", "run", "-ex", "bt 2",
              "-ex", "x/i $pc", "--args", sys.executable, "-m", "jit_examples.bf")
    if "Couldn't write debug register" in out or "Hardware breakpoints used exceeds" in out:
        pytest.skip("no hardware breakpoints here")
    frames = [line for line in out.splitlines() if line.startswith("#")]
    assert re.fullmatch(r"#0\s+0x[0-9a-f]+ in bf_putc \(\)", frames[0]), out
    assert re.fullmatch(r"#1\s+0x[0-9a-f]+ in bf_hello \(\)", frames[1]), out
    assert re.search(r"=> 0x[0-9a-f]+ <bf_putc>:", out), out


ATTACH = """
import execmem, os, time
texts = execmem.jit_text_alloc_many([16, 32], names=["attached_one", "attached_two"])
execmem.publish(texts, [execmem.asm("ret")] * 2)
print(" ".join(hex(t.address) for t in texts), flush=True)
time.sleep(120)
"""


@needs_gdb
def test_gdb_attaching_later_reads_the_registered_list(tmp_path: Path) -> None:
    """GDB's other path: texts registered before GDB was there are found by walking
    ``__jit_debug_descriptor``'s list when it attaches."""
    script = tmp_path / "attach.py"
    script.write_text(ATTACH)
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "EXECMEM_GDB": "1"})
    try:
        assert child.stdout is not None
        one, two = child.stdout.readline().split()
        out = gdb("-p", str(child.pid), "-ex", f"info symbol {one}", "-ex", f"info symbol {int(two, 16) + 5:#x}")
        if "ptrace: Operation not permitted" in out:
            pytest.skip("this system does not let gdb attach (ptrace restrictions)")
        assert "attached_one in section .text" in out, out
        assert "attached_two + 5 in section .text" in out, out
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


HOT = """
import ctypes, sys, time
import execmem
from execmem.native import NativeBackend
a = execmem.Allocator(backend=NativeBackend(sys.argv[1]), jitdump=sys.argv[2], perf_map=True)
t = a.jit_text_alloc(64, name="hot_loop")
t.write(0, execmem.asm("mov rcx, rdi\\nspin: dec rcx\\njnz spin\\nmov rax, rdi\\nret", address=t.address))
t.map()
f = t.function(ctypes.c_uint64, ctypes.c_uint64)
deadline = time.monotonic() + 1.0
while time.monotonic() < deadline:
    f(2_000_000)
a.close()
"""


def perf(*args: str) -> subprocess.CompletedProcess[str]:
    assert PERF is not None
    return subprocess.run([PERF, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def top_symbols(data: Path) -> list[tuple[float, str]]:
    report = perf("report", "-i", str(data), "--stdio", "--sort", "sym")
    assert report.returncode == 0, report.stderr
    rows = re.findall(r"^\s+([0-9.]+)%\s+\[\.\]\s+(\S+)", report.stdout, re.M)
    return [(float(share), name) for share, name in rows]


@needs_perf
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_perf_record_inject_report_name_the_jit_function(tmp_path: Path, mode: str) -> None:
    data, injected = tmp_path / "perf.data", tmp_path / "perf.jit.data"
    script = tmp_path / "hot.py"
    script.write_text(HOT)
    recorded = perf("record", "-k", "1", "-o", str(data), sys.executable, str(script), mode, str(tmp_path))
    if recorded.returncode != 0 and not data.exists():
        pytest.skip(f"perf record cannot sample here: {recorded.stderr.strip()[-300:]}")
    assert recorded.returncode == 0, recorded.stderr
    done = perf("inject", "--jit", "-i", str(data), "-o", str(injected))
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("jitted-*.so")), "perf inject wrote no ELF image for the JIT code"
    share, name = top_symbols(injected)[0]
    assert name == "hot_loop" and share > 20, top_symbols(injected)[:5]
    # Without inject, perf consults the perf map only for anonymous memory: mprotect
    # mode's packs are anonymous, dual mode's are a memfd (perf shows the file).
    plain = dict((n, s) for s, n in top_symbols(data))
    if mode == "mprotect":
        assert plain.get("hot_loop", 0) > 20, top_symbols(data)[:5]
    else:
        assert "hot_loop" not in plain
    Path(f"/tmp/perf-{recorded_pid(data)}.map").unlink(missing_ok=True)


def recorded_pid(data: Path) -> int:
    """The pid of the recorded Python process (from its jitdump file's name)."""
    (dump,) = data.parent.glob("jit-*.dump")
    return int(dump.stem.split("-")[1])



@needs_perf
def test_the_readme_perf_session_on_the_bf_example(tmp_path: Path) -> None:
    program = tmp_path / "spin.b"
    program.write_text("++++++++++++++++[>-[>-[>-[->+<]<-]<-]<-]\n")  # 16 * 255**3 moves
    data, injected = tmp_path / "perf.data", tmp_path / "perf.jit.data"
    with open(os.devnull) as nothing:
        recorded = subprocess.run(
            [PERF, "record", "-k", "1", "-o", str(data), sys.executable, "-m", "jit_examples.bf", str(program)],  # type: ignore[list-item]
            stdin=nothing, capture_output=True, text=True, timeout=300, cwd=ROOT,
            env={**os.environ, "EXECMEM_JITDUMP": str(tmp_path)},
        )
    if recorded.returncode != 0 and not data.exists():
        pytest.skip(f"perf record cannot sample here: {recorded.stderr.strip()[-300:]}")
    assert recorded.returncode == 0, recorded.stderr
    assert perf("inject", "--jit", "-i", str(data), "-o", str(injected)).returncode == 0
    share, name = top_symbols(injected)[0]
    assert name == "bf_spin.b" and share > 20, top_symbols(injected)[:5]
