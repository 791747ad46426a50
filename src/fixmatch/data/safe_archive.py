"""Reading untrusted tar archives member by member: no path that could land outside the data folder.

The loaders read the members they expect into memory (or write them under their own names). A member
named by an absolute path, a drive letter or with ``..`` (a "tar slip" aims such names at files outside the
destination) is skipped, never read or extracted; so are links and devices: only regular files are read.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

__all__ = ["is_safe_member_name", "safe_tar_files"]

_DRIVE = re.compile(r"^[A-Za-z]:")  # C:foo and C:\foo are absolute or drive-relative on Windows


def is_safe_member_name(name: str) -> bool:
    """True if ``name``, joined to a destination folder, stays inside it on POSIX and on Windows."""
    if not name or "\x00" in name:
        return False
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        return False
    return ".." not in PurePosixPath(posix).parts


def safe_tar_files(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of ``tar`` with safe names, in archive order (one forward pass)."""
    for info in tar:
        if info.isfile() and is_safe_member_name(info.name):
            yield info
