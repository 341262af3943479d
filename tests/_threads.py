"""A second thread for tests that need ``remote_cse`` to really synchronize other threads
(in a single-threaded process it is rightly skipped)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def second_thread() -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()
