"""Ctrl-C and other processes: how a command holds an interrupt back, how it gets one that Python dropped, and
how it tells a live process of this host from one a SIGKILL ended (for the locks and temporary files such a
process leaves behind). The one place for each of these; the converter, export, demo and the runners use it."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

HOST = socket.gethostname()


def alive(pid: Any) -> bool:
    """Whether `pid` is a process of this host that exists."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # not a pid (kill(0 or -1) would address a whole process group)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it.

    Why: an interrupt stops only the main thread, so orbax's writer threads go on and recreate folders in a
    directory the cleanup has just removed; and an import of jaxlib's extension modules that is interrupted
    half-way crashes the process (SIGSEGV) instead of raising. Outside the main thread (where signals cannot
    be caught) the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def redelivered() -> Iterator[None]:
    """While a command runs: a Ctrl-C that lands in code Python runs from C (JAX's garbage-collection callback,
    a finalizer) is printed as "Exception ignored" and lost there, and the command would go on to the end.
    Deliver it again, silently, once that callback is over (10 ms later: delivered at once, it would land in
    the same callback)."""
    timers: list[threading.Timer] = []
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
            return
        timers.append(threading.Timer(0.01, _thread.interrupt_main))
        timers[-1].start()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for timer in timers:  # the command is over: an interrupt still on its way has nothing left to stop
            timer.cancel()
