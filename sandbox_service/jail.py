"""Running one untrusted program in a fresh, disposable jail.

Each run gets its own process tree in a fresh run directory:

* as root: `setpriv` to a per-slot unprivileged uid (bwrap's --uid alone only renames root inside a user
  namespace), then `bwrap` with new user, pid, ipc, uts, net and mount namespaces; a read-only view of
  /usr and /etc, tmpfs /tmp, no /sys, only the run directory writable;
* the head of the exec chain (`sh`, still root) moves itself into the slot's cgroup v1 memory and pids
  groups by writing 0 to their `tasks` files (a process moving itself skips the RCU grace period that moving
  another process costs, about 8 ms a run), then `prlimit` sets the rlimits (CPU, address space, processes,
  file size, open files; the service lacks CAP_SYS_RESOURCE, so it cannot set them on another uid's process):
  everything the program starts inherits both;
* a wall-clock timer and output caps kill the whole tree (the pid namespace dies with its pid 1);
* the environment is scrubbed on both sides of bwrap (its pid 1 keeps the environ it was started with,
  and the program can read that through /proc/1/environ).

A run may be given a channel: a socketpair whose far end is the jailed program's fd $SANDBOX_CHANNEL_FD,
served by an async handler while the program runs (the evaluation harness reports results over it; a
jailed Workflow can proxy operator calls over it). If the handler returns and the program has not exited
half a second later, it is killed (killed_for="channel"): that is how a handler enforces deadlines of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox_service.cgroups import Cgroups, SlotCgroup
from sandbox_service.pythons import DEFAULT as DEFAULT_PYTHON
from sandbox_service.pythons import DEFAULT_PATH as DEFAULT_PYTHON_PATH
from sandbox_service.run_dir import (
    JAIL_HOME,
    DiskQuota,
    RunDir,
    make_root,
    make_run_dir,
    remove_root,
    remove_run_dir,
    safe_relative_path,
)

_log = logging.getLogger(__name__)

CHANNEL_ENV = "SANDBOX_CHANNEL_FD"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_PR_SET_CHILD_SUBREAPER = 36
_START_TIMEOUT_S = 10.0
_REAP_TIMEOUT_S = 5.0
_CHANNEL_GRACE_S = 0.5
_MiB = 1 << 20

ChannelHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


class IsolationError(RuntimeError):
    """The jail cannot be set up on this host (the service refuses to start unless --insecure)."""


class PythonUnusable(RuntimeError):
    """A configured python does not run inside the jail (the service refuses to start)."""


@dataclass(frozen=True)
class Limits:
    wall_s: float
    cpu_s: float
    memory_mb: int
    processes: int = 64
    cpus: float = 1.0  # the CPU share a run may take, where a cgroup can enforce it
    file_size_mb: int = 64
    open_files: int = 256
    output_bytes: int = _MiB  # per stream (stdout, stderr)


@dataclass(frozen=True)
class JailConfig:
    # name -> interpreter jailed code may run with (pythons.py); the unprivileged uid cannot exec one under /root
    pythons: Mapping[str, str] = field(default_factory=lambda: {DEFAULT_PYTHON: DEFAULT_PYTHON_PATH})
    bwrap: str = "bwrap"
    setpriv: str = "setpriv"
    prlimit: str = "prlimit"
    uid_base: int = 61000  # slot i runs as uid_base + i (see claim_uid_block), so runs never share a uid
    run_root: Path | None = None
    tmp_size_mb: int = 64  # /tmp and /dev/shm each, where runs have no disk quota of their own
    disk: DiskQuota | None = None  # as root: a tmpfs per run of this size and these inodes (home, /tmp, /dev/shm)
    seccomp: bytes | None = None  # the BPF syscall filter every run gets (seccomp_filter.py), where one was built
    max_fetch_bytes: int = 16 << 20  # files a run's caller may read back, all together
    extra_ro_binds: tuple[str, ...] = ()
    insecure: bool = False

    @property
    def python(self) -> str:
        """The default interpreter (the harness of probes, and runs that name none)."""
        return self.pythons[DEFAULT_PYTHON]


@dataclass(frozen=True)
class Isolation:
    """The isolation actually in force, as /health reports it."""

    level: str  # "full" (root: per-slot uid + namespaces) | "namespaces" (service not root) | "none" (--insecure)
    detail: dict[str, Any]


@dataclass
class RunOutcome:
    """What happened to one jailed program. `exit_code` uses the shell encoding (128+n for signal n)."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    killed_for: str | None = None  # "timeout" | "output_limit" | "shutdown" | "channel"
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    missing_files: list[str] = field(default_factory=list)
    sandbox_error: str | None = None
    channel_result: Any = None

    @property
    def cpu_limit_hit(self) -> bool:
        return self.exit_code == 128 + signal.SIGXCPU


class JailCommand:
    """Builds the setpriv + bwrap command line for one isolation level."""

    def __init__(self, config: JailConfig, level: str):
        self.config, self.level = config, level
        self.ro_binds = _system_binds()
        self.extra_binds = _extra_binds(config)  # after /tmp is mounted, so that a path under /tmp shows too

    def env(self, home: Path, program: Sequence[str], extra: Mapping[str, str]) -> dict[str, str]:
        """The program's whole environment. PATH starts with the program's own directory, as an activated virtual
        environment's does (so `python` and `pip` are that environment's)."""
        home = str(home) if self.level == "none" else JAIL_HOME
        path = ["/usr/local/bin", "/usr/bin", "/bin"]
        own = os.path.dirname(program[0])
        return {
            "PATH": ":".join(([own] if os.path.isabs(own) and own not in path else []) + path),
            "HOME": home,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            **extra,
        }

    def argv(
        self,
        uid: int | None,
        run: RunDir,
        env: Mapping[str, str],
        program: Sequence[str],
        limits: Limits | None = None,
        status_fd: int | None = None,
        cgroup_tasks: Sequence[Path] = (),
        as_pid_1: bool = False,
        seccomp_fd: int | None = None,
    ) -> list[str]:
        cmd = ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *map(str, cgroup_tasks), "--"] if cgroup_tasks else []
        cmd += self._rlimits(limits, uid) if limits is not None else []
        if self.level == "none":
            return [*cmd, *program]
        if uid is not None:
            cmd += [self.config.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        cmd += [
            self.config.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--hostname",
            "sandbox",
            *self.ro_binds,
            *self._scratch(run.tmp, "/tmp"),
            *self.extra_binds,
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            *self._scratch(run.shm, "/dev/shm"),
            "--bind",
            str(run.home),
            JAIL_HOME,
            "--chdir",
            JAIL_HOME,
            "--remount-ro",
            "/",
        ]
        for key, value in env.items():
            cmd += ["--setenv", key, value]
        if status_fd is not None:
            cmd += ["--json-status-fd", str(status_fd)]
        if seccomp_fd is not None:
            cmd += ["--seccomp", str(seccomp_fd)]
        if as_pid_1:  # no separate pid 1 that bwrap's monitor would leave behind for someone else to reap
            cmd += ["--as-pid-1"]
        return [*cmd, "--", *program]

    def _scratch(self, shared: Path | None, where: str) -> list[str]:
        """/tmp or /dev/shm: a directory on the run's own tmpfs (its quota), or a size-limited tmpfs of the jail's."""
        if shared is not None:
            return ["--bind", str(shared), where]
        return ["--size", str(self.config.tmp_size_mb * _MiB), "--tmpfs", where]

    def _rlimits(self, limits: Limits, uid: int | None) -> list[str]:
        processes = limits.processes + 2  # bwrap's monitor and pid 1 run as the jail's uid too
        if uid is None and os.geteuid() != 0:
            processes += _processes_of_uid(os.getuid())  # RLIMIT_NPROC counts all of the service user's processes
        cpu = max(1, math.ceil(limits.cpu_s))
        return [
            self.config.prlimit,
            f"--cpu={cpu}:{cpu + 1}",
            f"--as={limits.memory_mb * _MiB}",
            f"--nproc={processes}",
            f"--fsize={limits.file_size_mb * _MiB}",
            f"--nofile={limits.open_files}",
            "--core=0",
            "--",
        ]


# Writes 0 (this very process) to each tasks file given before "--", then execs the rest.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 126; shift; done; shift; exec "$@"'


def _system_binds() -> list[str]:
    """Read-only binds of the system directories (symlinks such as /lib -> usr/lib are recreated as symlinks)."""
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _in_system_dirs(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == (root := os.path.realpath(d)) or real.startswith(root + "/") for d in _SYSTEM_DIRS)


def _python_prefixes(python: str, run_root: Path) -> list[str]:
    """What to show the jail of an interpreter outside the system directories: its install prefix (the directory
    above bin/: a virtual environment, /opt/python3.11) or else its own directory, for the path given and for the
    interpreter it links to. PythonUnusable when that would show a shared directory (/tmp, /home, ...) whole."""
    prefixes = []
    for path in (python, os.path.realpath(python)):
        parent = os.path.dirname(path)
        prefix = os.path.dirname(parent) if os.path.basename(parent) == "bin" else parent
        if _in_system_dirs(prefix) or prefix in prefixes:
            continue
        if len(Path(prefix).parts) < 3 or run_root.resolve().is_relative_to(os.path.realpath(prefix)):
            raise PythonUnusable(
                f"python {python}: the jail would have to show all of {prefix} to run it; put the interpreter in a "
                "directory of its own (a virtual environment, for instance)"
            )
        prefixes.append(prefix)
    return prefixes


def _extra_binds(config: JailConfig) -> list[str]:
    """Read-only binds of --ro-bind paths and of the named pythons' prefixes."""
    paths = list(config.extra_ro_binds)
    run_root = config.run_root or Path(tempfile.gettempdir())
    for python in config.pythons.values():
        paths += [prefix for prefix in _python_prefixes(python, run_root) if prefix not in paths]
    return [arg for path in paths for arg in ("--ro-bind", path, path)]


class _Capture:
    """Reads a pipe as data arrives, keeping at most `cap` bytes; past the cap it stops and calls on_overflow."""

    def __init__(self, fd: int, cap: int, on_overflow: Callable[[], None] = lambda: None):
        self.fd, self.cap, self.on_overflow = fd, cap, on_overflow
        self.loop = asyncio.get_running_loop()
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.done = self.loop.create_future()
        self.first_line = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.finish()
            return
        room = self.cap - self.size
        self.chunks.append(data[:room])
        self.size += min(len(data), room)
        if not self.first_line.done() and b"\n" in data:
            self.first_line.set_result(self.data.split(b"\n", 1)[0])
        if len(data) > room:
            self.truncated = True
            self.finish()
            self.on_overflow()

    def finish(self) -> None:
        if self.done.done():
            return
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.done.set_result(None)
        if not self.first_line.done():
            self.first_line.set_result(self.data.split(b"\n", 1)[0])


class _ExitWatch:
    """Completes `exited` when a process exits; pidfds work for processes that are not our children."""

    def __init__(self, pid: int):
        self.loop = asyncio.get_running_loop()
        self.exited = self.loop.create_future()
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None
            self.exited.set_result(None)
            return
        self.loop.add_reader(self.pidfd, self.close)

    def close(self) -> None:
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if not self.exited.done():
            self.exited.set_result(None)

    def kill(self) -> None:
        """SIGKILL through the pidfd, which can never hit a recycled pid."""
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def reap(self, pid: int) -> None:
        """Wait for the exit, then collect the zombie if it was re-parented to us (we are a child subreaper)."""
        await _wait_quietly(self.exited, _REAP_TIMEOUT_S)
        self.close()
        try:
            collected, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if collected == 0:  # still alive after SIGKILL (stuck in the kernel): collect it whenever it goes
            asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)


@dataclass
class _Slot:
    index: int
    uid: int | None  # None: runs keep the service's uid (service not root, or no isolation)
    cgroup: SlotCgroup | None


class _ActiveRun:
    """A started run that a timer, an output cap or a shutdown can kill."""

    def __init__(self, proc: subprocess.Popen, slot: _Slot):
        self.proc, self.slot = proc, slot
        self.init: _ExitWatch | None = None  # the sandbox's pid 1 (the program itself without isolation)
        self.killed_for: str | None = None

    def kill(self, reason: str) -> None:
        if self.killed_for is None:
            self.killed_for = reason
        self.kill_tree()

    def kill_tree(self) -> None:
        if self.init is not None:
            self.init.kill()  # pid 1 of the sandbox: its death kills the whole pid namespace
        if self.proc.returncode is None:  # not reaped yet, so the pid is still ours
            # The monitor's process group also holds the sandbox's pid 1 until that calls setsid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.slot.cgroup is not None:
            self.slot.cgroup.kill_all()


class _Ticket:
    """A run's cancellation: before it has a slot the waiting task is cancelled; after, the run is killed."""

    def __init__(self):
        self.started, self.cancelled = False, False
        self.run: _ActiveRun | None = None

    def cancel(self, task: asyncio.Future) -> None:
        self.cancelled = True
        if not self.started:
            task.cancel()
        elif self.run is not None:
            self.run.kill("cancelled")

    def watch(self, run: _ActiveRun) -> None:
        self.run = run
        if self.cancelled:
            run.kill("cancelled")


@dataclass
class _Started:
    """A jail just started, before its pipes are read: the process and the service's ends of its pipes."""

    proc: subprocess.Popen
    bare: bool
    stdout: int
    stderr: int
    status: int | None
    channel_sock: socket.socket | None


@dataclass
class _Spawned:
    """A started jail: the run a timer or cap can kill, the pipes being read, and the channel's service end."""

    run: _ActiveRun
    bare: bool  # no isolation: the program is our child itself
    stdout: _Capture
    stderr: _Capture
    status: _Capture | None  # bwrap's --json-status-fd
    channel_sock: socket.socket | None

    @classmethod
    def reading(cls, started: _Started, slot: _Slot, limits: Limits) -> _Spawned:
        """Start reading a started jail's pipes on the running event loop."""
        run = _ActiveRun(started.proc, slot)
        return cls(
            run,
            started.bare,
            _Capture(started.stdout, limits.output_bytes, lambda: run.kill("output_limit")),
            _Capture(started.stderr, limits.output_bytes, lambda: run.kill("output_limit")),
            _Capture(started.status, 1 << 16) if started.status is not None else None,
            started.channel_sock,
        )


def seccomp_program(program: bytes) -> int:
    """A file descriptor bwrap reads the filter from (each run reads its own copy to the end)."""
    fd = os.memfd_create("seccomp")
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _set_child_subreaper() -> bool:
    """Make orphaned sandbox pid-1s our children, so they are reaped at once rather than by the host's init."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


class Jail:
    """A pool of worker slots, each running one jailed program at a time."""

    def __init__(
        self,
        config: JailConfig,
        workers: int,
        isolation: Isolation,
        cgroups: Cgroups | None,
        observer: Callable[[str, RunOutcome], None] | None = None,
    ):
        if isolation.level != "none":
            config = resolve_tools(config)
        self.config, self.workers, self.isolation, self.cgroups = config, workers, isolation, cgroups
        self.command = JailCommand(config, isolation.level)
        uids = [config.uid_base + i if isolation.level == "full" else None for i in range(workers)]
        for uid in filter(None, uids):
            check_uid_unused(uid)
        self.subreaper = _set_child_subreaper()
        self.run_root = make_root(config.run_root)
        self._slots = [_Slot(i, uid, cgroups.slot(i) if cgroups else None) for i, uid in enumerate(uids)]
        self._free: asyncio.Queue[_Slot] | None = None
        self._active: set[_ActiveRun] = set()
        self._counter = 0
        self.waiting = 0  # runs waiting for a free slot
        self.refusing: str | None = None  # set by kill_all(refuse_new=True): later runs end at once with this reason
        self.observer = observer

    @property
    def uids(self) -> list[int]:
        """The host uids jailed programs run as (empty when they keep the service's uid)."""
        return [slot.uid for slot in self._slots if slot.uid is not None]

    @property
    def busy(self) -> int:
        return self.workers - (self._free.qsize() if self._free is not None else self.workers)

    def _free_slots(self) -> asyncio.Queue[_Slot]:
        if self._free is None:  # created on first use, inside the serving event loop
            self._free = asyncio.Queue()
            for slot in self._slots:
                self._free.put_nowait(slot)
        return self._free

    async def run(
        self,
        program: Sequence[str],
        limits: Limits,
        *,
        files: Mapping[str, bytes] | None = None,
        stdin: bytes = b"",
        fetch_files: Sequence[str] = (),
        channel: ChannelHandler | None = None,
        channel_line_limit: int = 64 << 10,
        env: Mapping[str, str] | None = None,
        label: str = "run",
        on_queue: Callable[[bool], None] | None = None,
    ) -> RunOutcome:
        """Run `program` (paths as seen inside the jail; cwd is the run directory) in the next free slot.

        `channel_line_limit` bounds a line the channel handler's reader reads; `label` names the kind of run for
        the observer (metrics); `on_queue(True)` and `on_queue(False)` bracket the wait for a free slot (a
        workflow's budget does not count it). Cancelled (its client has gone), a run is killed and cleaned up
        before the cancellation goes on.
        """
        ticket = _Ticket()
        task = asyncio.ensure_future(
            self._run_in_slot(
                ticket,
                program,
                limits,
                files or {},
                stdin,
                fetch_files,
                channel,
                channel_line_limit,
                env or {},
                label,
                on_queue,
            )
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.cancel(task)
            with contextlib.suppress(BaseException):
                await task
            raise

    async def _run_in_slot(
        self,
        ticket: _Ticket,
        program: Sequence[str],
        limits: Limits,
        files: Mapping[str, bytes],
        stdin: bytes,
        fetch_files: Sequence[str],
        channel: ChannelHandler | None,
        channel_line_limit: int,
        env: Mapping[str, str],
        label: str,
        on_queue: Callable[[bool], None] | None,
    ) -> RunOutcome:
        free = self._free_slots()
        self.waiting += 1
        if on_queue is not None:
            on_queue(True)
        try:
            slot = await free.get()
        finally:
            self.waiting -= 1
            if on_queue is not None:
                on_queue(False)
        ticket.started = True
        started = time.monotonic()
        try:
            if self.refusing is not None or ticket.cancelled:
                return RunOutcome(None, b"", b"", 0.0, killed_for=self.refusing or "cancelled")
            self._counter += 1
            name = f"run-{slot.index}-{self._counter}"
            try:
                run = await asyncio.to_thread(make_run_dir, self.run_root, name, slot.uid, files, self.config.disk)
            except OSError as e:
                return RunOutcome(None, b"", b"", time.monotonic() - started, sandbox_error=f"no run directory: {e}")
            try:
                outcome = await self._run(
                    ticket,
                    slot,
                    run,
                    list(program),
                    limits,
                    stdin,
                    fetch_files,
                    channel,
                    channel_line_limit,
                    env,
                    started,
                )
            finally:
                await asyncio.to_thread(remove_run_dir, run)
        finally:
            free.put_nowait(slot)
        if self.observer is not None:
            self.observer(label, outcome)
        return outcome

    def kill_all(self, reason: str, refuse_new: bool = False) -> int:
        """Kill every running program; their results carry killed_for=`reason` (as do later runs, if refuse_new)."""
        if refuse_new:
            self.refusing = reason
        active = list(self._active)
        for run in active:
            run.kill(reason)
        return len(active)

    def close(self) -> None:
        self.kill_all("shutdown", refuse_new=True)
        remove_root(self.run_root)
        if self.cgroups is not None:
            self.cgroups.remove()

    async def _run(
        self,
        ticket: _Ticket,
        slot: _Slot,
        run: RunDir,
        program: list[str],
        limits: Limits,
        stdin: bytes,
        fetch_files: Sequence[str],
        channel: ChannelHandler | None,
        channel_line_limit: int,
        env: Mapping[str, str],
        started: float,
    ) -> RunOutcome:
        started_jail = await asyncio.to_thread(self._spawn, slot, run, program, limits, stdin, channel is not None, env)
        if isinstance(started_jail, str):
            return RunOutcome(None, b"", b"", time.monotonic() - started, sandbox_error=started_jail)
        spawned = _Spawned.reading(started_jail, slot, limits)
        ticket.watch(spawned.run)
        channel_task, sandbox_error = await self._supervise(spawned, limits, channel, channel_line_limit)
        return await _collect(
            spawned, run, fetch_files, self.config.max_fetch_bytes, channel_task, sandbox_error, started
        )

    def _spawn(
        self,
        slot: _Slot,
        run: RunDir,
        program: list[str],
        limits: Limits,
        stdin: bytes,
        with_channel: bool,
        env: Mapping[str, str],
    ) -> _Started | str:
        """Start the jail on `program` (blocking: run in a worker thread); a string says why it could not start."""
        if slot.cgroup is not None:
            slot.cgroup.set_limits(limits.memory_mb * _MiB, limits.processes + 2, limits.cpus)
        bare = self.isolation.level == "none"
        stdin_fd = os.memfd_create("stdin")
        os.write(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe() if not bare else (None, None)
        seccomp_fd = seccomp_program(self.config.seccomp) if not bare and self.config.seccomp else None
        parent_sock, child_sock = socket.socketpair() if with_channel else (None, None)
        inside_env = self.command.env(run.home, program, {CHANNEL_ENV: str(child_sock.fileno())} if child_sock else {})
        inside_env.update(env)
        command = self.command.argv(
            slot.uid,
            run,
            inside_env,
            program,
            limits,
            status_w,
            slot.cgroup.tasks_files() if slot.cgroup is not None else (),
            seccomp_fd=seccomp_fd,
        )
        pass_fds = [fd for fd in (status_w, seccomp_fd, child_sock.fileno() if child_sock else None) if fd is not None]
        try:
            proc = subprocess.Popen(
                command,
                stdin=stdin_fd,
                stdout=out_w,
                stderr=err_w,
                pass_fds=pass_fds,
                env=inside_env if bare else {},
                cwd=run.home if bare else "/",
                start_new_session=True,
            )
        except OSError as e:
            for fd in (out_r, err_r, status_r):
                if fd is not None:
                    os.close(fd)
            if parent_sock is not None:
                parent_sock.close()
            return f"cannot start the jail: {e}"
        finally:
            for fd in (stdin_fd, out_w, err_w, status_w, seccomp_fd):
                if fd is not None:
                    os.close(fd)
            if child_sock is not None:
                child_sock.close()
        return _Started(proc, bare, out_r, err_r, status_r, parent_sock)

    async def _supervise(
        self, spawned: _Spawned, limits: Limits, channel: ChannelHandler | None, line_limit: int
    ) -> tuple[asyncio.Future | None, str | None]:
        """Serve the channel and enforce the limits until the program's whole tree is gone and its pipes are read.

        Returns the channel handler's task and a sandbox error, if the jail itself failed."""
        run, proc = spawned.run, spawned.run.proc
        self._active.add(run)
        monitor = _ExitWatch(proc.pid)
        init_pid = None
        channel_task: asyncio.Future | None = None
        sandbox_error = None
        timer = asyncio.get_running_loop().call_later(limits.wall_s, run.kill, "timeout")
        try:
            init_pid = proc.pid if spawned.bare else await _sandbox_pid(spawned.status, monitor.exited)
            if init_pid is not None:
                run.init = monitor if spawned.bare else _ExitWatch(init_pid)
                if run.killed_for is not None:  # killed before pid 1 was known
                    run.kill_tree()
            elif not monitor.exited.done():
                sandbox_error = "bwrap did not report the sandbox's pid"
                run.kill_tree()
            if spawned.channel_sock is not None and channel is not None and sandbox_error is None:
                channel_task = await _serve_channel(spawned.channel_sock, channel, line_limit)
                spawned.channel_sock = None
                await asyncio.wait({monitor.exited, channel_task}, return_when=asyncio.FIRST_COMPLETED)
                if not monitor.exited.done():  # the handler saw EOF because the program is exiting, or gave up on it
                    await asyncio.wait({monitor.exited}, timeout=_CHANNEL_GRACE_S)
                if not monitor.exited.done():
                    run.kill("channel")
            await monitor.exited
        finally:
            timer.cancel()
            run.kill_tree()  # the monitor is gone or we are bailing out: pid 1, and with it its namespace, goes too
            if spawned.channel_sock is not None:
                spawned.channel_sock.close()
            proc.wait()
            monitor.close()
            if run.init is not None and init_pid is not None:
                await run.init.reap(init_pid)
            for capture in filter(None, (spawned.stdout, spawned.stderr, spawned.status)):
                await _wait_quietly(capture.done, 1.0)
                capture.finish()
            self._active.discard(run)
        return channel_task, sandbox_error


async def _collect(
    spawned: _Spawned,
    run_dir: RunDir,
    fetch_files: Sequence[str],
    max_fetch_bytes: int,
    channel_task: asyncio.Future | None,
    sandbox_error: str | None,
    started: float,
) -> RunOutcome:
    """What happened to a finished run: exit status, output, resource verdicts, fetched files, channel result."""
    run, stdout, stderr = spawned.run, spawned.stdout, spawned.stderr
    channel_result, channel_error = await _finish_channel(channel_task)
    exit_code = _exit_code(spawned.status.data if spawned.status else b"", run.proc.returncode, spawned.bare)
    if sandbox_error is None and exit_code is None and run.killed_for is None:
        sandbox_error = f"the sandbox ended before the program started (bwrap exit {run.proc.returncode})"
    sandbox_error = sandbox_error or channel_error
    if sandbox_error and stderr.data:
        sandbox_error += f"; stderr: {stderr.data[-2000:].decode(errors='replace')}"

    def read_back() -> tuple[tuple[bool, int | None], dict[str, bytes], list[str]]:
        stats = run.slot.cgroup.take_run_stats() if run.slot.cgroup is not None else (False, None)
        return (stats, *_fetch(run_dir.home, fetch_files, max_fetch_bytes))

    (oom, peak), fetched, missing = await asyncio.to_thread(read_back)
    return RunOutcome(
        exit_code,
        stdout.data,
        stderr.data,
        time.monotonic() - started,
        stdout.truncated,
        stderr.truncated,
        run.killed_for,
        oom,
        peak,
        fetched,
        missing,
        sandbox_error,
        channel_result,
    )


async def _sandbox_pid(status: _Capture, monitor_exited: asyncio.Future) -> int | None:
    """The host pid of the sandbox's pid 1, from bwrap's first --json-status-fd line (None if bwrap gave none)."""
    await asyncio.wait(
        {status.first_line, monitor_exited}, timeout=_START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if not status.first_line.done():
        return None
    try:
        return int(json.loads(status.first_line.result())["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


async def _serve_channel(sock: socket.socket, handler: ChannelHandler, line_limit: int) -> asyncio.Future:
    reader, writer = await asyncio.open_connection(sock=sock, limit=line_limit)

    async def serve() -> Any:
        try:
            return await handler(reader, writer)
        finally:
            writer.close()

    return asyncio.ensure_future(serve())


async def _finish_channel(task: asyncio.Future | None) -> tuple[Any, str | None]:
    """The channel handler's result; it normally ends by itself at EOF once the jailed side is gone."""
    if task is None:
        return None, None
    try:
        return await asyncio.wait_for(task, 2.0), None
    except TimeoutError:
        return None, "the channel handler did not finish after the program ended"
    except Exception as e:  # noqa: BLE001 - reported to the caller as a sandbox error, never lost
        _log.exception("channel handler failed")
        return None, f"channel handler failed: {type(e).__name__}: {e}"


async def _wait_quietly(future: asyncio.Future, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(future), timeout)


def _exit_code(status: bytes, returncode: int | None, bare: bool) -> int | None:
    """The program's exit status: bwrap reports {"exit-code": n} only once the program really started."""
    if bare:
        return None if returncode is None else (128 - returncode if returncode < 0 else returncode)
    for line in status.splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            doc = json.loads(line)
            if "exit-code" in doc:
                return int(doc["exit-code"])
    return None


def _fetch(home: Path, paths: Sequence[str], max_bytes: int) -> tuple[dict[str, bytes], list[str]]:
    """Regular files the program left in its run directory, at most `max_bytes` of them in all; symlinks out of it
    count as missing, and so does what does not fit."""
    found, missing = {}, []
    root = home.resolve()
    for rel in paths:
        try:
            resolved = (home / safe_relative_path(rel)).resolve(strict=True)
            if not resolved.is_relative_to(root) or not resolved.is_file():
                raise FileNotFoundError(rel)
            with resolved.open("rb") as file:
                data = file.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise FileNotFoundError(rel)
            max_bytes -= len(data)
            found[rel] = data
        except (OSError, ValueError):
            missing.append(rel)
    return found, missing


def _processes_of_uid(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                count += entry.stat().st_uid == uid
    return count


def claim_uid_block(workers: int, uid_base: int | None = None) -> tuple[int, int]:
    """A block of `workers` host uids that no other sandbox_service on this host uses: (first uid, lock fd).

    Two services with the same uids would count each other's processes against RLIMIT_NPROC and could read
    each other's run directories. Each block is claimed with an flock held as long as the returned fd is open
    (keep it for the life of the process). With `uid_base` only that block is tried.
    """
    step = max(128, workers)
    candidates = [uid_base] if uid_base is not None else range(61000, 65000 - step, step)
    for base in candidates:
        fd = os.open(os.path.join(tempfile.gettempdir(), f"fr_sandbox-uids-{base}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for uid in range(base, base + workers):
                check_uid_unused(uid)
            return base, fd
        except (BlockingIOError, IsolationError) as e:
            os.close(fd)
            if uid_base is not None:
                raise IsolationError(
                    f"uid block {base}..{base + workers - 1} is not free: "
                    f"{e if isinstance(e, IsolationError) else 'another sandbox_service holds it'}"
                ) from None
    raise IsolationError(
        f"no free block of {workers} jail uids between 61000 and 65000: other sandbox services hold them"
    )


def check_uid_unused(uid: int) -> None:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return
    raise IsolationError(
        f"jail uid {uid} belongs to user {user.pw_name!r}; choose another --uid-base so that "
        "jailed code never shares a real user's uid"
    )


def resolve_tools(config: JailConfig) -> JailConfig:
    """The config with bwrap and setpriv as absolute paths; IsolationError names what is missing."""
    bwrap, setpriv, prlimit = (shutil.which(tool) for tool in (config.bwrap, config.setpriv, config.prlimit))
    if bwrap is None:
        raise IsolationError(f"bubblewrap ({config.bwrap!r}) is not installed: apt-get install bubblewrap")
    if prlimit is None or (os.geteuid() == 0 and setpriv is None):
        raise IsolationError(
            f"setpriv and prlimit (util-linux) are needed: {config.setpriv!r}, {config.prlimit!r} not found"
        )
    return replace(config, bwrap=bwrap, setpriv=setpriv or config.setpriv, prlimit=prlimit)
