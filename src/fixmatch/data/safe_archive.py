"""Reading untrusted tar archives member by member: no path that could land outside the data folder.

The loaders never extract archives to disk; they read the members they expect into memory. An archive
that names a member by an absolute path or with ``..`` is not what the data set's authors published (a
"tar slip" attack aims such names at files outside the destination), so it is refused as a whole.
Links and devices are skipped: only regular files are read.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from .download import DatasetError

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


def safe_tar_files(tar: tarfile.TarFile, source: str | Path) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of ``tar``, read in order; ``DatasetError`` at the first unsafe name."""
    for info in tar:
        if not is_safe_member_name(info.name):
            raise DatasetError(f"{source} holds a member with an unsafe path {info.name!r} (absolute or with '..'); "
                               f"it is not the published archive: delete it and download it again")
        if info.isfile():
            yield info
