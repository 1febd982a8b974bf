"""The device mesh (data, fsdp, tensor) and multi-process start-up."""

from __future__ import annotations

import logging
import math
import os
import pathlib

import jax
from jax.sharding import AxisType, Mesh

from fr_jax.parallel.rules import MESH_AXES

_log = logging.getLogger(__name__)


def resolve_axis_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fill in the one axis given as -1 with "the rest"; refuse a mesh the devices cannot form."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: each axis size must be a positive integer or -1 (the rest)")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes} (product {fixed})"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are {num_devices} devices"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (global) devices, with Auto axis types so jit propagates shardings."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_axis_sizes(data, fsdp, tensor, len(devices))
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    _log.info("mesh %s over %d devices (%s)", dict(zip(MESH_AXES, shape)), len(devices), devices[0].platform)
    return mesh


def on_cloud_tpu() -> bool:
    """A Cloud TPU VM, told without starting a JAX backend: its environment or its TPU device files."""
    if os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        return True
    return any(pathlib.Path(device).exists() for device in ("/dev/accel0", "/dev/vfio/0"))


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> None:
    """Join a multi-process run. Arguments fall back to FR_JAX_COORDINATOR / FR_JAX_NUM_PROCESSES / FR_JAX_PROCESS_ID.

    On a Cloud TPU VM jax.distributed.initialize() is always called, with no arguments (JAX finds the slice's
    coordinator and process ids); elsewhere a missing coordinator with a single process is a single-process run.
    """
    coordinator = coordinator or os.environ.get("FR_JAX_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("FR_JAX_NUM_PROCESSES", "0")) or None
    if process_id is None and "FR_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["FR_JAX_PROCESS_ID"])
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if coordinator is None and (num_processes or 1) == 1:
        if not on_cloud_tpu():
            return
        jax.distributed.initialize()  # as JAX asks on TPU, before any computation: it finds the slice itself
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    _log.info(
        "process %d/%d joined %s: %d global devices",
        jax.process_index(),
        jax.process_count(),
        coordinator,
        jax.device_count(),
    )
