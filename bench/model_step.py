"""Forward+backward tokens/s of the fr_jax Decoder vs transformers+torch, same config, weights, batch, fp32.

Both sides compute the mean next-token cross-entropy and its gradient w.r.t. every parameter (with --adamw, also
an AdamW update). The weights are identical (copied through fr_jax's HF loader), and the first step's losses are
printed side by side as a check that both compute the same thing. MFU is against this machine's measured peak:
a jitted 2048^3 fp32 matmul (8192^3 in the compute dtype off CPU), or --peak-tflops (a vendor figure).

    python bench/model_step.py                       # SmolLM2-135M config and a tiny Qwen2, batch 4 x 256
    python bench/model_step.py --models smollm2 --batch 8 --seq 512 --steps 5 --adamw
    python bench/model_step.py --models qwen2.5-0.5b --dtype bfloat16 --no-torch --peak-tflops 989   # an H100 SXM
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from fr_jax.models.config import ModelConfig
from fr_jax.models.hf import load_pretrained
from fr_jax.parallel.mesh import make_mesh
from fr_jax.trainer.metrics import measure_peak_flops

CONFIGS = {
    # SmolLM2-135M's config.json values (a Llama)
    "smollm2": lambda: transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # Qwen2.5-0.5B's config.json values, random weights (the GPU check's MFU: --dtype bfloat16 --no-torch)
    "qwen2.5-0.5b": lambda: transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "qwen-tiny": lambda: transformers.Qwen2Config(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Forward+backward FLOPs: 6 per matmul weight per token (LM head included) + attention counted as full T x T."""
    d, h, kv, hd, f = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
    matmul_params = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size
    attention = 12 * cfg.num_hidden_layers * h * hd * seq
    return batch * seq * (6 * matmul_params + attention)


def time_interleaved(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each side, the sides alternating step by step so that a change in the load
    of a shared machine hits both alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def torch_side(hf_model, ids: np.ndarray, adamw: bool):
    hf_model.train()
    inputs = torch.tensor(ids)
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-5) if adamw else None
    losses = []

    def step():
        loss = hf_model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        if opt is not None:
            opt.step()
        hf_model.zero_grad(set_to_none=False)
        losses.append(loss.item())

    return step, losses


def jax_side(model, ids: np.ndarray, adamw: bool):
    b, t = ids.shape
    input_ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = jnp.ones((b, t), jnp.int32)

    # next-token labels; the last position has none and gets weight 0 (cheaper than slicing the logits)
    labels = jnp.roll(input_ids, -1, axis=1)
    weights = jnp.broadcast_to(jnp.arange(t) < t - 1, (b, t)).astype(jnp.float32)

    def loss_fn(m):
        logits = m(input_ids, positions, segment_ids)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    losses = []
    if adamw:
        optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)

        @nnx.jit(donate_argnums=(0, 1))
        def train_step(m, opt):
            loss, grads = nnx.value_and_grad(loss_fn)(m)
            opt.update(m, grads)
            return loss

        def step():
            losses.append(float(train_step(model, optimizer)))
    else:
        grad_step = nnx.jit(nnx.value_and_grad(loss_fn))

        def step():
            loss, grads = grad_step(model)
            jax.block_until_ready(grads)
            losses.append(float(loss))

    return step, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,qwen-tiny", help=f"comma list from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--adamw", action="store_true", help="include an AdamW update in each step")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="fr_jax compute dtype")
    parser.add_argument("--no-torch", action="store_true", help="fr_jax alone (no transformers+torch baseline)")
    parser.add_argument("--peak-tflops", type=float, help="MFU against this per-device peak (default: measured)")
    args = parser.parse_args()
    if args.dtype != "float32" and not args.no_torch:
        parser.error("the torch baseline is fp32 only: add --no-torch to --dtype bfloat16")

    torch.set_num_threads(os.cpu_count())
    size = 2048 if jax.devices()[0].platform == "cpu" else 8192
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "given"
    else:
        peak = measure_peak_flops(jnp.dtype(args.dtype), size, repeats=10)
        source = f"jitted {size}^3 matmul, best of 10"
    print(
        f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}; {args.dtype} peak ({source}): {peak / 1e9:.1f} GFLOP/s"
    )
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        hf_config = CONFIGS[name]()
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            model = load_pretrained(tmp, mesh=mesh, remat=args.remat, dtype=args.dtype)
        cfg = model.cfg
        ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
        tokens = args.batch * args.seq
        flops = step_flops(cfg, args.batch, args.seq)

        steps = {}  # side -> one step
        if not args.no_torch:
            steps["transformers+torch"], torch_losses = torch_side(hf_model, ids, args.adamw)
            steps["transformers+torch"]()
        with jax.set_mesh(mesh):
            steps["fr_jax"], jax_losses = jax_side(model, ids, args.adamw)
            t = time.perf_counter()
            steps["fr_jax"]()
            compile_s = time.perf_counter() - t
            seconds = time_interleaved(steps, args.steps, args.warmup)
        what = "fwd+bwd+AdamW" if args.adamw else "fwd+bwd"
        print(
            f"\n[{name}] {what}, batch {args.batch} x {args.seq}, {args.dtype}, "
            f"{sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M params, {flops / 1e9:.0f} GFLOP/step"
        )
        torch_loss = "" if args.no_torch else f"torch {torch_losses[0]:.6f} (same weights and batch)   "
        print(f"  first-step loss   {torch_loss}fr_jax {jax_losses[0]:.6f}")
        for label, sec in seconds.items():
            print(
                f"  {label:<19} {tokens / sec:9.1f} tokens/s  {sec * 1e3:8.1f} ms/step  MFU {flops / sec / peak:6.1%}"
            )
        print(f"  fr_jax compile+first step {compile_s:.1f} s")
        if args.no_torch:
            rows.append((name, f"MFU {flops / seconds['fr_jax'] / peak:.1%}"))
            continue
        ratio = seconds["transformers+torch"] / seconds["fr_jax"]
        print(f"  ratio fr_jax / torch: {ratio:.2f}x")
        rows.append((name, f"{ratio:.2f}x torch"))
    print(f"\nsummary (load average now {os.getloadavg()[0]:.1f}): " + ", ".join(f"{n} {r}" for n, r in rows))


if __name__ == "__main__":
    main()
