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

A full disk must surface where it happens, as that sentence. Two writers hide it: a memory map over a
sparse file takes its disk blocks only when a page is first written, and on a full disk the kernel then
kills the process with ``SIGBUS`` (no handler, no message), so :func:`reserve` allocates a file's blocks
up front; and ``torch.save`` wraps the failed write in ``RuntimeError: [enforce fail at
inline_container.cc...]``, which :func:`storage_fault` recognises by the ``OSError`` in its chain.
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
from typing import TYPE_CHECKING, Any

from .errors import StorageError

if TYPE_CHECKING:
    from filelock import BaseFileLock

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

#: ``errno`` values that fail every later write to the same disk the same way (full, over quota, read-only):
#: a long run stops at the first one instead of recording each remaining item as failed.
OUTPUT_WIDE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

#: What ``os.posix_fallocate`` says when the file system cannot preallocate (the zero-writing fallback then runs).
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
_ZEROS = 1 << 20  # bytes per zero-filling write

#: Words of torch's own messages for a failed write (``torch.save`` to a path reports no ``OSError``).
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


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


def os_error_in(exc: BaseException, errnos: frozenset[int] | None = None) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain (itself, then its causes and contexts), optionally only one
    whose ``errno`` is in ``errnos``; None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (errnos is None or current.errno in errnos):
            return current
        current = current.__cause__ or current.__context__
    return None


def storage_fault(exc: BaseException, path: str | Path | None = None, what: str = "output") -> StorageError | None:
    """``exc`` as the :class:`StorageError` of a disk every later write would fail on, else None.

    A :class:`StorageError` (not :class:`OutputBusyError`, which concerns one output) is itself; a full,
    over-quota or read-only disk (:data:`OUTPUT_WIDE`) anywhere in the chain, as torch's ``RuntimeError``
    carries it, becomes the one sentence of :func:`describe_os_error`. A run that writes many outputs
    stops at the first such fault instead of recording every remaining item as failed.
    """
    if isinstance(exc, StorageError):
        return None if isinstance(exc, OutputBusyError) else exc
    found = os_error_in(exc, OUTPUT_WIDE)
    if found is None:
        return None
    return StorageError(describe_os_error(found, path, action=f"writing {what}"))


def write_failure(exc: BaseException, path: str | Path, what: str) -> BaseException:
    """What to raise for ``exc`` raised while writing ``path``: a :class:`StorageError` for a failed write
    (an ``OSError`` anywhere in its chain, or torch's own words for one), else ``exc`` unchanged.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:N] .
    unexpected pos ...`` (the ``OSError`` of the file object in its context, or nothing when torch wrote
    the file itself); either way the user needs the path and what to do, not torch's internals.
    """
    if isinstance(exc, StorageError):
        return exc
    found = os_error_in(exc)
    if found is not None:
        return StorageError(describe_os_error(found, path, action=f"writing {what}"))
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, RuntimeError) and any(word in text for word in _TORCH_WRITE_FAILURES):
        return StorageError(f"Writing {what} '{path}' failed: the file could not be written completely ({text}); "
                            "check the free space and health of that disk, then run the same command again.")
    return exc


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate ``length`` bytes of open file ``fd`` from ``offset`` on the disk now (the file grows to fit).

    Memory-mapped writes into a sparse file allocate blocks page by page, and a full disk then ends the
    process with ``SIGBUS``; after this call those pages have their blocks, and a full disk was this
    call's ``OSError`` (``ENOSPC``) instead. Uses ``os.posix_fallocate``; where the platform or file
    system lacks it, writes zeros through checked ``os.write`` calls (a short write is retried, a write
    of nothing is a full disk) and syncs, so that a network file system reports a failed write here too.
    """
    if length <= 0:
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
    _write_zeros(fd, offset, length)
    os.fsync(fd)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = memoryview(bytes(min(_ZEROS, length)))
    os.lseek(fd, offset, os.SEEK_SET)
    left = length
    while left:
        written = os.write(fd, zeros[:min(left, len(zeros))])
        if written <= 0:  # a regular file takes every byte or says why; nothing written means no room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left -= written


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
        self._lock: BaseFileLock | None = None

    def owner(self) -> dict[str, Any] | None:
        """Who holds the lock, as recorded by the holder (None when unknown)."""
        try:
            return json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return None

    def holder(self) -> str:
        """Who holds the lock, for messages: "PID 123 on host since 2026-01-01 12:00:00"."""
        owner = self.owner() or {}
        since = owner.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "an unknown time"
        return f"PID {owner.get('pid', '?')} on {owner.get('host', '?')} since {when}"

    #: The settings that fix a busy output (:attr:`~pfmseg_engine.errors.PfmsegError.fix_with`).
    busy_fix: tuple[str, ...] = ("wait",)

    def busy_message(self) -> str:
        return (f"'{self.output}' is being written by {self.holder()}. Wait for that run to finish (it is reused "
                "then), stop it, or choose another output folder; a run given wait=SECONDS waits for it.")

    def acquire(self) -> OutputLock:
        from filelock import FileLock, Timeout

        with writing(self.lock_path, "the output lock"):
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.lock_path), timeout=-1 if self.wait is None else self.wait)
            try:
                lock.acquire(poll_interval=0.2)
            except Timeout:
                raise OutputBusyError(self.busy_message(), fix_with=self.busy_fix) from None
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


__all__ = ["OUTPUT_WIDE", "OutputBusyError", "OutputLock", "describe_os_error", "ensure_output_dir", "os_error_in",
           "reserve", "storage_fault", "write_failure", "writing"]
