"""The decoder: one Flax NNX module for Qwen2/Qwen2.5 (QKV bias), Qwen3 (per-head q/k RMSNorm) and Llama (SmolLM2).

The contract the rest of fr_jax relies on:
- `Decoder(cfg, rngs=...)(input_ids, positions, segment_ids) -> float32 logits [B, T, V]`: the training path.
  Token i sees token j iff j <= i and segment_ids[i] == segment_ids[j] != 0, so packed and padded batches work;
  segment 0 is padding (finite garbage logits there).
- `Decoder.init_cache(batch_size, max_len) -> KVCache` and
  `Decoder.decode(input_ids, positions, cache, cache_index, kv_mask) -> (logits, KVCache)`: the generation path
  for left-padded batches (prefill when T > 1, one step when T == 1). The T new tokens' K/V go to slots
  [cache_index, cache_index + T); query t of row b sees slot s iff kv_mask[b, s] and s <= cache_index + t.
  cache_index is one slot for every row, or one per row ([B]: rows at different lengths, continuous batching).
- `create_model(cfg, mesh=..., rngs_seed=0)`: random init, each parameter created directly with its sharding.
- `param_shardings(model, mesh)`: an nnx.State of NamedSharding, from each parameter's logical axes.
Additions: the cache holds one [B, kv_heads, max_len, head_dim] array per layer in the compute dtype (`cache_index`
may be a traced int32); `Decoder.hidden_states(...)` returns the last hidden states before the final norm, and
`Decoder.logits(hidden)` turns (some of) them into logits; `Decoder.unstacked()` is a copy with one Block per
layer, for decoding; `abstract_model(cfg)` is the Decoder with ShapeDtypeStruct leaves; `logical_axes(model)`
gives every parameter's logical axis names.

Parameters carry their logical axis names in the `out_sharding` metadata (flax's own field, so nnx tooling sees
them); fr_jax.parallel.rules turns them into mesh shardings. Flax's eager sharding is off for them because flax
would read the logical names as mesh axes. Layers are created stacked with nnx.vmap (a leading "layers" axis)
and run with nnx.scan, so a 48-layer model compiles one layer. Decoding instead runs the layers one after the other
(MaxText's scan_layers=False for inference): a decode step is bound by reading weights, and a scan over stacked
weights copies each layer's slice at every step.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fr_jax.models.config import ModelConfig, rope_inverse_frequencies
from fr_jax.parallel.rules import constrain, named_sharding

_NEG_INF = -1e30  # a fully masked row (padding) then softmaxes to finite uniform weights, never NaN
CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, recompute attention
}


class KVCache(NamedTuple):
    """Keys and values, one [B, kv_heads, max_len, head_dim] array per layer. Separate arrays are updated in place
    by a decode step; slicing one stacked array would copy the layer's slice. Heads before length, so attention
    reads each head's keys as one contiguous matrix."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


_normal = jax.nn.initializers.normal(0.02)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with the statistics in float32 (as transformers does), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim/2] for per-token positions (RoPE scaling folded into the frequencies)."""
    inv_freq, attention_factor = rope_inverse_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(np.asarray(inv_freq, np.float32))
    return (jnp.cos(angles) * attention_factor).astype(dtype), (jnp.sin(angles) * attention_factor).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (transformers' layout) on x [B, T, heads, head_dim]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without repeating K/V: q [B,T,H,D], k/v [B,K,S,D], mask [B,T,S] -> [B,T,H,D].

    Query heads h = kv_head * group + g (transformers' repeat_kv order). Each KV head's queries are laid out as
    one [T*group, D] matrix, so both products are plain batched matmuls whose gradients XLA computes without
    transposing score-sized arrays. Scores and softmax in float32.
    """
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    group = h // kv_heads
    q = q * jnp.asarray(d**-0.5, q.dtype)
    q = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * group, d)
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, kv_heads, t, group, s), _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, t * group, s)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(b, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def training_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, chunk: int) -> jax.Array:
    """Causal attention within segments (segment 0 is padding) for q [B,T,H,D], k/v [B,T,K,D] -> [B,T,H,D].

    With 0 < chunk < T and T a multiple of chunk, the queries go `chunk` rows at a time and each block is
    rematerialised: the backward pass keeps no [T, T] scores or mask, only its inputs, and recomputes one block's
    [chunk, T] at a time. Same products, so the same result (to rounding) as one block.
    """
    t = q.shape[1]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    key_positions = jnp.arange(t)
    key_ok = segment_ids != 0

    def rows(q_rows, row_positions, row_segments):
        mask = (
            (row_positions[:, None] >= key_positions[None, :])[None]
            & (row_segments[:, :, None] == segment_ids[:, None, :])
            & key_ok[:, None, :]
        )
        return attention(q_rows, k, v, mask)

    if not 0 < chunk < t or t % chunk:
        return rows(q, key_positions, segment_ids)
    blocks = t // chunk

    def split(x, axis):  # the blocks become a leading axis to map over
        return jnp.moveaxis(x.reshape(*x.shape[:axis], blocks, chunk, *x.shape[axis + 1 :]), axis, 0)

    out = jax.lax.map(jax.checkpoint(lambda a: rows(*a)), (split(q, 1), split(key_positions, 0), split(segment_ids, 1)))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """x [..., *in] @ w [*in, *out] as one 2-D matmul over flattened tokens.

    With the tokens flattened, the weight gradient contracts a single dimension and XLA computes it without
    transposing the activations (a batched [B, T, ...] contraction costs a transpose per projection). Products
    accumulate in float32 whatever the compute dtype.
    """
    fan_in = math.prod(w.shape[:in_dims])
    lead = x.shape[: x.ndim - in_dims]
    y = jnp.dot(x.reshape(-1, fan_in), w.reshape(fan_in, -1), preferred_element_type=jnp.float32).astype(x.dtype)
    return y.reshape(*lead, *w.shape[in_dims:])


class Block(nnx.Module):
    """One pre-norm decoder layer: RMSNorm -> GQA attention -> residual -> RMSNorm -> SwiGLU MLP -> residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd, f = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        p = functools.partial(_param, rngs, dtype=jnp.dtype(cfg.param_dtype))
        self.input_norm = p(_ones, (d,), ("norm",))
        self.q_proj = p(_normal, (d, h, hd), ("embed", "heads", "head_dim"))
        self.k_proj = p(_normal, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = p(_normal, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.o_proj = p(_normal, (h, hd, d), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = p(_zeros, (h, hd), ("heads", "head_dim"))
            self.k_bias = p(_zeros, (kv, hd), ("kv_heads", "head_dim"))
            self.v_bias = p(_zeros, (kv, hd), ("kv_heads", "head_dim"))
        if cfg.o_proj_bias:
            self.o_bias = p(_zeros, (d,), ("norm",))  # "norm": a small replicated vector over the hidden size
        if cfg.qk_norm:
            self.q_norm = p(_ones, (hd,), ("norm",))
            self.k_norm = p(_ones, (hd,), ("norm",))
        self.post_attention_norm = p(_ones, (d,), ("norm",))
        self.gate_proj = p(_normal, (d, f), ("embed", "mlp"))
        self.up_proj = p(_normal, (d, f), ("embed", "mlp"))
        self.down_proj = p(_normal, (f, d), ("mlp", "embed"))

    def _w(self, name: str) -> jax.Array:
        return getattr(self, name)[...].astype(self.cfg.dtype)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        cfg = self.cfg
        h = rms_norm(x, self.input_norm[...], cfg.rms_norm_eps)
        q, k, v = (dense(h, self._w(name)) for name in ("q_proj", "k_proj", "v_proj"))
        if cfg.qkv_bias:
            q, k, v = q + self._w("q_bias"), k + self._w("k_bias"), v + self._w("v_bias")
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = constrain(apply_rotary(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(apply_rotary(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        return q, k, v

    def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Output projection, residual, and the MLP half of the layer."""
        cfg = self.cfg
        out = dense(attn, self._w("o_proj"), in_dims=2)
        if cfg.o_proj_bias:
            out = out + self._w("o_bias")
        x = constrain(x + out, ("batch", "length", "act_embed"))
        h = rms_norm(x, self.post_attention_norm[...], cfg.rms_norm_eps)
        gate, up = dense(h, self._w("gate_proj")), dense(h, self._w("up_proj"))
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        x = x + dense(hidden, self._w("down_proj"))
        return constrain(x, ("batch", "length", "act_embed"))


def _maybe_remat(fn, remat: str):
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=_REMAT_POLICIES[remat], prevent_cse=False)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, _normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = _param(rngs, _ones, (cfg.hidden_size,), ("norm",), pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, _normal, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [B, T, V] of hidden states [B, T, D] (final norm, then the output head): callers that
        need only some positions (the GRPO update: the responses) pass just those."""
        cfg = self.cfg
        b, t, d = hidden.shape
        x = rms_norm(hidden, self.final_norm[...], cfg.rms_norm_eps).reshape(b * t, d)  # 2-D: see `dense`
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("nd,vd->nv", x, self.embed[...].astype(cfg.dtype), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("nd,dv->nv", x, self.lm_head[...].astype(cfg.dtype), preferred_element_type=jnp.float32)
        return constrain(logits.reshape(b, t, -1), ("batch", "length", "act_vocab"))

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """The final-layer hidden states [B, T, D] before the last norm (for losses that chunk the vocab)."""
        cfg = self.cfg
        cos, sin = rotary(cfg, positions, cfg.dtype)

        def layer(block: Block, x):
            q, k, v = block.qkv(x, cos, sin)
            return block.finish(x, training_attention(q, k, v, segment_ids, cfg.attention_chunk))

        layer = _maybe_remat(layer, cfg.remat)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x):
            return layer(block, x)

        return run(self.layers, self._embed(input_ids))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def blocks(self) -> list[Block]:
        """The layers one by one: the separate Blocks of an `unstacked` copy, or slices of the stacked weights."""
        if isinstance(self.layers, nnx.List):
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(self.cfg.num_hidden_layers)
        ]

    def unstacked(self, *, consume: bool = False) -> Decoder:
        """A copy (sharing every array but the layers') with one Block per layer, each parameter its own array and
        its logical axes without "layers": what decoding wants (module docstring). Not for training or saving.

        consume=True frees each stacked parameter as soon as it is sliced, so that unstacking needs one parameter
        of extra memory, not a second copy of the layers; this model is then unusable.
        """
        graphdef, state = nnx.split(self)
        copy = nnx.merge(graphdef, state)
        layer_graphdef, stacked = nnx.split(self.layers)
        per_layer = [[] for _ in range(self.cfg.num_hidden_layers)]
        for path, var in nnx.to_flat_state(stacked):
            value, axes = var.get_value(), var.get_metadata()["out_sharding"]
            for layer, items in enumerate(per_layer):
                items.append((path, var.replace(value[layer], out_sharding=axes[1:])))
            if consume:
                value.delete()
        copy.layers = nnx.List([nnx.merge(layer_graphdef, nnx.from_flat_state(items)) for items in per_layer])
        return copy

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        cfg = self.cfg
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return KVCache(
            *(
                tuple(constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES) for _ in range(cfg.num_hidden_layers))
                for _ in range(2)
            )
        )

    def decode(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, cache_index: jax.Array, kv_mask: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.cfg
        t = input_ids.shape[1]
        max_len = cache.k[0].shape[2]
        cache_index = jnp.asarray(cache_index, jnp.int32)
        cos, sin = rotary(cfg, positions, cfg.dtype)
        query_slot = jnp.broadcast_to(cache_index[..., None] + jnp.arange(t, dtype=jnp.int32), (input_ids.shape[0], t))
        mask = kv_mask[:, None, :] & (jnp.arange(max_len, dtype=jnp.int32)[None, None, :] <= query_slot[:, :, None])
        x = self._embed(input_ids)
        new_k, new_v = [], []
        for block, layer_k, layer_v in zip(self.blocks(), cache.k, cache.v, strict=True):
            q, k, v = block.qkv(x, cos, sin)
            layer_k = constrain(
                _write_kv(layer_k, k.transpose(0, 2, 1, 3).astype(layer_k.dtype), cache_index), CACHE_AXES
            )
            layer_v = constrain(
                _write_kv(layer_v, v.transpose(0, 2, 1, 3).astype(layer_v.dtype), cache_index), CACHE_AXES
            )
            x = block.finish(x, attention(q, layer_k, layer_v, mask))
            new_k.append(layer_k)
            new_v.append(layer_v)
        return self.logits(x), KVCache(tuple(new_k), tuple(new_v))


def _write_kv(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """new [B, K, T, D] into cache [B, K, S, D] from slot `index` on: one slot for all rows (an in-place slice
    update), or one per row (a scatter)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))(cache, new, index)


def logical_axes(model: nnx.Module) -> nnx.State:
    """The logical axis names (a tuple per parameter) of every parameter, as an nnx.State."""
    return jax.tree.map(
        lambda v: v.get_metadata()["out_sharding"],
        nnx.state(model, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def param_shardings(model: nnx.Module, mesh) -> nnx.State:
    """An nnx.State of NamedSharding for the model's parameters, from their logical axes via rules.py."""
    return jax.tree.map(
        lambda v: named_sharding(mesh, v.shape, v.get_metadata()["out_sharding"]),
        nnx.state(model, nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The Decoder with ShapeDtypeStruct leaves: its structure and metadata, no memory."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def create_model(cfg: ModelConfig, *, mesh, rngs_seed: int = 0) -> Decoder:
    """A randomly initialised Decoder whose parameters are created already sharded over `mesh`."""
    abstract = abstract_model(cfg)
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Decoder(cfg, rngs=nnx.Rngs(rngs_seed)), nnx.Param)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)
