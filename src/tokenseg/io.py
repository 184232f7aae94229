"""File formats and atomic writes.

Every file tokenseg writes goes through :func:`atomic_write` (temp file in the same folder, then
``os.replace``) so that a killed job never leaves a half-written output behind, and a resumed job can
trust that any file that exists is complete.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import pickle
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


class TokensegError(Exception):
    """An error caused by the user's input (file, config, checkpoint); the message says what to fix."""


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


# --------------------------------------------------------------------------------------------
# Output paths: confined to their folder, never inside a dataset, one writer per folder
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# VOC palette PNGs
# --------------------------------------------------------------------------------------------

def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class index), as an (n, 3) uint8 array."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def save_palette_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an (H, W) integer mask as a VOC palette PNG (255 = ignore, drawn in VOC's cream colour)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"{path}: a mask must be 2-D with values in 0..255")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    pal = voc_palette()
    pal[255] = (224, 224, 192)
    img.putpalette(pal.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue(), "mask")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label mask: palette PNG indices, or a plain 8-bit single-channel PNG, as (H, W) uint8."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                arr = np.asarray(img)
            elif img.mode in ("I", "I;16", "I;16B"):
                arr = np.asarray(img).astype(np.int64)
                if arr.max(initial=0) > 255:
                    raise TokensegError(f"{path}: mask values exceed 255 (max {arr.max()})")
            else:
                raise TokensegError(
                    f"{path}: a mask must be a palette ('P') or single-channel image, got mode {img.mode!r}")
    except TokensegError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise TokensegError(f"{path}: cannot read mask ({exc})") from exc
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Seed (map) files
# --------------------------------------------------------------------------------------------

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


@dataclass
class SeedMaps:
    """Per-image localisation maps: one map per present foreground class.

    ``classes`` holds 0-based foreground class indices (class ``c`` is label ``c + 1`` in a mask,
    0 being background); ``maps`` is (len(classes), H, W), normalised to [0, 1] (min–max or max-norm,
    as the method says). ``background`` is an explicit (H, W) background score for methods that make
    one (CTI, POT); None for methods whose background is a constant or ``(1 - max)^alpha``.
    """

    classes: np.ndarray
    maps: np.ndarray
    meta: dict = field(default_factory=dict)
    background: np.ndarray | None = None

    def dense(self, num_classes: int) -> np.ndarray:
        """(num_classes, H, W) float32 with zeros for absent classes."""
        out = np.zeros((num_classes,) + self.maps.shape[1:], dtype=np.float32)
        if len(self.classes):
            out[self.classes] = self.maps.astype(np.float32)
        return out


SEED_DTYPES = {"float16": np.float16, "float32": np.float32}


def save_seed(path: str | os.PathLike, seed: SeedMaps, dtype: str = "float32") -> None:
    """Write one image's maps as ``.npz`` (class ids int16, maps ``dtype``, optional background, meta
    JSON), atomically. float32 keeps the maps as computed; float16 halves the disk and moves a seed mIoU
    curve by ~0.02 points."""
    if dtype not in SEED_DTYPES:
        raise TokensegError(f"seed dtype must be one of {sorted(SEED_DTYPES)}, got {dtype!r}")
    arrays = dict(classes=np.asarray(seed.classes, dtype=np.int16),
                  maps=np.asarray(seed.maps, dtype=SEED_DTYPES[dtype]),
                  meta=np.array(json.dumps(seed.meta)))
    if seed.background is not None:
        arrays["background"] = np.asarray(seed.background, dtype=SEED_DTYPES[dtype])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue(), "seed maps")


_NPY_DICT_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                     for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _SeedUnpickler(pickle.Unpickler):
    """Unpickles only what ``np.save(dict_of_arrays)`` writes: numpy arrays, dtypes and scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NPY_DICT_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a seed file")


def _load_npy_dict(path: Path, allow_pickle: bool) -> dict:
    """The authors' seed file: a pickled 0-d object array holding a dict. Without ``allow_pickle``
    a restricted unpickler refuses anything but numpy arrays/scalars (no code can run)."""
    if allow_pickle:
        return np.load(path, allow_pickle=True).item()
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError("a plain array, not the authors' {class_index: map} dict")
        try:
            obj = _SeedUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{exc}; if you trust the file, load it with allow_pickle=True "
                             f"(--allow-pickle): unpickling can run code") from exc
    d = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(d, dict):
        raise ValueError(f"expected a {{class_index: map}} dict, found {type(d).__name__}")
    return d


def load_seed(path: str | os.PathLike, allow_pickle: bool = False) -> SeedMaps:
    """Read a seed file: our ``.npz``, the MCTformer authors' ``.npy`` dict ({class_index: H×W float}) or
    CLIP-ES's ``.npy`` dict ({"keys": class indices, "attn_highres": maps}).

    The ``.npy`` dict is a pickle: by default only numpy arrays and scalars are unpickled from it;
    ``allow_pickle=True`` unpickles anything (trusted files only)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            d = _load_npy_dict(path, allow_pickle)
            if "keys" in d and "attn_highres" in d:  # CLIP-ES's layout: {keys, attn_highres[, highres]}
                keys = np.asarray(d["keys"], np.int64).reshape(-1)
                maps = np.asarray(d["attn_highres"], np.float32)
                return SeedMaps(keys, maps.reshape((len(keys),) + maps.shape[-2:]), {"format": "clip-es-npy"})
            keys = sorted(int(k) for k in d)
            if not keys:
                return SeedMaps(np.zeros(0, np.int64), np.zeros((0, 1, 1), np.float32), {})
            maps = np.stack([np.asarray(d[k], dtype=np.float32) for k in keys])
            return SeedMaps(np.asarray(keys, np.int64), maps, {"format": "authors-npy"})
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            bg = z["background"] if "background" in z else None
            return SeedMaps(z["classes"].astype(np.int64), z["maps"], meta, bg)
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read seed file ({exc})") from exc


def seed_path(folder: str | os.PathLike, image_id: str) -> Path:
    """``<folder>/<image_id>.npz``, confined to ``folder`` (see :func:`safe_output_path`)."""
    return safe_output_path(folder, f"{image_id}.npz")
