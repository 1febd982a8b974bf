"""`python -m sandbox_service --host 127.0.0.1 --port 8080 [--workers N] [--max-queue M] [--worker NAME=URL ...]`.

Proves the jail holds with a harmless probe before it listens, and refuses to start without isolation unless
given --insecure. SIGTERM/SIGINT drain: no new runs, in-flight runs get --drain-timeout seconds.

Workflows (POST /workflow/run) may call only the worker LLMs allowlisted at start-up, by name:
  --worker local=http://127.0.0.1:30000/v1,model=smollm2 --worker big=https://api.example.com/v1,api_key_env=KEY
  --workers-file workers.json   # {"local": {"url": "http://127.0.0.1:30000/v1", "model": "...", "api_key_env": "..."}}
Without these flags the allowlist comes from $SANDBOX_WORKERS ("name=URL[,model=M];...") and $SANDBOX_WORKERS_FILE.

Requests may choose a python by name (`"python": "bcb"`), among those named at start-up, e.g. a virtual environment
with BigCodeBench's libraries; each must run in the jail as its unprivileged uid, which is tried before listening:
  --python bcb=/opt/bcb-venv/bin/python   # repeatable; `--python default=PATH` replaces /usr/bin/python3

A mistake in the flags, a port in use or out of range, a python the jail cannot run or a host that cannot jail
(exit code 2, the same as for refusing to start without isolation) is one line on stderr naming the problem and
the fix; --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import uvicorn

from sandbox_service.app import Service, ServiceSettings, create_app
from sandbox_service.cgroups import CgroupReport, Cgroups
from sandbox_service.jail import Isolation, IsolationError, JailConfig, PythonUnusable, claim_uid_block
from sandbox_service.probe import LAYERS, default_required, probe_isolation, probe_pythons
from sandbox_service.pythons import DEFAULT as DEFAULT_PYTHON
from sandbox_service.pythons import DEFAULT_PATH as DEFAULT_PYTHON_PATH
from sandbox_service.pythons import parse_pythons
from sandbox_service.run_dir import DiskQuota, private_mounts, sweep_stale
from sandbox_service.workers import WORKERS_ENV, WORKERS_FILE_ENV, WorkerEndpoint, load_workers, workers_from_env

SECCOMP_SOURCE = (Path(__file__).parent / "seccomp_filter.py").read_text()
AUTH_TOKEN_ENV = "SANDBOX_AUTH_TOKEN"  # set: every route but /health requires it as a bearer token


class StartupError(Exception):
    """The service cannot start as asked: the message names the problem and the fix, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage block, as one line
        self.exit(2, f"sandbox_service: {message}; see python -m sandbox_service --help\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m sandbox_service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help='write {"url", "pid"} here once the socket is bound')
    p.add_argument(
        "--workers",
        type=int,
        default=2 * len(os.sched_getaffinity(0)),
        help="concurrent jailed runs (default: 2 per core: a run also waits on namespace set-up, not only CPU)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="runs that may wait for a worker before 429")
    p.add_argument("--max-output-bytes", type=int, default=1 << 20, help="cap per stream; a run past it is killed")
    p.add_argument("--max-body-mb", type=int, default=32, help="larger request bodies get 413")
    p.add_argument("--default-memory-mb", type=int, default=1024, help="memory limit when a request gives -1")
    p.add_argument(
        "--run-disk-mb",
        type=int,
        default=256,
        help="disk a run may fill, /tmp and /dev/shm included (as root: a tmpfs of its own per run)",
    )
    p.add_argument("--run-inodes", type=int, default=10_000, help="files and directories a run may make (as root)")
    p.add_argument("--max-fetch-mb", type=int, default=16, help="bytes of fetch_files one run returns, all together")
    p.add_argument(
        "--max-eval-s", type=float, default=300.0, help="wall time of one evaluation, however many tests it has"
    )
    p.add_argument(
        "--harness-start-s",
        type=float,
        default=30.0,
        help="for the evaluation harness to start (a start that takes longer is retried, then 'could not judge')",
    )
    p.add_argument(
        "--worker-timeout-s",
        type=float,
        default=120.0,
        help="a worker call unanswered this long fails the run as the worker's fault (infrastructure)",
    )
    p.add_argument(
        "--max-workflow-wait-s",
        type=float,
        default=600.0,
        help="the most a workflow may wait on workers and jail slots beyond its own wall_s budget",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight runs get on shutdown")
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an interpreter requests may name (repeatable); 'default' (/usr/bin/python3 unless given) serves the rest",
    )
    p.add_argument(
        "--uid-base",
        type=int,
        help="worker slot i runs as uid UID_BASE+i (when root); default: the first "
        "block from 61000 that no other sandbox_service on this host holds",
    )
    p.add_argument("--run-root", type=Path, help="where run directories are made (default: the temp dir)")
    p.add_argument("--bwrap", default="bwrap", help="the bubblewrap binary")
    p.add_argument(
        "--ro-bind",
        action="append",
        default=[],
        metavar="PATH",
        help="extra host path to show read-only in the jail (e.g. a python outside /usr)",
    )
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME=URL[,model=M][,api_key_env=VAR]",
        help="a worker LLM (OpenAI-compatible base URL ending in /v1) that workflows may call by NAME; repeatable",
    )
    p.add_argument(
        "--workers-file",
        type=Path,
        metavar="FILE",
        help="JSON allowlist {name: {url, model?, api_key_env?}}; combines with --worker",
    )
    p.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="LAYER[,LAYER]",
        help=f"refuse to start unless these layers are in force ({', '.join(LAYERS)}, or all); always required: "
        "namespaces and rlimits, and as root uid",
    )
    p.add_argument("--insecure", action="store_true", help="run WITHOUT isolation if the jail cannot be set up")
    p.add_argument("--log-level", default="info")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error that stops the start")
    return p


class _DrainingServer(uvicorn.Server):
    """uvicorn, telling the service to drain as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_drain()
        super().handle_exit(sig, frame)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _listen(host: str, port: int) -> socket.socket:
    """The bound socket the server will listen on, taken before anything slow so that a port in use fails at once."""
    if not 0 <= port <= 65535:
        raise StartupError(f"--port {port} is out of range: give 1-65535, or 0 for a free port")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is in use (by another sandbox_service?): stop that process, or choose "
                "another --port (0 picks a free one)"
            ) from e
        if e.errno == errno.EACCES:
            raise StartupError(f"port {port} on {host} needs root: choose --port 1024 or above") from e
        raise StartupError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): give --host an address of this machine, "
            "such as 127.0.0.1"
        ) from e
    return sock


def _workers(args: argparse.Namespace) -> dict[str, WorkerEndpoint]:
    try:
        if args.worker or args.workers_file:
            return load_workers(args.worker, args.workers_file)
        return workers_from_env()
    except ValueError as e:
        raise StartupError(
            f"bad worker allowlist (--worker/--workers-file, or ${WORKERS_ENV}/${WORKERS_FILE_ENV}): {e}"
        ) from e


def _required(specs: list[str]) -> list[str]:
    asked = {layer.strip() for spec in specs for layer in spec.split(",") if layer.strip()}
    if "all" in asked:
        asked = set(LAYERS)
    unknown = sorted(asked - set(LAYERS))
    if unknown:
        raise StartupError(f"--require {','.join(unknown)}: the layers are {', '.join(LAYERS)}, or all")
    return [layer for layer in LAYERS if layer in asked or layer in default_required()]


def _seccomp_program(log: logging.Logger) -> bytes | None:
    """The syscall filter, built by the system python with libseccomp's bindings; None (and why, in the log) when
    it cannot be."""
    try:
        built = subprocess.run([DEFAULT_PYTHON_PATH, "-c", SECCOMP_SOURCE], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if getattr(e, "stderr", None) else e
        log.warning("no seccomp filter (apt-get install python3-seccomp): %s", detail)
        return None
    return built.stdout or None


def _jail(
    args: argparse.Namespace,
    pythons: dict[str, str],
    cgroups: Cgroups | None,
    cgroup_report: CgroupReport,
    required: list[str],
    seccomp: bytes | None,
) -> tuple[JailConfig, Isolation, dict[str, str]]:
    """The jail's config, the isolation level it proved, and the version of each python tried in it."""
    try:
        uid_base = args.uid_base or 61000
        if os.geteuid() == 0:
            uid_base, _lock_fd = claim_uid_block(args.workers, args.uid_base)  # the fd stays open: the block is ours
        config = JailConfig(
            pythons=pythons,
            bwrap=args.bwrap,
            uid_base=uid_base,
            run_root=args.run_root,
            extra_ro_binds=tuple(args.ro_bind),
            insecure=args.insecure,
            disk=DiskQuota(args.run_disk_mb, args.run_inodes) if os.geteuid() == 0 else None,
            max_fetch_bytes=args.max_fetch_mb << 20,
            seccomp=seccomp,
        )
        probed = replace(config, pythons={DEFAULT_PYTHON: config.python})
        isolation = probe_isolation(probed, cgroups, cgroup_report, required)
        if isolation.level == "none" and (asked := sorted(set(required) - set(default_required()))):
            raise IsolationError(  # --insecure waives the defaults, not the layers the operator asked for
                f"{', '.join(asked)} required, but the jail does not run ({isolation.detail['reason']})"
            )
        return config, isolation, probe_pythons(config, isolation.level)
    except PythonUnusable as e:
        raise StartupError(f"refuses to start: {e}") from e
    except IsolationError as e:
        raise StartupError(
            f"refuses to start: {e}. Fix the host (see README: bubblewrap, python3-seccomp, run as root for "
            "per-run uids and cgroups), or pass --insecure to run code WITHOUT isolation (never on a shared machine)"
        ) from e


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _serve(args)
    except StartupError as e:
        if args.debug:
            traceback.print_exc()
        print(f"sandbox_service: {_one_line(e)}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    log = logging.getLogger("sandbox_service")
    if args.workers < 1 or args.max_queue < 0:
        raise StartupError(
            f"--workers {args.workers} --max-queue {args.max_queue}: give at least 1 worker and a queue of 0 or more"
        )
    if min(args.run_disk_mb, args.run_inodes, args.max_fetch_mb, args.max_eval_s, args.worker_timeout_s) <= 0:
        raise StartupError(
            "--run-disk-mb, --run-inodes, --max-fetch-mb, --max-eval-s and --worker-timeout-s must be positive"
        )
    workers = _workers(args)
    required = _required(args.require)
    try:
        pythons = parse_pythons(args.python)
    except ValueError as e:
        raise StartupError(f"bad python: {e}") from e
    sock = _listen(args.host, args.port)
    if os.geteuid() == 0 and not private_mounts():
        sock.close()
        raise StartupError("cannot make a private mount namespace for the runs' filesystems (is this root?)")
    cgroups, cgroup_report = Cgroups.detect()
    try:
        config, isolation, versions = _jail(
            args, pythons, cgroups, cgroup_report, required, _seccomp_program(log) if not args.insecure else None
        )
    except StartupError:
        sock.close()
        if cgroups is not None:
            cgroups.remove()
        raise
    if swept := sweep_stale(args.run_root):
        log.info("removed the run directories of %d sandbox services that are gone", swept)
    service = Service(
        ServiceSettings(
            workers=args.workers,
            max_queue=args.max_queue,
            max_output_bytes=args.max_output_bytes,
            max_body_bytes=args.max_body_mb << 20,
            default_memory_mb=args.default_memory_mb,
            drain_timeout_s=args.drain_timeout,
            max_eval_s=args.max_eval_s,
            worker_timeout_s=args.worker_timeout_s,
            max_workflow_wait_s=args.max_workflow_wait_s,
            harness_start_s=args.harness_start_s,
            auth_token=os.environ.get(AUTH_TOKEN_ENV) or None,
        ),
        config,
        isolation,
        cgroups,
    )
    log.info("isolation: %s %s", isolation.level, json.dumps(isolation.detail))
    log.info("pythons: %s", ", ".join(f"{name}={pythons[name]} ({version})" for name, version in versions.items()))
    if isolation.level == "none":
        log.warning("NO ISOLATION: jailed code runs as a plain subprocess with the service's rights")
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    if args.port_file:
        try:
            args.port_file.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        except OSError as e:
            raise StartupError(f"cannot write --port-file {args.port_file}: {e.strerror or e}") from e
    log.info("listening on %s with %d workers, queue %d", url, args.workers, args.max_queue)
    log.info(
        "workflow worker allowlist: %s",
        ", ".join(f"{w.name}={w.url}" for w in workers.values())
        or "(empty: POST /workflow/run answers worker_not_allowed)",
    )
    server = _DrainingServer(
        uvicorn.Config(
            create_app(service, workers),
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(args.drain_timeout) + 10,
        ),
        service,
    )
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
