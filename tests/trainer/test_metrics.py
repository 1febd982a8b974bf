"""Monitoring pieces: the metrics log on resume, the jaxpr FLOP count behind MFU, the throughput figures."""

import time

import jax
import jax.numpy as jnp
import pytest

from fr_jax.trainer.metrics import MetricsWriter, Throughput, forward_flops, read_metrics


def test_resumed_writer_drops_steps_after_the_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=6, progress_bar=False, enabled=True)
    for step in range(1, 6):
        writer.scalars(step, {"loss": 10.0 - step})
    writer.close()
    # the run died after step 5 with its last checkpoint at 3: steps 4-5 will be redone
    writer = MetricsWriter(tmp_path, total_steps=6, start_step=3, progress_bar=False, enabled=True)
    writer.scalars(4, {"loss": 1.5})
    writer.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.5)]


def test_matmul_flops_count_scan_bodies_and_nested_calls():
    def f(w, x):
        y = jnp.einsum("bd,df->bf", x, w[0])  # 2*4*16*16
        y, _ = jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), y, w[1:])  # 3 x 2*4*16*16 (w[1:] is 16x16)
        return jax.jit(lambda a: a @ a.T)(y)  # 2*4*16*4, inside a nested jit

    w = jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)
    x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    assert forward_flops(f, w, x) == 2 * 4 * 16 * 16 + 3 * 2 * 4 * 16 * 16 + 2 * 4 * 16 * 4


def test_throughput_figures():
    meter = Throughput(flops_per_step=4e9, peak_flops_per_device=1e9, num_devices=2)
    time.sleep(0.2)
    m = meter.step(tokens=1000)
    assert 0.2 <= m["step_time_s"] < 1.0
    assert m["tokens_per_s"] == pytest.approx(1000 / m["step_time_s"])
    assert m["mfu"] == pytest.approx(4e9 / m["step_time_s"] / 2e9)
