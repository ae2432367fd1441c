"""Atomic writes and output locks: every artifact is written to a temporary name
beside its destination and renamed into place, so an interrupted run never
leaves a half-written file or folder behind; a folder being replaced is locked,
so two runs never write (or clean up) the same output at once; a write that
runs out of disk space says so and leaves the previous output intact."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mae_ops.errors import BusyError, DiskFullError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_held: dict[str, int] = {}  # lock files this process holds, with their nesting depth
_held_guard = threading.Lock()


# ------------------------------------------------------------------ disk full
def free_bytes(path: str | Path) -> int:
    """Bytes this process may still write on the file system holding ``path``."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize


def is_disk_full(exc: BaseException, where: str | Path) -> bool:
    """Whether ``exc`` came from a full disk: ENOSPC/EDQUOT anywhere in its chain,
    or (numpy and torch report short writes without an errno) under 1 MiB left."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(where) < (1 << 20)
    except OSError:
        return False


def _raise_if_disk_full(exc: BaseException, dest: Path) -> None:
    """Turn a write error from a full disk into one DiskFullError naming ``dest``."""
    if isinstance(exc, DiskFullError) or is_disk_full(exc, dest):
        kept = "the previous version is intact" if dest.exists() else "nothing was written"
        raise DiskFullError(
            f"disk full while writing {dest} ({free_bytes(dest) / 2**20:.1f} MiB free on its file system): "
            f"{kept}; free some space and run again"
        ) from exc


# ---------------------------------------------------------------------- locks
@contextlib.contextmanager
def file_lock(path: str | Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock: released by the kernel if the holder
    dies). A second process waits up to ``wait_s`` and then gets a BusyError
    naming the holder. Re-entrant within one process."""
    path = Path(path).resolve()
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise BusyError(f"{what} is in use by {holder} (lock {path}); wait for it to finish") from None
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``dest`` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
        os.replace(tmp_path, dest)
    except (OSError, RuntimeError) as exc:
        _raise_if_disk_full(exc, dest)  # checked before the partial file is removed
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_with(dest: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``dest`` with a writer that takes a path (torch.save, savefig, ...)."""
    with atomic_path(dest) as tmp:
        writer(tmp)


# -------------------------------------------------------------------- folders
def _recover(dest: Path) -> None:
    """Under the folder's lock: leftovers of a crashed run. A ``.old-*`` copy with no
    ``dest`` is the previous output caught between the two renames: put it back."""
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not dest.exists():
        os.replace(olds.pop(), dest)
        log.warning("restored %s from an interrupted replacement", dest)
    for stale in [*olds, *dest.parent.glob(f".{dest.name}.new-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, what: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces folder ``dest``.

    The folder is locked (``.<name>.lock`` beside it) while it is being made, so a
    second writer gets a BusyError instead of deleting the first one's work.
    Directories cannot be swapped in one rename, so the old folder is moved
    aside first; a crash between the two renames leaves ``.<name>.old-*``, which
    the next run puts back (or removes once ``dest`` exists again).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / f".{dest.name}.lock", what or str(dest)):
        _recover(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_UMASK)
            old = None
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.rmdir(old)
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as exc:
            _raise_if_disk_full(exc, dest)
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
