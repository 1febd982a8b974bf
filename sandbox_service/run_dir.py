"""A run's directory: paths inside it as requests name them, and its life on the host (made, bounded, removed).

As root, each run gets a fresh tmpfs of its own (`size=` and `nr_inodes=` bound its disk and its files), mounted in
the service's private mount namespace; the jail sees its `home/` as /sandbox, its `tmp/` as /tmp and its `shm/` as
/dev/shm, so one quota covers all three. Removing it is an unmount: instant, whatever the run left there (deep
trees, mode-000 directories, millions of files, locked files). Without root the directory is a plain one on disk,
removed by an iterative walk that never follows a symlink. Both are blocking and run in a worker thread. Leftovers
of a service that died are swept when the next one starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

JAIL_HOME = "/sandbox"  # where the run directory appears inside the jail
PREFIX = "fr_sandbox-"
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_MNT_DETACH = 0x2
_log = logging.getLogger(__name__)


def safe_relative_path(path: str) -> PurePosixPath:
    """A path inside the run directory ('x/y.txt' or '/sandbox/x/y.txt'); ValueError says what is wrong."""
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        if not pure.is_relative_to(JAIL_HOME):
            raise ValueError(f"absolute paths must lie under {JAIL_HOME}")
        pure = pure.relative_to(JAIL_HOME)
    if not pure.parts or any(part in ("..", ".") for part in pure.parts):
        raise ValueError("path must name a file inside the run directory, without '.' or '..' parts")
    return pure


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def private_mounts() -> bool:
    """Give this process a mount namespace of its own, so that run filesystems vanish with it (root only)."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        return False
    return libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0


@dataclass(frozen=True)
class DiskQuota:
    """What one run may keep on disk: bytes and files (inodes), /tmp and /dev/shm included."""

    megabytes: int
    inodes: int


@dataclass(frozen=True)
class RunDir:
    """One run's directory: `home` is /sandbox in the jail; `tmp` and `shm` its /tmp and /dev/shm when they share its
    quota (None: the jail makes its own, size-limited tmpfs)."""

    root: Path
    home: Path
    tmp: Path | None
    shm: Path | None
    mounted: bool


def make_root(parent: Path | None) -> Path:
    """The service's directory of run directories, named after its pid so that a later service can sweep it."""
    root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    root.chmod(0o711)  # slot uids must traverse it to reach their own 0700 run directory
    return root


def make_run_dir(root: Path, name: str, uid: int | None, files: Mapping[str, bytes], quota: DiskQuota | None) -> RunDir:
    """A fresh run directory holding `files` (paths already checked), owned by `uid` when given (blocking)."""
    path = root / name
    path.mkdir(mode=0o700)
    mounted = False
    if quota is not None:
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        options = f"size={quota.megabytes}m,nr_inodes={quota.inodes},mode=0700{owner}".encode()
        libc = _libc()
        if libc.mount(b"tmpfs", bytes(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
            error = ctypes.get_errno()
            path.rmdir()
            raise OSError(error, f"cannot mount the run's tmpfs at {path}: {os.strerror(error)}")
        mounted = True
    run = RunDir(path, path / "home", path / "tmp" if mounted else None, path / "shm" if mounted else None, mounted)
    made = [p for p in (run.home, run.tmp, run.shm) if p is not None]
    for directory in made:
        directory.mkdir(mode=0o700)
    for rel, content in files.items():
        target = run.home / safe_relative_path(rel)
        for parent in reversed(target.relative_to(run.home).parents[:-1]):
            if not (run.home / parent).is_dir():
                (run.home / parent).mkdir()
                made.append(run.home / parent)
        target.write_bytes(content)
        made.append(target)
    if uid is not None:
        for made_path in made:
            os.chown(made_path, uid, uid, follow_symlinks=False)
    return run


def remove_run_dir(run: RunDir) -> None:
    """Remove a run directory whatever the run left in it (blocking)."""
    if run.mounted:
        _libc().umount2(bytes(run.root), _MNT_DETACH)
    remove_tree(run.root)


def remove_root(root: Path) -> None:
    """Remove the service's directory of run directories, unmounting what is still mounted under it (blocking)."""
    for mount in _mounts_under(root):
        _libc().umount2(mount.encode(), _MNT_DETACH)
    remove_tree(root)


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it without recursion and without following symlinks; directories the
    run made unreadable are opened up first (only needed when the service is not root)."""
    pending = [(str(path), False)]
    while pending:
        directory, scanned = pending.pop()
        if scanned:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
            continue
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(directory)
            continue
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)
        pending.append((directory, True))
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, False))
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
        except OSError:
            continue


def sweep_stale(parent: Path | None) -> int:
    """Remove the run roots of sandbox services that no longer run (a crash, a kill -9); returns how many."""
    base = Path(parent or tempfile.gettempdir())
    removed = 0
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            pid = entry.name[len(PREFIX) :].split("-", 1)[0]
            if entry.name.startswith(PREFIX) and pid.isdigit() and entry.is_dir() and not process_alive(int(pid)):
                _log.debug("removing the leftovers of sandbox service %s: %s", pid, entry)
                remove_root(entry)
                removed += 1
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mounts_under(directory: Path) -> list[str]:
    """Mount points below `directory` in this mount namespace, deepest first."""
    prefix = str(directory) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4] for line in lines if len(line.split()) > 4]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)
