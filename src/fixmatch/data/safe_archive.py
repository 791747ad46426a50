"""Reading untrusted tar archives member by member: no path that could land outside the data folder, and
no size that could exhaust memory or disk.

The loaders read the members they expect into memory (or write them under their own names). A member
named by an absolute path, a drive letter or with ``..`` (a "tar slip" aims such names at files outside the
destination) is skipped, never read or extracted; so are links and devices: only regular files are read.
A gzip-compressed tar can inflate to far more than it occupies, so sizes are checked from the headers
before anything is read: ``open_tar`` refuses extended headers (pax, GNU long names) that tarfile would
read whole into memory once they exceed ``MAX_HEADER_BYTES``; ``safe_tar_files`` refuses a member larger
than the caller's limit, and an archive of more than ``max_members`` entries, before reading either.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

__all__ = ["ArchiveLimitError", "MAX_HEADER_BYTES", "MAX_MEMBERS", "is_safe_member_name", "open_tar",
           "safe_tar_files"]

_DRIVE = re.compile(r"^[A-Za-z]:")  # C:foo and C:\foo are absolute or drive-relative on Windows
MAX_HEADER_BYTES = 1 << 20  # a pax header or GNU long name is a few hundred bytes in a real archive
MAX_MEMBERS = 1000  # the data set archives read here hold under 20
# Header members whose data tarfile reads whole into memory while listing the archive.
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)


class ArchiveLimitError(tarfile.TarError):
    """An archive declares more data than its reader allows: not the expected archive, or a decompression bomb."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized extended header before tarfile reads it into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise ArchiveLimitError(f"an extended header declares {self.size} bytes (at most {MAX_HEADER_BYTES})")
        return super()._proc_member(tar)


def open_tar(path: str | Path, mode: str = "r:*") -> tarfile.TarFile:
    """``tarfile.open(path, mode)`` for reading, with extended headers bounded (see the module docstring)."""
    return tarfile.open(path, mode, tarinfo=_BoundedTarInfo)


def is_safe_member_name(name: str) -> bool:
    """True if ``name``, joined to a destination folder, stays inside it on POSIX and on Windows."""
    if not name or "\x00" in name:
        return False
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        return False
    return ".." not in PurePosixPath(posix).parts


def safe_tar_files(tar: tarfile.TarFile, max_bytes: int | None = None,
                   max_members: int = MAX_MEMBERS) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of ``tar`` with safe names, in archive order (one forward pass).

    Raises ``ArchiveLimitError`` at an entry whose header declares more than ``max_bytes`` (whatever its
    type or name), or after ``max_members`` entries, before reading its data.
    """
    for count, info in enumerate(tar, 1):
        if count > max_members:
            raise ArchiveLimitError(f"it holds more than {max_members} entries")
        if max_bytes is not None and info.size > max_bytes:  # any entry: skipping one also inflates it
            raise ArchiveLimitError(f"member {info.name!r} declares {info.size} bytes (at most {max_bytes})")
        if info.isfile() and is_safe_member_name(info.name):
            yield info
