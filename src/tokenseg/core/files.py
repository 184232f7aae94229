"""Atomic writes and output paths.

Every file tokenseg writes goes through :func:`atomic_write` (temp file in the same folder, then
``os.replace``) so that a killed job never leaves a half-written output behind, and a resumed job can
trust that any file that exists is complete. Paths a command writes are confined to its folder.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import secrets
import threading
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator


from .errors import TokensegError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``); elsewhere
    set-and-restore under a lock (``os.umask`` has no read-only form before Python 3.13)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


TEMP_PREFIX = ".tokenseg-"
# our temp names, and the older .NAME.XXXXXXXX.tmp form
_TEMP_RE = re.compile(r"^\.tokenseg-[0-9a-f]{8}\.tmp$|^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _temp_path(folder: Path) -> tuple[int, str]:
    """A new temp file in ``folder`` with a short fixed-length name (``.tokenseg-XXXXXXXX.tmp``): a name
    derived from the target's would overflow ``NAME_MAX`` for a legal 250-byte file name."""
    while True:
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600), tmp
        except FileExistsError:
            continue


def disk_full_error(exc: OSError, path: str | os.PathLike, what: str = "") -> TokensegError | None:
    """A one-line error for a full disk (or quota) while writing ``path``, or None for other errors."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    p = Path(path)
    return TokensegError(f"no space left on the device of {display_name(p.parent)} while writing "
                         f"{what or 'file'} {display_name(p.name)} (files finished before are kept: free space and "
                         f"re-run the same command to continue)")


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temp files a killed tokenseg write left in ``folder`` (only names of the form
    :func:`atomic_write` makes, only in that folder, not below it); call it while holding the folder's
    :func:`output_lock`, so that no live writer's temp file is taken. Returns the number removed."""
    n = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if e.name.endswith(".tmp") and _TEMP_RE.match(e.name) and (e.is_symlink() or e.is_file(follow_symlinks=False)):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                n += 1
    return n


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str = "") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success rename it over ``path``, on error delete it.

    The file gets the mode a plain ``open`` would give it (``0o666 & ~umask``). A full disk becomes a
    :class:`TokensegError` naming the folder and ``what`` was being written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_path(path.parent)
    except OSError as exc:
        raise disk_full_error(exc, path, what) or exc
    try:
        with os.fdopen(fd, mode) as f:
            with contextlib.suppress(OSError):  # file systems without modes (FAT, some CIFS) refuse
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and (full := disk_full_error(exc, path, what)) is not None:
            raise full from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str = "") -> None:
    with atomic_write(path, "wb", what) as f:
        f.write(data)


def open_in_place(path: str | os.PathLike, flags: int, what: str = "file") -> int:
    """``os.open`` of a file tokenseg writes in place (a lock, an appended log) without following a
    symbolic link: a link planted at that name would redirect the write to any file the user can write."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~current_umask())
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):  # EMLINK: the BSDs
            raise TokensegError(f"{display_name(path)}: the {what} is a symbolic link; tokenseg does not write "
                                f"through links: remove it") from None
        raise disk_full_error(exc, path, what) or exc


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to a training log (a log grows line by line; a torn last line is dropped by
    the readers, and a resumed run truncates the log to its step first). Never through a symlink."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = open_in_place(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log")
    try:
        os.write(fd, data)
    except OSError as exc:
        raise disk_full_error(exc, path, "log") or exc
    finally:
        os.close(fd)


def keep_log_until(path: str | os.PathLike, step: int) -> None:
    """Drop the log lines after ``step`` (a resumed run logs those steps again) and lines cut by a kill,
    so that a log reads as one run."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text; file names that are not valid UTF-8 (lone surrogates from ``os.listdir``) are
    written back as their original bytes (``surrogateescape``) instead of raising."""
    write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON, non-ASCII kept readable. A file name that is not valid UTF-8 holds lone surrogates; they
    are written as ``\\udcXX`` escapes (``backslashreplace`` inside a JSON string is exactly the JSON
    escape), so the file stays valid UTF-8 and ``json.load`` gives the same string back."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


def display_name(name: str | os.PathLike) -> str:
    """A path or id for messages and reports: bytes that are not valid UTF-8 shown as ``\\xNN``
    (printing the raw surrogates to a UTF-8 terminal raises ``UnicodeEncodeError``)."""
    s = os.fspath(name)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def relative_name_problem(name: str | os.PathLike) -> str:
    """Why ``name`` (an image id, a relative file name) could leave the folder it is joined to, or "".

    Absolute paths (POSIX or Windows), ``..`` components (``\\`` counted as a separator too), NUL
    bytes and empty names are refused; ``.`` components and doubled slashes are harmless."""
    s = os.fspath(name)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if "/" not in s and "\\" not in s and ":" not in s and "\x00" not in s and s.strip(". "):
        return ""  # a plain file name: the common case, checked in a few string operations
    if not s.strip():
        return "is empty"
    if "\x00" in s:
        return "contains a NUL character"
    t = s.replace("\\", "/")
    if t.startswith("/") or (":" in s and PureWindowsPath(s).is_absolute()):
        return "is an absolute path"
    parts = t.split("/")
    if ".." in parts:
        return "has a '..' component"
    if all(p in ("", ".") for p in parts):
        return "names no file"
    return ""


@functools.lru_cache(maxsize=4096)
def _realpath(path: str) -> str:
    # cached: seed_path runs for every image x kind when a resumed run checks what is done, and a
    # realpath costs ~0.25 ms; ids share a few parent folders
    return os.path.realpath(path)


def safe_output_path(folder: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``folder / relative``, refusing a ``relative`` that is absolute, has ``..`` components or
    leaves ``folder`` through a symlinked sub-folder (image ids come from users' label files: an id
    such as ``../../x`` or ``/data/ds/masks/a`` must not make a command write outside its output
    folder). A symlink at the file name itself is harmless: atomic writes replace it."""
    rel = os.fspath(relative)
    problem = relative_name_problem(rel)
    if problem:
        raise TokensegError(f"output name {display_name(rel)!r} {problem}: refusing to write outside "
                            f"{display_name(folder)}")
    out = Path(folder, rel)
    if "/" in rel or "\\" in rel:
        base = _realpath(os.path.abspath(folder))
        parent = _realpath(os.path.abspath(out.parent))
        if parent != base and not parent.startswith(base.rstrip(os.sep) + os.sep):
            raise TokensegError(f"output name {display_name(rel)!r} resolves to {display_name(parent)}, "
                                f"outside {display_name(folder)} (through a symlink): refusing to write there")
    return out



class BackgroundWriter:
    """Runs writes (``submit(fn, *args)``) on one background thread, so a device does not wait on the disk
    (seed files). One thread and a FIFO queue: writes happen in the order they were submitted, each file
    atomically as its writer does, so an interrupted run resumes as before. At most ``depth`` writes wait;
    an error of the thread is raised in the caller at the next :meth:`submit` or on leaving the block, and
    no later write runs."""

    def __init__(self, depth: int = 2) -> None:
        import queue

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenseg-seed-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()


