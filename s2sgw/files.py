"""Atomic file writes: a reader sees the old file or the new one, never a partial one. Blocking."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path

# What _write_temp names its temporaries: ".NAME.<12 hex digits>.tmp" beside NAME.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")
STALE_AFTER = 60.0  # seconds: no write of ours takes this long between creating and renaming


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(
    path: Path, data: bytes, mode: int, keep: os.stat_result | None = None, owner: tuple[int, int] | None = None
) -> Path:
    """Write ``data`` to a new hidden file beside ``path``, created with ``mode`` (never wider).

    With ``keep`` (the stat of the file being replaced) the new file takes its owner, group and
    mode instead; else ``owner`` (uid, gid; -1 leaves one as it is) when given. Both are set
    before any byte is written.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        if keep is not None:
            os.fchown(fd, keep.st_uid, keep.st_gid)  # a no-op unless root, or a group we are in
            mode = stat.S_IMODE(keep.st_mode)
        elif owner is not None and owner != (-1, -1):
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # the umask may have narrowed it; the caller asked for this mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def remove_stale_temps(
    directory: Path, names: Sequence[str] | None = None, *, older_than: float = STALE_AFTER, now: float | None = None
) -> list[Path]:
    """Remove the temporaries our writes left in ``directory`` (a process killed between write
    and rename leaves one, maybe holding a private key); only those of ``names`` if given, and
    only those older than ``older_than`` seconds, so a write in progress keeps its own. Returns
    what was removed; files we did not make are never touched."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or (names is not None and match.group("name") not in names):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def write_files(
    files: Sequence[tuple[Path, bytes, int]], *, keep_owner: bool = False, owner: tuple[int, int] | None = None
) -> None:
    """Write every ``(path, data, mode)`` or none: all to temporaries first, then rename each.

    With ``keep_owner`` a file that already exists is replaced by one with its owner, group and
    mode (``mode`` and ``owner`` apply to new files only): renewed keys stay readable by whoever
    could read them. Raises OSError naming the file in ``error.filename`` when one cannot be written.
    """
    temps: list[tuple[Path, Path]] = []
    current = files[0][0]
    try:
        for current, data, mode in files:
            keep = _existing(current) if keep_owner else None
            temps.append((_write_temp(current, data, mode, keep, owner), current))
        for temp, current in temps:
            os.replace(temp, current)
    except OSError as error:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        error.filename = str(current)
        raise
    for directory in {path.parent for path, _, _ in files}:
        fsync_directory(directory)


def _existing(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def write_atomically(path: Path | str, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` in one rename."""
    path = Path(path)
    write_files([(path, data, mode)])
    return path
