"""Opening and appending to the files profilers read, with execmem's errors."""

from __future__ import annotations

import errno
import os
import stat

from execmem.native import _libc


def open_owned(path: str, flags: int, mode: int = 0o644) -> int:
    """``open(path, flags | O_NOFOLLOW | O_CLOEXEC)``, refusing anything but a regular
    file of this user: these files live in shared directories such as ``/tmp``, where
    someone else could have planted a link or a file of theirs under the name."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise _libc.error("open", exc.errno or 0, path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise _libc.error("open", errno.EPERM, f"{path}: not a regular file of this user")
    return fd


def write_all(fd: int, data: bytes, path: str) -> None:
    """Write all of ``data`` (a regular file writes less only when it fails next)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _libc.error("write", exc.errno or 0, path) from None


__all__ = ["open_owned", "write_all"]
