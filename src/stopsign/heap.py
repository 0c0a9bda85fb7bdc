"""The garbage collector and the long-lived heap that imports leave behind.

torch and the other imports leave about a million long-lived objects; one full collection scans them all
(0.19 s of a warm `train` on the development machine), and the interpreter's last collections at exit took
0.9 s of every command. Frozen, they are skipped, and stay shared copy-on-write with processes that fork
(decode workers, the chart process).
"""

from __future__ import annotations

import atexit
import gc
from contextlib import contextmanager


@contextmanager
def settled_heap():
    """Keep the collector off the objects that existed before the call, until it returns (also a decorator).

    Unfrozen afterwards, so anything among them that becomes garbage later is still collected. A caller that
    froze the heap itself keeps its own arrangement.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def freeze_at_exit() -> None:
    """Skip the interpreter's last collections: they free memory the ending process gives back anyway.
    atexit handlers, flushing and closing still happen (freezing stops no other handler, whatever the order)."""
    atexit.register(gc.freeze)
