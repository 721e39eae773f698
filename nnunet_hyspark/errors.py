"""User-facing errors and the wrapper that turns them into one-line messages.

Every command-line entry point is wrapped by :func:`cli_entry`: a
:class:`HySparKError` (or a known input problem) prints ``error: <what> -> <what to do>``
on stderr and exits with status 2 instead of a traceback. Unexpected exceptions
still show their traceback, because those are bugs we want reported.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable, Iterable


class HySparKError(Exception):
    """An error caused by the user's input or environment, with a hint how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # one line: message, then what to do
        msg = super().__str__()
        return f"{msg} -> {self.hint}" if self.hint else msg


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorate a console-script ``main`` so user errors end in one line, exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except HySparKError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except OSError as e:  # permissions and full disks are the user's to fix, not bugs
            message = os_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


#: errno -> what to do, for the file-system errors a user causes and can fix
_OS_ERROR_HINTS = {
    errno.EACCES: "check the permissions of that path, or choose another output folder",
    errno.EPERM: "check the permissions of that path, or choose another output folder",
    errno.ENOSPC: "free disk space (or choose a folder on another disk) and run the command again",
    errno.EDQUOT: "your disk quota is used up: free space and run the command again",
    errno.EROFS: "the file system is read-only: choose another output folder",
}


def os_error_message(e: OSError) -> str | None:
    """One line ``<what failed> -> <what to do>`` for permission / disk errors, else None."""
    hint = _OS_ERROR_HINTS.get(e.errno)
    if hint is None:
        return None
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where} -> {hint}"


NNUNET_ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_nnunet_env(names: Iterable[str] = NNUNET_ENV_VARS) -> dict[str, str]:
    """Return the nnU-Net folders, or raise a HySparKError naming every missing variable."""
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise HySparKError(
            f"nnU-Net environment variable(s) not set: {', '.join(missing)}",
            "export them, e.g. `export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed "
            "nnUNet_results=/data/nnUNet_results` (see nnU-Net's documentation on setting paths)",
        )
    return {n: os.environ[n] for n in names}
