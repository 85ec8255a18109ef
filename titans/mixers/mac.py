"""`mac`: memory as context (spec section 4).

The sequence is cut into segments of `C = segment_len` tokens. In segment `s` (positions
`p0 .. p0 + C - 1`), with `x` the normed block input and `M_{s-1}` the memory weights left by the
previous segments:

    q_r = l2norm(SiLU(conv(x @ W_r)))               retrieval query, [seq, mem_heads, mem_dim]
    h   = M_{s-1}(q_r)                               retrieval only (no write), heads merged
    kv  = [persistent | (W_kh h, W_vh h) | (W_kx x, W_vx x)]   h_i, x_i both at RoPE position p0 + i
    y   = Attn(q = W_q x; query i sees the persistent slots and h_j, x_j for j <= i of its segment)
    m, M = memory.scan(y)                            writes; m is read after each write
    o   = (y * sigmoid(RMSNorm(m))) @ W_o

A query never sees a retrieval made from a later token: `h_j` uses `M_{s-1}` (earlier segments
only) and the query at `j`, and attention admits `h_j` only for `j <= i`. The causal convolutions
run across segment boundaries (their tails are carried); only attention is segment-local.

Streaming state (`MACState`): the memory layer's state, `M_{s-1}`, the retrieval conv tail and the
post-RoPE keys/values of the current segment so far (`[batch, 2C, heads, dim]`: `h` then `x`). A
call processes `plan`, its length split at segment boundaries (`segment_plan`); pieces that are
whole segments run as one `lax.scan`, so the training pass compiles one segment step.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.memory.common import memory_apply
from kernels.attention.blockwise import attend
from titans.attention import apply_rope, persistent_slots, rope_angles
from titans.conv import ConvProjection
from titans.layers import RMSNorm, dense, l2_normalize
from titans.memory_layer import MemoryLayerState, NeuralMemory


def segment_plan(start: int, length: int, segment_len: int) -> tuple[int, ...]:
    """Split `length` tokens starting at absolute position `start` at every multiple of `segment_len`."""
    plan, offset = [], start % segment_len
    while length > 0:
        n = min(length, segment_len - offset)
        plan.append(n)
        length, offset = length - n, 0
    return tuple(plan)


class MACState(NamedTuple):
    memory: MemoryLayerState  # the running memory (weights, momentum, anchor, offset) and its conv tails
    segment_weights: tuple[jax.Array, ...]  # M_{s-1}, each [batch, mem_heads, in, out]
    retrieval_tail: jax.Array  # [batch, conv_kernel - 1, mem_heads * mem_dim]
    keys: jax.Array  # [batch, 2C, heads, dim]: h keys at 0..C-1, x keys at C..2C-1 (segment index)
    values: jax.Array


class MAC(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
        width = cfg.attn_width
        self.norm = RMSNorm(cfg.d_model, **kw)
        self.retrieval = ConvProjection(cfg.d_model, cfg.mem_width, kernel=cfg.conv_kernel, **kw)
        self.q_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.kx_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.vx_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.kh_proj = dense(cfg.mem_width, width, ("heads", "heads"), **kw)
        self.vh_proj = dense(cfg.mem_width, width, ("heads", "heads"), **kw)
        self.persistent_k, self.persistent_v = persistent_slots(cfg.n_persistent, cfg.attn_heads, cfg.head_dim,
                                                                cfg.params_dtype, rngs)
        self.memory = NeuralMemory(cfg.memory_config(d_model=width), rngs=rngs)
        self.memory_norm = RMSNorm(cfg.mem_width, name="heads", **kw)
        self.out_proj = dense(width, cfg.d_model, ("heads", "embed"), **kw)

    def init_state(self, batch_size: int) -> MACState:
        cfg = self.cfg
        memory = self.memory.init_state(batch_size)
        kv = jnp.zeros((batch_size, 2 * cfg.segment_len, cfg.attn_heads, cfg.head_dim), cfg.compute_dtype)
        return MACState(memory, memory.memory.weights, self.retrieval.zero_tail(batch_size), kv, kv)

    def start_state(self, memory: MemoryLayerState) -> MACState:
        # The first segment retrieves from the memory it starts with (M_{s-1} = M_0).
        fresh = self.init_state(memory.memory.weights[0].shape[0])
        return fresh._replace(memory=memory, segment_weights=memory.memory.weights)

    def _piece(self, x: jax.Array, state: MACState, start) -> tuple[jax.Array, MACState, dict]:
        """x `[batch, n, d_model]` (normed) at positions `start ..`, all inside one segment.

        Returns the output, the new state and the memory's gate means (sown by the caller).
        """
        cfg = self.cfg
        batch, n, _ = x.shape
        seg = cfg.segment_len
        offset = start % seg
        mcfg = self.memory.config

        q_r, retrieval_tail = self.retrieval(x, state.retrieval_tail)
        q_r = l2_normalize(q_r.reshape(batch, n, cfg.mem_heads, cfg.mem_head_dim))
        # Retrieval from M_{s-1} in the memory's float32; [batch, heads, n, dim] for the per-head MLP.
        weights = state.segment_weights
        h = memory_apply(weights, q_r.astype(weights[0].dtype).transpose(0, 2, 1, 3), mcfg.activation,
                         mcfg.use_residual_norm)
        h = h.transpose(0, 2, 1, 3).reshape(batch, n, cfg.mem_width).astype(cfg.compute_dtype)

        split = lambda u: u.reshape(batch, n, cfg.attn_heads, cfg.head_dim)
        cos, sin = rope_angles(start + jnp.arange(n), cfg.head_dim, cfg.rope_base)
        rope = lambda u: apply_rope(split(u), cos, sin)
        q = rope(self.q_proj(x))
        write = lambda buf, u, at: jax.lax.dynamic_update_slice_in_dim(buf, u.astype(buf.dtype), at, axis=1)
        keys = write(write(state.keys, rope(self.kh_proj(h)), offset), rope(self.kx_proj(x)), seg + offset)
        values = write(write(state.values, split(self.vh_proj(h)), offset), split(self.vx_proj(x)), seg + offset)
        # Query i (segment index offset + i) sees h_j and x_j for segment index j <= offset + i.
        key_index = jnp.arange(2 * seg) % seg
        valid = key_index[None, :] <= (offset + jnp.arange(n))[:, None]
        y = attend(q, keys, values, valid, (self.persistent_k[...], self.persistent_v[...]))
        y = y.reshape(batch, n, cfg.attn_width)

        m, memory, gate_means = self.memory.scan_with_gate_means(y, state.memory)
        ends_segment = offset + n == seg
        segment_weights = tuple(
            jnp.where(ends_segment, w, w_prev) for w, w_prev in zip(memory.memory.weights, weights)
        )
        out = self.out_proj(y * jax.nn.sigmoid(self.memory_norm(m.reshape(batch, n, cfg.mem_width))))
        return out, MACState(memory, segment_weights, retrieval_tail, keys, values), gate_means

    def __call__(self, x, state, start, plan):
        """x `[batch, seq, d_model]` -> (delta, state); `plan` splits seq at segment boundaries."""
        if plan is None or sum(plan) != x.shape[1]:
            raise ValueError(f"MAC needs plan = segment_plan(start, {x.shape[1]}, segment_len), got {plan!r}")
        if state is None:
            state = self.init_state(x.shape[0])
        h = self.norm(x)
        outs, done, seg = [], 0, self.cfg.segment_len
        for n, group in itertools.groupby(plan):
            count = len(list(group))
            piece = h[:, done : done + n * count]
            if n == seg and count > 1:
                # Whole segments: one compiled step scanned over them, [count, batch, seg, d_model].
                def step(carry, xs):
                    st, pos = carry
                    # Whole segments start on a chunk boundary (C % b == 0): a concrete zero offset
                    # spares the chunk scan the extra chunk it runs for an unknown one.
                    aligned = st.memory.memory._replace(offset=np.zeros((), np.int32))
                    st = st._replace(memory=st.memory._replace(memory=aligned))
                    out, st, means = self._piece(xs, st, pos)
                    return (st, pos + seg), (out, means)

                # Backprop keeps one carry per segment and recomputes the segment: without this the
                # memory's per-chunk states of every segment stay alive (small, 4K tokens: XLA temp
                # 1898 MB -> 632 MB, same tokens/s on 2 CPU cores).
                step = jax.checkpoint(step)
                pieces = piece.reshape(x.shape[0], count, seg, -1).swapaxes(0, 1)
                (state, _), (out, means) = jax.lax.scan(step, (state, jnp.asarray(start + done, jnp.int32)), pieces)
                self.memory.sow_gate_means(jax.tree.map(jnp.mean, means))  # equal-length segments
                outs.append(out.swapaxes(0, 1).reshape(x.shape[0], count * seg, -1))
            else:
                for i in range(count):
                    out, state, means = self._piece(piece[:, i * n : (i + 1) * n], state, start + done + i * n)
                    self.memory.sow_gate_means(means)
                    outs.append(out)
            done += n * count
        return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], state
