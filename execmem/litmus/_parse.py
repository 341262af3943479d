"""Strict parser (and printer) of herd7's AArch64 litmus format.

A file is split as herd7's lib/splitter.mll does (read for the format only):

1. the header ``AArch64 NAME`` (optionally ``(texname)`` and a ``"doc"`` string);
2. ``Key=value`` lines, comments and a quoted doc string, up to ``{``;
3. the init block ``{ ... }`` (state language, :mod:`._condition`);
4. the code: a thread header ``P0 | P1 | P1.F ;`` then rows of ``|``-separated cells,
   each ending with ``;``; a cell holds labels (``l1: l2:``) and at most one instruction;
5. from the first ``exists``/``~exists``/``forall``/``final``/``locations``/``filter``
   to the end: the condition (state language).

Anything else is an error: :class:`execmem.LitmusError` with ``"<file>:<line>: <what>"``
(never another exception type).  Inputs are bounded (:data:`MAX_TEXT`, thread, row and
nesting limits) and every regular expression is linear.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
from collections.abc import Iterator

from execmem._errors import LitmusError
from execmem.litmus._ast import (
    CodeLine,
    FaultAtom,
    FrozenMap,
    Init,
    LitmusTest,
    Mem,
    Reg,
    Thread,
    Value,
)
from execmem.litmus._condition import (
    MAX_INSTR_TEXT,
    Threads,
    _Src,
    parse_constraints,
    parse_init,
    skip_comment,
)

MAX_TEXT = 1 << 20  # characters
MAX_THREADS = 64
MAX_ROWS = 20_000
MAX_INFO = 1000

_HEADER = re.compile(
    r"[ \t]*([A-Za-z0-9_]+)[ \t]+([A-Za-z0-9_/.\-+\[\]:]+)[ \t]*"
    r"(?:\(([A-Za-z][A-Za-z0-9_/.\-]*)\)[ \t]*)?"
    r'(?:"([^"\n]*)"[ \t]*)?;?'
)
_KEYVAL = re.compile(r"([A-Za-z][A-Za-z0-9_/.\-]*)[ \t]*=[ \t]*([^\n]*)")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_$.][A-Za-z0-9_/.\-$]*")
_COND_KEYWORDS = frozenset(
    ["exists", "forall", "final", "locations", "filter", "observed", "Observed", "cases"]
)
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_THREAD = re.compile(
    r"P([0-9]{1,3})(\.F)?(?::([A-Za-z_.$][A-Za-z0-9_/.$]*(?:,[A-Za-z_.$][A-Za-z0-9_/.$]*)*))?"
)
_CODE_LABEL = re.compile(r"([A-Za-z_.$][A-Za-z0-9_/.$]*)[ \t\n]*:")
_INSTR_START = re.compile(r"[A-Za-z.]")
_BLANKS = re.compile(r"\s*")
_INSTR_BAD = re.compile(r"[^\x20-\x7e]|[\"`|;]")


class _Text:
    """The source with a position -> line map."""

    def __init__(self, text: str, fname: str) -> None:
        self.text = text
        self.fname = fname
        self.src = _Src(fname)
        self._nl = [i for i, c in enumerate(text) if c == "\n"]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self._nl, pos) + 1

    def fail(self, pos: int, what: str) -> LitmusError:
        return LitmusError(f"{self.fname}:{self.line(pos)}: {what}")


def parse_file(path: str | os.PathLike[str]) -> LitmusTest:
    """Read and parse a ``.litmus`` file (UTF-8, at most :data:`MAX_TEXT` bytes)."""
    p = os.fspath(path)
    return parse_litmus(read_text(p, MAX_TEXT, LitmusError), p)


def read_text(path: str, limit: int, error: type[Exception]) -> str:
    """A regular file's UTF-8 text, at most ``limit`` bytes; anything else (missing,
    a fifo or device, which must not block or stream for ever, too large, not UTF-8)
    raises ``error("path:line: why")``."""
    try:
        # O_NONBLOCK: opening a fifo must not wait for a writer; only regular files are read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{path}:1: not a regular file")
            data = f.read(limit + 1)
    except (OSError, ValueError) as e:
        raise error(f"{path}:1: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > limit:
        raise error(f"{path}:1: file larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text") from None


def parse_litmus(text: str, path: str | None = None) -> LitmusTest:
    """Parse the text of one test; ``path`` is only used in messages and kept."""
    fname = path if path is not None else "<litmus>"
    if not isinstance(text, str):
        raise LitmusError(f"{fname}:1: expected text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise LitmusError(f"{fname}:1: text longer than {MAX_TEXT} characters")
    try:
        return _parse(text, path, fname)
    except RecursionError:
        raise LitmusError(f"{fname}:1: input nested too deeply") from None


def _parse(raw: str, path: str | None, fname: str) -> LitmusTest:
    text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", " ")
    t = _Text(text, fname)
    bad = _BAD_CHAR.search(text)
    if bad:
        raise t.fail(bad.start(), f"control character {bad.group(0)!r} in the text")

    # 1. header
    m = _HEADER.match(text)
    if not m:
        raise t.fail(0, "expected 'AArch64 <name>' on the first line")
    arch, name, texname, doc = m.group(1), m.group(2), m.group(3), m.group(4)
    if arch != "AArch64":
        raise t.fail(0, f"'{arch}' tests are not supported (only AArch64)")
    pos = _skip_blanks_and_comments(t, m.end(), newline=False)
    if pos < len(text) and text[pos] not in "\n{":
        raise t.fail(pos, "unexpected text after the test name")

    # 2. key=value lines up to '{'
    info: dict[str, str] = {}
    info_lines: dict[str, int] = {}
    seen_keys: set[str] = set()
    while True:
        pos = _skip_blanks_and_comments(t, pos, newline=True)
        if pos >= len(text):
            raise t.fail(pos, "missing init block '{'")
        c = text[pos]
        if c == "{":
            break
        if c == '"':
            end = text.find('"', pos + 1)
            if end < 0:
                raise t.fail(pos, "unterminated doc string")
            if doc is not None:
                raise t.fail(pos, "a second doc string")
            doc = text[pos + 1 : end]
            pos = end + 1
            continue
        kv = _KEYVAL.match(text, pos)
        if not kv:
            raise t.fail(pos, "expected 'Key=value', a comment or the init block '{'")
        key, value = kv.group(1), kv.group(2).rstrip(" \t")
        if key.lower() in seen_keys:
            raise t.fail(pos, f"'{key}' is given twice")
        if len(info) >= MAX_INFO:
            raise t.fail(pos, f"more than {MAX_INFO} 'Key=value' lines")
        seen_keys.add(key.lower())
        info[key] = value
        info_lines[key] = t.line(pos)
        pos = kv.end()

    # 3. init block
    init_start = pos + 1
    init_end = _matching_brace(t, pos)

    # 4/5. code, then constraints; the init block is parsed once the code is known
    # so references to threads and labels are checked where they are written
    code_start = init_end + 1
    cond_start = _find_constraints(t, code_start)
    threads = _parse_code(t, code_start, cond_start)
    labels: dict[int, set[str]] = {}
    for th in threads:
        labels.setdefault(th.proc, set()).update(th.labels())
    known = Threads(
        nprocs=sum(1 for th in threads if not th.handler),
        labels={p: frozenset(v) for p, v in labels.items()},
    )
    init = parse_init(text[init_start:init_end], t.line(init_start), fname, known)
    locs, filt, condition = parse_constraints(
        text[cond_start:], t.line(cond_start), fname, known)

    variants, cache_type = _digest_info(t, info, info_lines)
    test = LitmusTest(
        name=name,
        path=path,
        info=FrozenMap(info),
        variants=variants,
        cache_type=cache_type,
        init=init,
        threads=threads,
        condition=condition,
        locations_clause=locs,
        filter=filt,
        doc=doc,
        texname=texname,
    )
    return test


def _skip_blanks_and_comments(t: _Text, pos: int, newline: bool) -> int:
    text = t.text
    n = len(text)
    while pos < n:
        c = text[pos]
        if c in " \t" or (newline and c == "\n"):
            pos += 1
        elif text.startswith("(*", pos):
            pos, _ = skip_comment(text, pos, t.line(pos), t.src)
        else:
            break
    return pos


def _matching_brace(t: _Text, pos: int) -> int:
    """``text[pos] == '{'``: the position of the matching ``}`` (comments and strings
    are skipped)."""
    text = t.text
    depth = 0
    i = pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0 or text.find("\n", i + 1, end) >= 0:
                raise t.fail(i, "unterminated string")
            i = end
        elif text.startswith("(*", i):
            i, _ = skip_comment(text, i, t.line(i), t.src)
            continue
        i += 1
    raise t.fail(pos, "unterminated init block '{' (missing '}')")


def _find_constraints(t: _Text, pos: int) -> int:
    """Where the constraint section starts (its first keyword), or the end of text."""
    text = t.text
    n = len(text)
    while pos < n:
        c = text[pos]
        if text.startswith("(*", pos):
            pos, _ = skip_comment(text, pos, t.line(pos), t.src)
            continue
        if c == '"':
            raise t.fail(pos, "unexpected '\"' in the code")
        if c == "~":
            j = pos + 1
            while j < n and text[j] in " \t":
                j += 1
            m = _SPLIT_NAME.match(text, j)
            if m and m.group(0) == "exists":
                return pos
            pos += 1
            continue
        m = _SPLIT_NAME.match(text, pos)
        if m:
            if m.group(0) in _COND_KEYWORDS:
                return pos
            pos = m.end()
            continue
        pos += 1
    return n


def _strip_comments(t: _Text, start: int, end: int) -> str:
    """``text[start:end]`` with comments blanked (newlines kept, same length)."""
    text = t.text
    out: list[str] = []
    i = start
    while i < end:
        if text.startswith("(*", i):
            j, _ = skip_comment(text, i, t.line(i), t.src)
            if j > end:
                raise t.fail(i, "comment runs into the condition")
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _segments(code: str, base: int, sep: str) -> Iterator[tuple[int, str]]:
    """``code`` split on ``sep``: (absolute start, piece)."""
    i = 0
    while True:
        j = code.find(sep, i)
        if j < 0:
            yield base + i, code[i:]
            return
        yield base + i, code[i:j]
        i = j + 1


def _first_nonblank(s: str) -> int:
    return len(s) - len(s.lstrip())


def _parse_code(t: _Text, start: int, end: int) -> tuple[Thread, ...]:
    code = _strip_comments(t, start, end)
    if code.count(";") > MAX_ROWS + 2:
        raise t.fail(start, f"more than {MAX_ROWS} code rows")
    segs = list(_segments(code, start, ";"))
    last_pos, last = segs.pop()  # after the final ';'
    if last.strip():
        raise t.fail(last_pos + _first_nonblank(last), "missing ';' at the end of the row")
    if not segs:
        raise t.fail(start, "missing the thread header 'P0 | P1 ... ;'")
    if len(segs) > MAX_ROWS:
        raise t.fail(start, f"more than {MAX_ROWS} code rows")
    if not segs[0][1].strip() and len(segs) > 1:
        segs.pop(0)  # herd accepts one ';' before the header
    head_pos, head = segs[0]

    # thread header
    threads_meta: list[tuple[str, int, bool, tuple[str, ...], int]] = []
    nmain = 0
    handlers: set[int] = set()
    for cpos, cell in _segments(head, head_pos, "|"):
        cell_pos = cpos + _first_nonblank(cell)
        word = cell.strip()
        m = _THREAD.fullmatch(word)
        if not m:
            raise t.fail(cell_pos, f"expected a thread name P<n> or P<n>.F, found '{word}'")
        proc, handler = int(m.group(1)), m.group(2) is not None
        if handler:
            if proc >= nmain:
                raise t.fail(cell_pos, f"fault handler P{proc}.F of an undefined thread")
            if proc in handlers:
                raise t.fail(cell_pos, f"two fault handlers for P{proc}")
            handlers.add(proc)
        else:
            if proc != nmain:
                raise t.fail(cell_pos, f"threads must be P0, P1, ... in order (found P{proc})")
            nmain += 1
        annots = tuple(m.group(3).split(",")) if m.group(3) else ()
        threads_meta.append((word.split(":")[0], proc, handler, annots, cell_pos))
        if len(threads_meta) > MAX_THREADS:
            raise t.fail(cell_pos, f"more than {MAX_THREADS} threads")
    if nmain == 0:
        raise t.fail(head_pos, "no thread P0")
    if len(segs) < 2:
        raise t.fail(segs[0][0] + len(head), "no code rows after the thread header")

    ncol = len(threads_meta)
    columns: list[list[CodeLine]] = [[] for _ in range(ncol)]
    labels_of: dict[int, set[str]] = {}
    for rpos, row in segs[1:]:
        cells = list(_segments(row, rpos, "|"))
        if len(cells) != ncol:
            p = rpos + _first_nonblank(row)
            raise t.fail(p, f"row has {len(cells)} columns, the header has {ncol}")
        for col, (cpos, cell) in enumerate(cells):
            ln = _parse_cell(t, cpos, cell)
            if ln is None:
                continue
            proc = threads_meta[col][1]
            seen = labels_of.setdefault(proc, set())
            for lab in ln.labels:
                if lab in seen:
                    raise t.fail(cpos + _first_nonblank(cell),
                                 f"label '{lab}' defined twice in P{proc}")
                seen.add(lab)
            columns[col].append(ln)
    return tuple(
        Thread(name=nm, proc=p, handler=h, lines=tuple(columns[i]), annotations=a)
        for i, (nm, p, h, a, _) in enumerate(threads_meta)
    )


def _parse_cell(t: _Text, cpos: int, cell: str) -> CodeLine | None:
    i = _first_nonblank(cell)
    if i == len(cell):
        return None
    line_no = t.line(cpos + i)
    labels: list[str] = []
    while True:
        m = _CODE_LABEL.match(cell, i)
        if not m:
            break
        if m.group(1) == "codevar":
            raise t.fail(cpos + i, "'codevar:' is not supported")
        labels.append(m.group(1))
        i = _BLANKS.match(cell, m.end()).end()  # type: ignore[union-attr]
    rest = " ".join(cell[i:].split())
    instr: str | None = None
    if rest:
        if len(rest) > MAX_INSTR_TEXT:
            raise t.fail(cpos + i, "instruction text too long")
        bad = _INSTR_BAD.search(rest)
        if bad:
            raise t.fail(cpos + i, f"unexpected character {bad.group(0)!r} in an instruction")
        if not _INSTR_START.match(rest):
            raise t.fail(cpos + i, f"expected an instruction, found '{rest}'")
        instr = "NOP" if rest.upper() == "NOP" else rest
    return CodeLine(tuple(labels), instr, line_no)


def _digest_info(
    t: _Text, info: dict[str, str], lines: dict[str, int]
) -> tuple[frozenset[str], frozenset[str]]:
    variants: frozenset[str] = frozenset()
    cache: frozenset[str] = frozenset()
    for key, value in info.items():
        words = [w for w in re.split(r"[,\s]+", value) if w]
        if key.lower() == "variant":
            variants = frozenset(w.lower() for w in words)
        elif key.lower() == "cachetype":
            ups = [w.upper() for w in words]
            for w in ups:
                if w not in ("IDC", "DIC"):
                    raise LitmusError(f"{t.fname}:{lines[key]}: '{w}' is not a cache type "
                                      "(DIC, IDC)")
            cache = frozenset(ups)
    return variants, cache


# ----------------------------------------------------------------------- printing


def _init_value(v: Value) -> str:
    return str(v)  # CodeLabel prints P1:L0, valid in the init block


def _ty_prefix(ty: str | None) -> str:
    if ty is None:
        return ""
    return ty if ty.endswith("*") else f"{ty} "


def format_init(init: Init) -> list[str]:
    out: list[str] = []
    done: set[Reg | str] = set()
    for reg, v in init.registers.items():
        out.append(f"{_ty_prefix(init.types.get(reg))}{reg}={_init_value(v)};")
        done.add(reg)
    for name, v in list(init.memory.items()) + list(init.ptes.items()):
        ty = init.types.get(name)
        if ty is not None and ty.endswith("]"):
            base, _, size = ty[:-1].partition("[")
            out.append(f"{base} {name}[{size}]={_init_value(v)};")
        else:
            out.append(f"{_ty_prefix(ty)}{name}={_init_value(v)};")
        done.add(name)
    for key, ty in init.types.items():
        if key in done:
            continue
        if isinstance(key, str) and ty.endswith("]"):
            base, _, size = ty[:-1].partition("[")
            out.append(f"{base} {key}[{size}];")
        else:
            out.append(f"{_ty_prefix(ty)}{key};")
    return out


def format_test(test: LitmusTest) -> str:
    """herd7 text of ``test`` (``parse_litmus(format_test(t)) == t``)."""
    lines = [f"AArch64 {test.name}" + (f" ({test.texname})" if test.texname else "")]
    if test.doc is not None:
        lines.append(f'"{test.doc}"')
    lines.extend(f"{k}={v}" for k, v in test.info.items())
    lines.append("{")
    lines.extend(" " + item for item in format_init(test.init))
    lines.append("}")
    heads = [t.name + (":" + ",".join(t.annotations) if t.annotations else "")
             for t in test.threads]
    nrows = max(1, max(len(t.lines) for t in test.threads))  # herd wants one row
    cols = [[str(ln) for ln in t.lines] + [""] * (nrows - len(t.lines)) for t in test.threads]
    widths = [max([len(h)] + [len(c) for c in col]) for h, col in zip(heads, cols, strict=True)]
    lines.append(" " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " ;")
    for r in range(nrows):
        lines.append(" " + " | ".join(col[r].ljust(w) for col, w in zip(cols, widths, strict=True)) + " ;")
    if test.locations_clause:
        lines.append("locations [" + " ".join(
            f"{_loc_item(i)};" for i in test.locations_clause) + "]")
    if test.filter is not None:
        lines.append(f"filter {test.filter}")
    lines.append(str(test.condition))
    return "\n".join(lines) + "\n"


def _loc_item(i: Reg | Mem | FaultAtom) -> str:
    if isinstance(i, Mem):
        return i.name
    return str(i)


__all__ = ["MAX_TEXT", "format_init", "format_test", "parse_file", "parse_litmus"]
