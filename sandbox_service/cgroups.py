"""Per-slot cgroup limits on memory, processes and CPU, where the host offers them: cgroup v2 where a v2 hierarchy
is delegated to the service (its cgroup has the controllers and its subtree can enable them), else cgroup v1.

rlimits bound one process; a cgroup bounds the whole tree, counts tmpfs pages a jailed run writes, stops fork
bombs even when the jail's uid has other processes, and caps the CPU a run takes from the service and its
neighbours. On a host with neither, the service reports "unavailable" with the reason and relies on rlimits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from sandbox_service.run_dir import process_alive

_log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
_PREFIX = "fr_sandbox-"
_CPU_PERIOD_US = 100_000
# A slot's CPU weight is that of one ordinary process (v1 cpu.shares 1024, v2 cpu.weight 100), however many
# processes its run starts: a fork bomb weighs what one program does, beside the service and the host's other work.
_V1_SHARES, _V2_WEIGHT = 1024, 100


@dataclass(frozen=True)
class CgroupReport:
    """What /health says about cgroups."""

    version: str | None
    memory: bool
    pids: bool
    cpu: bool
    reason: str


def _own_dirs(mountinfo: str, proc_cgroup: str) -> tuple[dict[str, Path], Path | None]:
    """The service's own cgroup directory per v1 controller, and its v2 directory (None when no v2 hierarchy is
    mounted), from /proc/self/{mountinfo,cgroup}."""
    v1_mounts: dict[str, tuple[str, str]] = {}  # controller -> (root inside the hierarchy, mount point)
    v2_mount: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if post_fields[:1] == ["cgroup2"]:
            v2_mount = (fields[3], fields[4])
        elif len(post_fields) >= 3 and post_fields[0] == "cgroup":
            for controller in post_fields[2].split(","):
                if controller in CONTROLLERS:
                    v1_mounts[controller] = (fields[3], fields[4])
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            v2 = _inside(v2_mount, path) if v2_mount else None
        else:
            v1.update({c: _inside(v1_mounts[c], path) for c in controllers.split(",") if c in v1_mounts})
    return v1, v2


def _inside(mount: tuple[str, str], path: str) -> Path:
    root, mount_point = mount
    relative = path[len(root) :] if path.startswith(root) and root != "/" else path
    return Path(mount_point) / relative.lstrip("/")


def _remove_tree(directory: Path) -> None:
    """rmdir a cgroup and its children (cgroup dirs are removed with rmdir, never unlinked)."""
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        _remove_tree(child)
    with contextlib.suppress(OSError):
        directory.rmdir()


def _read_key(file: Path, key: str) -> int:
    """The value of `key` in a flat keyed cgroup file (memory.events, memory.oom_control), 0 if absent."""
    with contextlib.suppress(OSError):
        for line in file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class SlotCgroup:
    """The cgroups of one worker slot, reused by its runs one after another."""

    def __init__(self, dirs: dict[str, Path], version: str):
        self.dirs, self.version = dirs, version  # v1: one directory per controller; v2: {"v2": directory}
        self._memory_limit: int | None = None
        self._pids_limit: int | None = None
        self._cpu_quota: int | None = None
        self._oom_kills = self._read_oom_kills()

    def _write(self, controller: str, name: str, value: str | int) -> None:
        (self.dirs[controller] / name).write_text(str(value))

    def _has(self, controller: str) -> bool:
        return "v2" in self.dirs or controller in self.dirs

    def set_limits(self, memory_bytes: int, pids: int, cpus: float) -> None:
        """Limits for the next run (written only when they change)."""
        v2 = self.version == "v2"
        if memory_bytes != self._memory_limit and self._has("memory"):
            self._set_memory(memory_bytes)
            self._memory_limit = memory_bytes
        if pids != self._pids_limit and self._has("pids"):
            self._write("v2" if v2 else "pids", "pids.max", pids)
            self._pids_limit = pids
        quota = int(cpus * _CPU_PERIOD_US)
        if quota != self._cpu_quota and (self.dirs.get("cpu") or (v2 and (self.dirs["v2"] / "cpu.max").exists())):
            if v2:
                self._write("v2", "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                self._write("cpu", "cpu.cfs_period_us", _CPU_PERIOD_US)
                self._write("cpu", "cpu.cfs_quota_us", quota)
            self._cpu_quota = quota

    def _set_memory(self, limit: int) -> None:
        if self.version == "v2":
            self._write("v2", "memory.max", limit)
            with contextlib.suppress(OSError):  # no swap accounting on this host
                self._write("v2", "memory.swap.max", 0)
            return
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
        if self.version == "v2":
            return [self.dirs["v2"] / "cgroup.procs"]
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
        if self.version == "v2":
            return _read_key(self.dirs["v2"] / "memory.events", "oom_kill")
        return _read_key(self.dirs["memory"] / "memory.oom_control", "oom_kill") if "memory" in self.dirs else 0

    def take_run_stats(self) -> tuple[bool, int | None]:
        """(an OOM kill happened since the last call, the peak memory in bytes since the last call, or None where the
        kernel cannot restart the peak: v2 before Linux 6.12)."""
        kills = self._read_oom_kills()
        oom, self._oom_kills = kills > self._oom_kills, kills
        if not self._has("memory"):
            return oom, None
        peak_file = (
            (self.dirs["v2"] / "memory.peak")
            if self.version == "v2"
            else (self.dirs["memory"] / "memory.max_usage_in_bytes")
        )
        try:
            peak = int(peak_file.read_text())
            peak_file.write_text("0")  # the next run's peak starts from now
        except (OSError, ValueError):
            return oom, None
        return oom, peak


class Cgroups:
    """A private cgroup subtree per service process (fr_sandbox-<pid>) under the service's own cgroup(s)."""

    def __init__(self, parents: dict[str, Path], version: str):
        self.parents, self.version = parents, version

    @classmethod
    def detect(cls) -> tuple[Cgroups | None, CgroupReport]:
        """v2 where it is delegated to us, else v1, else none; the report says which and why not the others."""
        try:
            v1, v2 = _own_dirs(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
        except OSError as e:
            return None, CgroupReport(None, False, False, False, f"cannot read /proc/self cgroup info: {e}")
        why_not_v2 = "v2: no cgroup2 hierarchy is mounted"
        if v2 is not None:
            cgroups, enabled, why_not_v2 = cls._delegated_v2(v2)
            if cgroups is not None:
                return cgroups, CgroupReport("v2", True, True, "cpu" in enabled, "")
        cgroups, report = cls._v1(v1)
        reason = "; ".join(r for r in (why_not_v2, report.reason) if r)
        return cgroups, CgroupReport(report.version, report.memory, report.pids, report.cpu, reason)

    @classmethod
    def _delegated_v2(cls, own: Path) -> tuple[Cgroups | None, list[str], str]:
        """Our v2 subtree with memory and pids (and cpu, if offered) enabled for its slots: (cgroups, the controllers
        enabled, ""), or (None, [], why not)."""
        try:
            offered = set((own / "cgroup.controllers").read_text().split())
        except OSError as e:
            return None, [], f"v2: cannot read {own}/cgroup.controllers: {e.strerror}"
        if not {"memory", "pids"} <= offered:
            shown = " ".join(sorted(offered)) or "none"
            return None, [], f"v2: the hierarchy at {own} offers no memory and pids controllers ({shown})"
        wanted = [c for c in CONTROLLERS if c in offered]
        enable = " ".join(f"+{c}" for c in wanted)
        _remove_stale(own)
        parent = own / f"{_PREFIX}{os.getpid()}"
        try:
            if not set(wanted) <= set((own / "cgroup.subtree_control").read_text().split()):
                try:
                    (own / "cgroup.subtree_control").write_text(enable)
                except OSError:  # our own process sits in `own` ("no internal processes"): move it to a leaf
                    leaf = own / f"{_PREFIX}{os.getpid()}-service"
                    leaf.mkdir(exist_ok=True)
                    (leaf / "cgroup.procs").write_text(str(os.getpid()))
                    (own / "cgroup.subtree_control").write_text(enable)
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text(enable)
        except OSError as e:
            return None, [], f"v2: the hierarchy at {own} is not delegated to this service ({e.strerror})"
        return cls({"v2": parent}, "v2"), wanted, ""

    @classmethod
    def _v1(cls, own: dict[str, Path]) -> tuple[Cgroups | None, CgroupReport]:
        if not own:
            return None, CgroupReport(None, False, False, False, "no cgroup v1 memory or pids hierarchy is mounted")
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
        reasons += [f"{c}: not mounted as cgroup v1" for c in CONTROLLERS if c not in own]
        report = CgroupReport(
            "v1" if parents else None, "memory" in parents, "pids" in parents, "cpu" in parents, "; ".join(reasons)
        )
        return (cls(parents, "v1") if parents else None), report

    def slot(self, index: int) -> SlotCgroup:
        dirs = {}
        for controller, parent in self.parents.items():
            directory = parent / f"slot-{index}"
            directory.mkdir(exist_ok=True)
            dirs[controller] = directory
        self._weigh(index + 1)
        return SlotCgroup(dirs, self.version)

    def _weigh(self, slots: int) -> None:
        """The subtree weighs as much as its slots, each as much as one ordinary process (see _V1_SHARES)."""
        with contextlib.suppress(OSError, KeyError):
            if self.version == "v2" and (self.parents["v2"] / "cpu.weight").exists():
                (self.parents["v2"] / "cpu.weight").write_text(str(min(10_000, _V2_WEIGHT * slots)))
            elif "cpu" in self.parents:
                (self.parents["cpu"] / "cpu.shares").write_text(str(_V1_SHARES * slots))

    def remove(self) -> None:
        for parent in self.parents.values():
            _remove_tree(parent)
            leaf = parent.with_name(f"{parent.name}-service")  # v2: where the service moved itself, if it did
            with contextlib.suppress(OSError):
                leaf.rmdir()


def _remove_stale(directory: Path) -> None:
    """Remove subtrees left by service processes that no longer exist."""
    with contextlib.suppress(OSError):
        for stale in directory.glob(f"{_PREFIX}*"):
            pid = stale.name[len(_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                _log.debug("removing stale cgroup %s", stale)
                _remove_tree(stale)
