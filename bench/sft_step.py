"""SFT training throughput: fr_jax's jitted step vs a plain torch + transformers AdamW loop, side by side.

Same model (SmolLM2-135M-Instruct, its real weights), same batch of B x T token ids, fp32, AdamW with
global-norm clipping, on this machine's CPU (fr_jax on one XLA device, torch with its default threads).
Each side runs warm-up steps first (compilation / allocator warm-up), then `--steps` timed steps, the two
alternating step by step so that other load on the machine hits both alike; medians and best steps are
compared (on a shared machine the best steps are the least disturbed).

    python bench/sft_step.py [--batch 4] [--seq 256] [--steps 5]

Prints tokens/s for both and the ratio fr_jax / torch (> 1: fr_jax is faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from fr_jax.config import OptimSection
from fr_jax.models.gguf import smollm2_hf_dir
from fr_jax.models.hf import load_pretrained
from fr_jax.parallel.mesh import make_mesh
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.sft import sft_loss
from fr_jax.trainer.step import TrainStep

OPTIM = OptimSection(learning_rate=1e-5, warmup_steps=0, decay="constant", weight_decay=0.01, clip_grad_norm=1.0)


def jax_stepper(model_dir, ids: np.ndarray, total_steps: int) -> Callable[[], float]:
    """One fr_jax optimizer step per call (returns its loss, after the device finished)."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = load_pretrained(model_dir, mesh=mesh)
    optimizer, schedule = build_optimizer(OPTIM, total_steps)
    step = TrainStep(model, sft_loss, optimizer, mesh=mesh, learning_rate_fn=schedule)
    state = step.init_state(nnx.to_pure_dict(nnx.state(model)), seed=0)
    del model
    b, t = ids.shape
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0  # the last token has no next token: same T - 1 predictions per row as transformers' labels
    batch = step.put_local_batch(
        {
            k: v[None]
            for k, v in {
                "input_ids": ids,
                "targets": np.roll(ids, -1, axis=1),
                "loss_mask": mask,
                "segment_ids": np.ones((b, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            }.items()
        }
    )
    holder = {"state": state}

    def one_step() -> float:
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])

    return one_step


def torch_stepper(model_dir, ids: np.ndarray) -> Callable[[], float]:
    """One plain torch + transformers AdamW step per call (the usual loop, same clipping and decay groups)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in OPTIM.no_decay)]
    no_decay = [p for n, p in model.named_parameters() if any(k in n for k in OPTIM.no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIM.learning_rate,
        betas=(OPTIM.b1, OPTIM.b2),
        eps=OPTIM.eps,
    )
    input_ids = torch.from_numpy(ids.astype(np.int64))

    def one_step() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return one_step


def timed(one_step: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    loss = one_step()
    return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    model_dir = smollm2_hf_dir()
    vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    print(
        f"SFT step, SmolLM2-135M fp32, batch {args.batch} x {args.seq} tokens, AdamW + clipping, "
        f"{args.steps} timed steps after {args.warmup} warm-up, CPU ({jax.devices()[0].device_kind})"
    )
    ours, theirs = jax_stepper(model_dir, ids, args.steps + args.warmup), torch_stepper(model_dir, ids)
    for _ in range(args.warmup):
        ours(), theirs()
    # alternate the two so that load from anything else on the machine hits both alike
    jax_times, torch_times = [], []
    for i in range(args.steps):
        (t_ours, loss_ours), (t_theirs, loss_theirs) = timed(ours), timed(theirs)
        jax_times.append(t_ours)
        torch_times.append(t_theirs)
        print(
            f"  step {i}: fr_jax {t_ours:.2f}s (loss {loss_ours:.4f}) | torch {t_theirs:.2f}s (loss {loss_theirs:.4f})"
        )
    tokens = ids.size
    for name, pick in (("medians", np.median), ("best steps", np.min)):
        ours_tps, theirs_tps = tokens / pick(jax_times), tokens / pick(torch_times)
        print(
            f"{name}: fr_jax {ours_tps:.1f} tokens/s | torch+transformers {theirs_tps:.1f} tokens/s "
            f"({torch.get_num_threads()} threads) | ratio fr_jax/torch {ours_tps / theirs_tps:.2f}x"
        )


if __name__ == "__main__":
    main()
