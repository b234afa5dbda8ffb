"""Input paths that are safe to open: regular files (and, where a format is a folder, folders).

A path handed to a reader is checked with ``stat`` before anything opens it, because opening is where
hostile inputs do their harm: opening a named pipe (FIFO) for reading waits for a writer forever, a
character device such as ``/dev/zero`` or ``/dev/urandom`` streams without end, a socket cannot be
read as a file, and a symbolic link loop or a dangling link only says "does not exist" or raises
deep inside a reader. :func:`check_input_path` turns each of these into one line naming the path and
what it is, as the caller's own error type (a slide gives a :class:`~pfmseg_engine.errors.SlideError`,
a checkpoint a :class:`~pfmseg_engine.errors.CheckpointError`, ...), so the CLI prints it alone and a
cohort records it as that slide's failure while the other slides go on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import DataError, PfmsegError

#: What each kind of non-regular file is called in messages, by its ``stat`` test.
_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_path_problem(path: str | Path, folders: bool = False) -> str | None:
    """Why ``path`` is not an input a reader may open (a phrase such as "is a named pipe ..."), or None.

    Only ``stat``/``lstat`` are called: nothing is opened. A regular file passes; a folder passes when
    ``folders`` (zarr stores and DICOM series are folders).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _stat_failure(Path(path), exc)
    if stat.S_ISREG(mode) or (folders and stat.S_ISDIR(mode)):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file: give the file inside it"
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return (f"is {kind}, not a regular file (reading it may block forever or never end): save the data to a "
            "regular file and give that")


def _stat_failure(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is (or passes through) a symbolic link loop: fix or remove the link"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"is a symbolic link to '{target}', which does not exist: fix the link or restore its target"
        return "does not exist"
    return f"cannot be examined ({exc.strerror or exc})"


def check_input_path(path: str | Path, what: str, *, folders: bool = False,
                     error: type[PfmsegError] = DataError, hint: str = "") -> Path:
    """``path`` (``~`` expanded) when a reader may open it; else ``error`` with one line naming it.

    ``what`` starts the message ("Slide", "Checkpoint", "Config file", ...); ``hint`` is added to
    the "does not exist" message (what kind of file is expected). Call it where an input is first
    opened by path, before any reader touches it.
    """
    path = Path(path).expanduser()
    problem = describe_path_problem(path, folders=folders)
    if problem is None:
        return path
    if problem == "does not exist" and hint:
        problem += f"; {hint}"
    raise error(f"{what} '{path}' {problem}.")


__all__ = ["check_input_path", "describe_path_problem"]


def cache_dir() -> Path:
    """Where pfmseg keeps what it can rebuild (sample data, feature stores): ``$PFMSEG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/pfmseg``, else ``~/.cache/pfmseg``."""
    if os.environ.get("PFMSEG_CACHE_DIR"):
        return Path(os.environ["PFMSEG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pfmseg"
