"""The optimizer: global-norm clipping, then AdamW under linear warmup + cosine decay."""

from __future__ import annotations

import jax
import optax

from fr_jax.config import OptimSection


def learning_rate_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine to `min_lr_ratio * learning_rate` at `total_steps`."""
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def decay_mask(params, no_decay: tuple[str, ...]):
    """True for parameters that get weight decay: those whose path names none of `no_decay` (norms, biases)."""

    def wants_decay(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not any(part in name for part in no_decay)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def build_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg.no_decay),
    )
    if cfg.clip_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), adamw), schedule
