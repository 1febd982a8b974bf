"""Proving the jail holds, before the service listens: a harmless program runs through the jail exactly as a run
would (slot 0's uid, namespaces, seccomp filter, cgroups, rlimits, run filesystem) and reports what it sees; each
layer is checked and reported on its own (GET /health shows them), and the service refuses to start without the
layers the operator requires (--require). The named pythons are each tried once the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandbox_service.cgroups import CgroupReport, Cgroups
from sandbox_service.jail import (
    Isolation,
    IsolationError,
    JailCommand,
    JailConfig,
    Limits,
    PythonUnusable,
    check_uid_unused,
    resolve_tools,
    seccomp_program,
)
from sandbox_service.pythons import DEFAULT as DEFAULT_PYTHON
from sandbox_service.run_dir import JAIL_HOME, make_run_dir, remove_run_dir

_log = logging.getLogger(__name__)

LAYERS = ("uid", "namespaces", "seccomp", "cgroup", "rlimits", "shm", "disk")
_PROBE_LIMITS = Limits(wall_s=30.0, cpu_s=10.0, memory_mb=512, processes=16)
_MiB = 1 << 20

_PROBE = r"""
import ctypes, json, os, resource, socket
def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(path, ".probe"))
        return True
    except OSError:
        return False
def size(path):
    stat = os.statvfs(path)
    return [stat.f_blocks * stat.f_frsize, stat.f_files]
libc = ctypes.CDLL(None, use_errno=True)
status = open("/proc/self/status").read()
open("owner", "w").close()  # its owner, as the host sees it, is the program's real uid
print(json.dumps({
    "pid": os.getpid(), "interfaces": [n for _, n in socket.if_nameindex()],
    "root_writable": writable("/"), "home_writable": writable(os.environ["HOME"]),
    "new_user_namespace": libc.unshare(0x10000000) == 0, "ptrace": libc.ptrace(0, 0, 0, 0) == 0,
    "seccomp": int(status.split("Seccomp:")[1].split()[0]),
    "rlimits": {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n.upper()))[0]
                for n in ("cpu", "as", "nproc", "fsize", "nofile", "core")},
    "home": size("."), "tmp": size("/tmp"), "shm": size("/dev/shm"),
}))
"""


def run_once(
    config: JailConfig, level: str, program: Sequence[str], cgroups: Cgroups | None = None
) -> tuple[subprocess.CompletedProcess, int, int | None]:
    """Run `program` once in a fresh jail as slot 0 would: (the finished process, the host uid owning the run
    directory's file "owner" if the program made one, else -1, the slot's peak memory if it has a memory cgroup)."""
    uid = config.uid_base if level == "full" else None
    slot = cgroups.slot(0) if cgroups is not None else None
    with tempfile.TemporaryDirectory(prefix="fr_sandbox-probe-", dir=config.run_root) as tmp:
        os.chmod(tmp, 0o711)
        run = make_run_dir(Path(tmp), "run", uid, {}, config.disk if level == "full" else None)
        seccomp_fd = seccomp_program(config.seccomp) if config.seccomp and level != "none" else None
        try:
            if slot is not None:
                slot.set_limits(_PROBE_LIMITS.memory_mb * _MiB, _PROBE_LIMITS.processes + 2, _PROBE_LIMITS.cpus)
                slot.take_run_stats()
            command = JailCommand(config, level)
            env = command.env(run.home, program, {})
            argv = command.argv(
                uid,
                run,
                env,
                program,
                _PROBE_LIMITS,
                cgroup_tasks=slot.tasks_files() if slot is not None else (),
                as_pid_1=True,
                seccomp_fd=seccomp_fd,
            )
            bare = level == "none"
            done = subprocess.run(
                argv,
                capture_output=True,
                env=env if bare else {},
                cwd=run.home if bare else None,
                timeout=30,
                pass_fds=[seccomp_fd] if seccomp_fd is not None else [],
            )
            owner = run.home / "owner"
            peak = slot.take_run_stats()[1] if slot is not None else None
            return done, owner.stat().st_uid if owner.exists() else -1, peak
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
            remove_run_dir(run)


def probe_isolation(
    config: JailConfig, cgroups: Cgroups | None, report: CgroupReport, required: Sequence[str]
) -> Isolation:
    """Run a harmless program through the jail and check each layer; IsolationError if the jail does not hold or
    a required layer is not in force. With `config.insecure` a jail that does not work falls back to level "none"
    (plain subprocesses)."""
    try:
        return _probe(config, cgroups, report, required)
    except IsolationError as e:
        if not config.insecure:
            raise
        _log.warning("running WITHOUT isolation (--insecure): %s", e)
        return Isolation(
            "none",
            {
                "reason": str(e),
                "network": "host",
                "filesystem": "host",
                "rlimits": ["cpu", "as", "nproc", "fsize", "nofile", "core"],
                "layers": {layer: {"ok": False, "detail": "no jail (--insecure)"} for layer in LAYERS},
            },
        )


def probe_pythons(config: JailConfig, level: str) -> dict[str, str]:
    """{name: version} of the configured pythons, each run once in the jail as its unprivileged uid would run it;
    PythonUnusable names the first that does not run there and why."""
    who = {"full": f"unprivileged uid {config.uid_base}", "namespaces": f"uid {os.getuid()}"}.get(level, "service")
    versions = {}
    for name, path in config.pythons.items():
        alone = replace(config, pythons={DEFAULT_PYTHON: path})  # its binds only: a failure is this python's
        try:
            done, _, _ = run_once(alone, level, [path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PythonUnusable(f"python {name!r} ({path}) could not be tried in the jail: {e}") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
            raise PythonUnusable(
                f"python {name!r} ({path}) does not run in the jail as the {who}: {lines[-1]}; make it and the "
                "directories above it readable and executable by that uid (a python under /root is not)"
            )
        versions[name] = done.stdout.decode().strip()
    return versions


def _layers(
    config: JailConfig, seen: dict[str, Any], host_uid: int, peak: int | None, report: CgroupReport, as_root: bool
) -> dict[str, dict[str, Any]]:
    """Each layer: {"ok": in force as the probe saw it, "detail": what it is or why it is not}."""

    def layer(ok: bool, detail: str) -> dict[str, Any]:
        return {"ok": bool(ok), "detail": detail}

    limits, seen_limits = _PROBE_LIMITS, seen["rlimits"]
    expected = {
        "cpu": max(1, math.ceil(limits.cpu_s)),
        "as": limits.memory_mb * _MiB,
        "fsize": limits.file_size_mb * _MiB,
        "nofile": limits.open_files,
        "core": 0,
    }
    rlimits_ok = all(seen_limits[name] == value for name, value in expected.items()) and (
        limits.processes < seen_limits["nproc"] != resource.RLIM_INFINITY
    )
    shm_cap = (config.disk.megabytes if config.disk else config.tmp_size_mb) * _MiB
    jail_ns = seen["pid"] == 1 and seen["interfaces"] == ["lo"] and not seen["new_user_namespace"]
    layers = {
        "uid": layer(
            as_root and host_uid not in (0, -1),
            f"unprivileged per-slot uid {config.uid_base}+slot (the probe ran as {host_uid})"
            if as_root
            else f"the service's uid {os.getuid()} (not root)",
        ),
        "namespaces": layer(
            jail_ns and not seen["root_writable"] and seen["home_writable"],
            "user, pid, ipc, uts, net (own loopback only), mount, cgroup; no new user namespace; only "
            f"{JAIL_HOME} writable",
        ),
        "seccomp": layer(
            seen["seccomp"] == 2 and not seen["ptrace"],
            "filter mode: ptrace, mount, keyctl, bpf, perf_event_open, userfaultfd, kexec, modules, io_uring and "
            "namespace creation denied"
            if config.seccomp
            else "no filter: python3-seccomp (libseccomp's bindings) is not installed for /usr/bin/python3",
        ),
        "cgroup": layer(
            report.memory and report.pids and (peak or 0) > 0,
            f"{report.version}: memory {report.memory}, pids {report.pids}, cpu {report.cpu}"
            + (f" ({report.reason})" if report.reason else ""),
        ),
        "rlimits": layer(rlimits_ok, f"cpu, as, nproc, fsize, nofile, core (the probe saw {seen_limits})"),
        "shm": layer(0 < seen["shm"][0] <= shm_cap, f"/dev/shm of {seen['shm'][0] // _MiB} MiB"),
        "disk": layer(
            config.disk is not None
            and seen["home"] == [config.disk.megabytes * _MiB, config.disk.inodes]
            and seen["tmp"][0] == seen["home"][0],
            f"a tmpfs per run: {config.disk.megabytes} MiB and {config.disk.inodes} inodes, /tmp and /dev/shm included"
            if config.disk
            else "no quota: the run directory is on the host's disk (the service is not root)",
        ),
    }
    return layers


def _probe(config: JailConfig, cgroups: Cgroups | None, report: CgroupReport, required: Sequence[str]) -> Isolation:
    config = resolve_tools(config)
    as_root = os.geteuid() == 0
    level = "full" if as_root else "namespaces"
    if as_root:
        check_uid_unused(config.uid_base)
    try:
        done, host_uid, peak = run_once(config, level, [config.python, "-c", _PROBE], cgroups)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IsolationError(f"the jail did not run: {e}") from e
    if done.returncode != 0:
        raise IsolationError(
            f"the jail did not run (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}"
        )
    seen = json.loads(done.stdout.decode().strip().splitlines()[-1])
    layers = _layers(config, seen, host_uid, peak, report, as_root)
    missing = [f"{name} ({layers[name]['detail']})" for name in required if not layers[name]["ok"]]
    if missing:
        raise IsolationError("the jail does not hold as required: no " + "; no ".join(missing))
    version = subprocess.run([config.bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    return Isolation(
        level,
        {
            "bwrap": version,
            "uid": layers["uid"]["detail"],
            "namespaces": ["user", "pid", "ipc", "uts", "net", "mount", "cgroup"],
            "network": "none (own loopback only)",
            "filesystem": f"read-only /usr and /etc, only {JAIL_HOME} (and /tmp, /dev/shm) writable",
            "rlimits": ["cpu", "as", "nproc", "fsize", "nofile", "core"],
            "cgroup": report.__dict__,
            "layers": layers,
            "required": list(required),
        },
    )


def default_required() -> list[str]:
    """What the service always insists on: its own namespaces and rlimits, and as root an unprivileged uid."""
    return (["uid"] if os.geteuid() == 0 else []) + ["namespaces", "rlimits"]
