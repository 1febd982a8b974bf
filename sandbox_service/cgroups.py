"""Per-slot cgroup v1 memory and pids limits, where the host offers them.

rlimits bound one process; a cgroup bounds the whole tree, counts tmpfs pages a jailed run writes,
and stops fork bombs even when the jail's uid has other processes. Only cgroup v1 is driven here
(the hosts we run on mount v1 for memory and pids; their v2 hierarchy has neither controller);
on any other host the service reports "unavailable" with the reason and relies on rlimits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

_log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
_PREFIX = "fr_sandbox-"


@dataclass(frozen=True)
class CgroupReport:
    """What /health says about cgroups."""

    version: str | None
    memory: bool
    pids: bool
    reason: str


def _own_v1_dirs(mountinfo: str, proc_cgroup: str) -> dict[str, Path]:
    """The service's own cgroup directory per v1 controller, from /proc/self/{mountinfo,cgroup}."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3 or post_fields[0] != "cgroup":
            continue
        for controller in post_fields[2].split(","):
            if controller in CONTROLLERS:
                mounts[controller] = (fields[3], fields[4])  # (root inside the hierarchy, mount point)
    dirs = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller in mounts:
                root, mount_point = mounts[controller]
                relative = path[len(root) :] if path.startswith(root) and root != "/" else path
                dirs[controller] = Path(mount_point) / relative.lstrip("/")
    return dirs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(directory: Path) -> None:
    """rmdir a cgroup and its children (cgroup dirs are removed with rmdir, never unlinked)."""
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        _remove_tree(child)
    with contextlib.suppress(OSError):
        directory.rmdir()


class SlotCgroup:
    """The memory and pids cgroups of one worker slot, reused by its runs one after another."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs
        self._memory_limit: int | None = None
        self._pids_limit: int | None = None
        self._oom_kills = self._read_oom_kills()

    def _write(self, controller: str, name: str, value: str | int) -> None:
        (self.dirs[controller] / name).write_text(str(value))

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        if "memory" in self.dirs and memory_bytes != self._memory_limit:
            self._set_memory(memory_bytes)
            self._memory_limit = memory_bytes
        if "pids" in self.dirs and pids != self._pids_limit:
            self._write("pids", "pids.max", pids)
            self._pids_limit = pids

    def _set_memory(self, limit: int) -> None:
        # memory+swap must stay >= memory at every moment, so the order of the two writes depends on the direction.
        memory = self.dirs["memory"] / "memory.limit_in_bytes"
        memsw = self.dirs["memory"] / "memory.memsw.limit_in_bytes"
        order = [memory.name]
        if memsw.exists():
            growing = limit > int(memory.read_text())
            order = [memsw.name, *order] if growing else [*order, memsw.name]
        for name in order:
            try:
                self._write("memory", name, limit)
            except OSError:  # EBUSY: page cache left by an earlier run is above the new limit
                self._write("memory", "memory.force_empty", 0)
                self._write("memory", name, limit)

    def tasks_files(self) -> list[Path]:
        """Where a process writes 0 to move itself into the slot (see jail._JOIN_CGROUPS)."""
        return [directory / "tasks" for directory in self.dirs.values()]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory in self.dirs.values():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill_all(self) -> int:
        """SIGKILL every process still in the slot; returns how many were signalled."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def _read_oom_kills(self) -> int:
        if "memory" not in self.dirs:
            return 0
        for line in (self.dirs["memory"] / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def take_run_stats(self) -> tuple[bool, int | None]:
        """(an OOM kill happened since the last call, peak memory bytes since the last call); resets the peak."""
        if "memory" not in self.dirs:
            return False, None
        kills = self._read_oom_kills()
        oom, self._oom_kills = kills > self._oom_kills, kills
        peak_file = self.dirs["memory"] / "memory.max_usage_in_bytes"
        peak = int(peak_file.read_text())
        with contextlib.suppress(OSError):
            peak_file.write_text("0")
        return oom, peak


class Cgroups:
    """A private cgroup subtree per service process (fr_sandbox-<pid>) under the service's own cgroups."""

    def __init__(self, parents: dict[str, Path]):
        self.parents = parents

    @classmethod
    def detect(cls) -> tuple[Cgroups | None, CgroupReport]:
        try:
            own = _own_v1_dirs(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
        except OSError as e:
            return None, CgroupReport(None, False, False, f"cannot read /proc/self cgroup info: {e}")
        if not own:
            return None, CgroupReport(None, False, False, "no cgroup v1 memory or pids hierarchy is mounted")
        parents: dict[str, Path] = {}
        reasons = []
        for controller, directory in own.items():
            _remove_stale(directory)
            parent = directory / f"{_PREFIX}{os.getpid()}"
            try:
                parent.mkdir(exist_ok=True)
            except OSError as e:
                reasons.append(f"{controller}: cannot create {parent}: {e.strerror}")
                continue
            parents[controller] = parent
        missing = [c for c in CONTROLLERS if c not in own]
        reasons += [f"{c}: not mounted as cgroup v1" for c in missing]
        report = CgroupReport("v1" if parents else None, "memory" in parents, "pids" in parents, "; ".join(reasons))
        return (cls(parents) if parents else None), report

    def slot(self, index: int) -> SlotCgroup:
        dirs = {}
        for controller, parent in self.parents.items():
            directory = parent / f"slot-{index}"
            directory.mkdir(exist_ok=True)
            dirs[controller] = directory
        return SlotCgroup(dirs)

    def remove(self) -> None:
        for parent in self.parents.values():
            _remove_tree(parent)


def _remove_stale(directory: Path) -> None:
    """Remove subtrees left by service processes that no longer exist."""
    with contextlib.suppress(OSError):
        for stale in directory.glob(f"{_PREFIX}*"):
            pid = stale.name[len(_PREFIX) :]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _log.info("removing stale cgroup %s", stale)
                _remove_tree(stale)
