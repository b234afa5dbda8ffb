"""Errors as napari notifications that say what to do, never as a traceback in the console only.

Engine errors (:class:`pfmseg_engine.PfmsegError`) already name the offending value and the fix,
so their message is shown as is. Out-of-memory errors get the usual remedies; anything else is
shown with its type and logged with its traceback for bug reports.
"""

from __future__ import annotations

import logging

log = logging.getLogger("napari_pfmseg")

OOM_FIX = ("lower the batch size or the window/input size, choose a smaller backbone or the 'frozen' strategy, "
           "or use another device (Model widget).")


class Failure:
    """An exception a worker returns instead of raising.

    napari relays exceptions raised in workers as raw traceback notifications; returning them lets
    the plugin show one notification that says what to do.
    """

    def __init__(self, exc: BaseException):
        self.exc = exc


def guarded(function):
    """Wrap a worker function so that an exception comes back as a :class:`Failure` value."""

    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            return Failure(exc)

    return run


def guarded_generator(function):
    """Like :func:`guarded` for generator workers (the exception becomes the return value)."""

    def run(*args, **kwargs):
        try:
            return (yield from function(*args, **kwargs))
        except Exception as exc:
            return Failure(exc)

    return run


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def is_expected(exc: BaseException) -> bool:
    """Errors a user can cause and fix (their message says how), as opposed to bugs."""
    try:
        from pfmseg_engine import PfmsegError
    except ImportError:  # engine broken: treat everything as unexpected
        return False
    return isinstance(exc, PfmsegError) or type(exc).__name__ == "BusyError"


def message_for(exc: BaseException, action: str) -> str:
    """The text a user sees when ``action`` (e.g. "Training") failed with ``exc``."""
    if is_out_of_memory(exc):
        return f"{action} ran out of memory: {OOM_FIX}"
    if is_expected(exc):
        return f"{action}: {exc}"
    return f"{action} failed ({type(exc).__name__}: {exc})."


def notify_error(exc: BaseException, action: str) -> str:
    """Show ``exc`` as a napari error notification; returns the message (for status labels and tests)."""
    from napari.utils.notifications import show_error

    message = message_for(exc, action)
    if is_expected(exc) or is_out_of_memory(exc):
        log.warning("%s", message)
    else:  # a bug: keep the traceback for the report
        log.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__))
    show_error(message)
    return message


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)
