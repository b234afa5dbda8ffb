"""Writing outputs safely: one clear message for every file-system fault, and one writer per output.

Long jobs write checkpoints, OME-Zarr stores, spills, exports and histories. When the disk fills up,
a folder is read-only or an output path is taken by a file, the user needs one sentence naming the
path and what to do, not a traceback; and the work already done must stay usable (every writer in
the engine writes atomically or records completion, so a rerun resumes). :func:`writing` turns an
``OSError`` raised inside it into a :class:`~pfmseg_engine.errors.StorageError` with that sentence;
:func:`describe_os_error` is the same sentence for errors caught elsewhere (the CLI's last resort).

:class:`OutputLock` makes sure that two processes (a double-click, a cluster retry while the first
attempt still runs) never write the same output: the second one waits or stops with "being written
by PID N on HOST since T". It is an OS-level lock (``filelock``, ``flock`` on POSIX): the kernel
releases it when its holder dies, so a killed run never leaves a stale lock behind; the owner note
beside it is information only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import StorageError

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there (or write to another disk) and run the same command again; "
                  "finished work is kept and resumes",
    errno.EDQUOT: "the disk quota is exhausted: free space there (or write elsewhere) and run the same command "
                  "again; finished work is kept and resumes",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EEXIST: "a file is in the way where a folder is needed: choose another output folder or move that file",
    errno.ENOTDIR: "a file is in the way where a folder is needed: choose another output folder or move that file",
    errno.EISDIR: "a folder is in the way where a file is needed: choose another name",
    errno.ENOENT: "it does not exist (any more): check that the path is right and its disk is mounted",
    errno.ESTALE: "the network file system lost it: check that its disk is mounted, then run again to resume",
    errno.EIO: "the device reported an input/output error: check the disk or network mount, then run again",
}


def describe_os_error(exc: OSError, path: str | Path | None = None, action: str = "writing") -> str:
    """One sentence: what failed, where, and what to do (``path`` when the error does not name one)."""
    where = exc.filename if exc.filename is not None else path
    where = f" '{where}'" if where is not None else ""
    advice = _ADVICE.get(exc.errno or -1, exc.strerror or str(exc))
    code = f" [{errno.errorcode.get(exc.errno, exc.errno)}]" if exc.errno else ""
    return f"{action[:1].upper()}{action[1:]}{where} failed{code}: {advice}."


@contextmanager
def writing(path: str | Path, what: str = "output") -> Iterator[None]:
    """Run the body; an ``OSError`` inside it becomes a :class:`StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(describe_os_error(exc, path, action=f"writing {what}")) from exc


def ensure_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create folder ``path`` (and parents), or say clearly why it cannot be one."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise StorageError(f"The {what} '{path}' is a file, not a folder: choose another folder or move the file.")
    with writing(path, what):
        path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"The {what} '{path}' is not writable: choose a folder you can write to.")
    return path


class OutputBusyError(StorageError):
    """Another process is writing the same output."""


class OutputLock:
    """Exclusive right to write one output (a hidden ``.<output>.lock`` beside it, plus an owner note).

    ``wait`` is how many seconds to wait for another writer (``None``: as long as it takes; 0: stop at
    once). Use as a context manager around everything that writes the output.
    """

    def __init__(self, output: str | Path, wait: float | None = 0.0):
        self.output = Path(output)
        self.lock_path = self.output.with_name(f".{self.output.name}.lock")
        self.owner_path = self.output.with_name(f".{self.output.name}.lock.owner")
        self.wait = wait
        self._lock = None

    def owner(self) -> dict[str, Any] | None:
        """Who holds the lock, as recorded by the holder (None when unknown)."""
        try:
            return json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return None

    def busy_message(self) -> str:
        owner = self.owner() or {}
        since = owner.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "an unknown time"
        return (f"'{self.output}' is being written by PID {owner.get('pid', '?')} on {owner.get('host', '?')} "
                f"since {when}. Wait for that run to finish (it is reused then), stop it, or choose another "
                "output folder; --wait SECONDS waits for it.")

    def acquire(self) -> OutputLock:
        from filelock import FileLock, Timeout

        with writing(self.lock_path, "the output lock"):
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.lock_path), timeout=-1 if self.wait is None else self.wait)
            try:
                lock.acquire(poll_interval=0.2)
            except Timeout:
                raise OutputBusyError(self.busy_message()) from None
            self._lock = lock
            note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            tmp = self.owner_path.with_name(f"{self.owner_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(note))
            os.replace(tmp, self.owner_path)
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.owner_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


__all__ = ["OutputBusyError", "OutputLock", "describe_os_error", "ensure_output_dir", "writing"]
