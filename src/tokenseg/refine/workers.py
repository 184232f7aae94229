"""Worker processes for per-image work that exit with their parent (no orphans after ``kill -9``)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_watchdog(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:  # re-parented: the parent is gone
            os._exit(1)


def watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Make this (worker) process exit when ``parent_pid`` dies, even by ``kill -9``: on Linux the
    kernel sends SIGTERM (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread checks every
    ``interval`` seconds whether the process was re-parented."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still ends the process
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_parent_watchdog, args=(parent_pid, interval), daemon=True,
                     name="tokenseg-parent-watchdog").start()


def _worker_init(parent_pid: int | None = None) -> None:
    torch.set_num_threads(1)
    if parent_pid is not None:
        watch_parent(parent_pid)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers run single-threaded torch and exit when this process dies
    (no orphans left under PID 1 after a ``kill -9``). The pool must be used from the thread that
    creates it (PR_SET_PDEATHSIG follows the thread that forked the worker)."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
