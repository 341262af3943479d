"""The disposable helper process that runs Keystone for ``execmem.asm`` when an input
could crash or stall the interpreter (see ``execmem/_asm_engine.py``).

Run as a script (``python .../_asm_helper.py``), it imports nothing but Keystone so
that it starts fast.  It answers requests on stdin until stdin closes.  A request is
one JSON line ``{"engine": [arch, mode], "syntax": option|null, "address": int,
"size": n, "cpu": seconds}`` followed by ``n`` bytes of source; the answer is one
JSON line ``{"ok": true, "size": n}`` followed by ``n`` bytes of machine code, or
``{"ok": false, "errno": e, "message": text}``.  Each request may use ``cpu`` seconds
of CPU (``ITIMER_PROF``, whose ``SIGPROF`` ends the process even inside Keystone's C
code; ``_asm_engine.HELPER_CPU_SECONDS``) and the process at most ``ADDRESS_SPACE``
bytes of memory (``RLIMIT_AS``).
"""

from __future__ import annotations

import json
import resource
import signal
import sys

ADDRESS_SPACE = 4 << 30


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)  # inherited: never raised
    limit = ADDRESS_SPACE if soft == resource.RLIM_INFINITY else min(ADDRESS_SPACE, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    import keystone

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.readline():
        request = json.loads(header)
        source = stdin.read(request["size"])
        # A fresh handle per request, as in the parent: a reused one crashes on the
        # diagnostic after a diagnostic (see ``_asm_engine``'s module docstring).
        ks = keystone.Ks(*request["engine"])
        if request["syntax"] is not None:
            ks.syntax = request["syntax"]
        signal.setitimer(signal.ITIMER_PROF, request["cpu"])  # SIGPROF's default action ends the process
        try:
            code, _count = ks.asm(source, request["address"], as_bytes=True)
            answer: dict[str, object] = {"ok": True, "size": len(code or b"")}
            payload = code or b""
        except keystone.KsError as exc:
            answer, payload = {"ok": False, "errno": exc.errno, "message": str(exc)}, b""
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        stdout.write(json.dumps(answer).encode() + b"\n" + payload)
        stdout.flush()


if __name__ == "__main__":
    main()
