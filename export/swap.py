"""Putting a finished model dir in place of an old one, so that OUT always exists.

A server (or a pod restarting) may read OUT at any moment, and an export may be killed at any
moment. Where the kernel can exchange two directories in one step (Linux renameat2 with
RENAME_EXCHANGE, on ext4, xfs, btrfs, tmpfs and overlayfs), OUT is the old dir or the new one
at every instant. Elsewhere it takes two renames, and an export killed between them leaves the
old dir at `.NAME.previous`: the next export to OUT moves it back before anything else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

from sidecar.models.manifest import previous_dir

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl before 1.2.5
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    # A filesystem without it, or a seccomp profile that answers unknown calls with EPERM.
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def remove(path: Path) -> None:
    """Remove a dir, or a link or file in its place (a link's target is left alone)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def install(staging: Path, out: Path) -> None:
    """Move the finished `staging` dir to `out`, replacing whatever was there (OUT may be a
    link, `models/current -> v3`: the link is replaced, v3 is kept)."""
    if not present(out):
        staging.rename(out)
        return
    if _exchange(staging, out):
        remove(staging)  # now the old dir (or link)
        return
    previous = previous_dir(out)
    remove(previous)
    try:
        out.rename(previous)
        staging.rename(out)
    except BaseException:  # Ctrl-C or a failed rename: the old dir goes back at once
        if present(previous) and not present(out):
            previous.rename(out)
        raise
    remove(previous)


def present(path: Path) -> bool:
    """Something is at `path`: a dir, a file, or a link (even a dangling one)."""
    return path.exists() or path.is_symlink()


def recover(out: Path) -> str:
    """Put back the old dir an export killed between its two renames left aside.

    Returns what was done ("" when nothing was stranded) for the progress log.
    """
    previous = previous_dir(out)
    if not present(previous):
        return ""
    if present(out):  # the new dir made it into place: the old one is only leftover
        remove(previous)
        return f"removed {previous}, left by an interrupted export"
    previous.rename(out)
    return f"moved {previous} back to {out}: an earlier export was interrupted while replacing it"
