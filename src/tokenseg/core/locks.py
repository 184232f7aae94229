"""One writer per output folder: :func:`output_lock` (flock, with a pid-file fallback) and :func:`job_lock`."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator


from .errors import TokensegError
from .files import disk_full_error, display_name, open_in_place, remove_stale_temps

LOCK_NAME = ".tokenseg.lock"
_HELD_LOCKS: dict[str, dict] = {}
_HELD_GUARD = threading.Lock()


def _lock_holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _busy_error(folder: Path, holder: dict) -> TokensegError:
    pid = holder.get("pid", "?")
    cmd = holder.get("command") or "?"
    since = f", since {holder['started']}" if holder.get("started") else ""
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    gone = ""
    if isinstance(pid, int) and not where and not pid_alive(pid):
        gone = (f"; PID {pid} has ended but a process it started (a worker?) still holds the lock: "
                f"end that process")
    return TokensegError(
        f"{display_name(folder)} is being written by another tokenseg process (PID {pid}{where}: "
        f"{cmd}{since}){gone}; wait for it to finish, or write to another folder")


def _lock_info(command: str) -> bytes:
    info = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [display_name(a) for a in sys.argv]}
    return (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def _read_fd(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _acquire_flock(path: Path, folder: Path, command: str, stale: dict) -> int | None:
    """Take ``fcntl.flock`` on ``path``; the fd, or None where the file system has no flock. A holder
    recorded in a file whose lock we got has ended without cleaning up: it goes into ``stale``."""
    import fcntl

    while True:
        fd = open_in_place(path, os.O_RDWR | os.O_CREAT, "output lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy_error(folder, _lock_holder(path)) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # the holder before us may have unlinked the file between our open and our flock: then we
        # locked an orphan inode, and must lock the file that is there now
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            stale.update(_read_fd(fd))
            try:
                os.ftruncate(fd, 0)
                os.write(fd, _lock_info(command))
            except OSError as exc:
                os.close(fd)
                raise disk_full_error(exc, path, "output lock") or exc
            return fd
        os.close(fd)


def _acquire_pidfile(path: Path, folder: Path, command: str, stale: dict) -> None:
    """Fallback without flock (some network file systems): an O_EXCL file; a holder that is no
    longer running on this host is taken over."""
    for _ in range(100):
        try:
            fd = open_in_place(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "output lock")
        except FileExistsError:
            holder = _lock_holder(path)
            pid = holder.get("pid")
            if holder and holder.get("host") == socket.gethostname() and isinstance(pid, int) \
                    and not pid_alive(pid):
                stale.update(holder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process has died
                continue
            if not holder:
                time.sleep(0.05)  # being written right now
                holder = _lock_holder(path)
                if not holder:
                    continue
            raise _busy_error(folder, holder) from None
        try:
            os.write(fd, _lock_info(command))
        except OSError as exc:
            raise disk_full_error(exc, path, "output lock") or exc
        finally:
            os.close(fd)
        return
    raise TokensegError(f"{display_name(path)}: cannot take the output lock")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder while writing it: a second process writing the same
    folder stops with a :class:`TokensegError` naming the holder's PID and command.

    ``fcntl.flock`` on ``<folder>/.tokenseg.lock`` (the file holds the holder's PID, command, host and
    start time). The kernel drops the lock when its process dies, so a lock left by a killed run is
    taken over; the folder is created if needed. Re-entrant within a process (``demo`` runs train,
    maps, ... in one process). Workers forked while the lock is held share it; they must not take it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    path = folder / LOCK_NAME
    with _HELD_GUARD:
        held = _HELD_LOCKS.get(key)
        if held is not None and held["pid"] == os.getpid():
            held["depth"] += 1
        else:
            held = None
    if held is not None:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                held["depth"] -= 1
        return
    stale: dict = {}
    fd = _acquire_flock(path, folder, command, stale)
    entry = {"pid": os.getpid(), "depth": 1, "fd": fd}
    if fd is None:
        _acquire_pidfile(path, folder, command, stale)
    if stale.get("pid") not in (None, os.getpid()):
        print(f"note: took over the lock of {display_name(folder)} left by PID {stale['pid']} "
              f"({stale.get('command') or '?'}, since {stale.get('started') or '?'}), which has ended",
              file=sys.stderr)
    removed = remove_stale_temps(folder)
    if removed:
        print(f"note: removed {removed} temp file(s) left in {display_name(folder)} by an interrupted run",
              file=sys.stderr)
    with _HELD_GUARD:
        _HELD_LOCKS[key] = entry
    try:
        yield path
    finally:
        if os.getpid() == entry["pid"]:  # a forked child unwinding must not release its parent's lock
            with _HELD_GUARD:
                _HELD_LOCKS.pop(key, None)
            with contextlib.suppress(OSError):
                if fd is None or os.fstat(fd).st_ino == os.stat(path).st_ino:
                    os.unlink(path)
            if fd is not None:
                os.close(fd)


@contextlib.contextmanager
def job_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """:func:`output_lock` for one job: taken by the main process of a ``torchrun`` job (``RANK`` 0, or
    no torchrun); the other ranks write their shares under it. ``what`` names the stage in the holder's
    message, with the command line that runs it."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield Path(folder) / LOCK_NAME
        return
    command = f"{what} ({' '.join(sys.argv)})" if sys.argv and sys.argv[0] else what
    with output_lock(folder, command) as path:
        yield path


