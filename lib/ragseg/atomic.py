"""Crash-safe file writes: write a temp file beside the target, fsync, then rename over it.

A crash or an exception mid-write leaves the previous file (or none), never a truncated one, and
the temp file is always removed. Every writer of index, caches, labels, decoders and manifests
goes through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name beside ``path`` for a writer that takes a file name; on a clean exit
    the file is fsynced and renamed to ``path``.

    suffix: the temp name's ending (writers such as nibabel choose the format by it). Temp names
    start with ``.partial-<host>-<pid>-`` so folder watchers and globs for real files ignore them,
    and :func:`sweep_partials` can tell a dead writer's debris from a live writer's file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(), suffix=suffix, dir=str(p.parent))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); keep the replaced file's mode, else a normal 0644
        try:
            mode = p.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO]:
    """``with atomic_write(p) as fh: fh.write(...)``: :func:`atomic_path` with an open file."""
    with atomic_path(path, suffix) as tmp, open(tmp, mode) as fh:
        yield fh


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"


def _partial_prefix() -> str:
    return f".partial-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove temp files left in ``folder`` by writers on this host that were killed mid-write
    (SIGKILL skips ``finally``). Files of live processes and of other hosts are left alone.
    Returns the removed paths."""
    d = Path(folder)
    if not d.is_dir():
        return []
    pat = re.compile(rf"^\.partial-{re.escape(_host())}-(\d+)-")
    removed = []
    for f in d.iterdir():
        m = pat.match(f.name)
        if m and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed
