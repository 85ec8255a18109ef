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

The attention is `titans.kernels.attention.sliding_window_attention` with a window of `C`, the
positions counted from the segment start (so keys of earlier segments are masked as if before the
sequence start) and `h` as the second key/value stream aligned with `x` (`aligned_kv`): one softmax
over the slots, `h_j` and `x_j`, through the `attn_impl` switch like every other variant.

Streaming state (`MACState`): the memory layer's state, `M_{s-1}`, the retrieval conv tail and the
post-RoPE keys/values of the last `C` tokens, `x` and `h` (rings `[batch, heads, C, dim]`,
`titans.attention.AttentionCache`; those of an earlier segment are masked). A one-token piece
(decode) writes its slot of each ring and attends to the rings. A call processes `plan`, its length split at
segment boundaries (`segment_plan`); pieces that are whole segments run as one `lax.scan`, so the
training pass compiles one segment step.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.attention import (AttentionCache, apply_rope, persistent_slots, persistent_values, ring_seen, roll_up,
                              rope_angles, unroll, write_slot)
from titans.kernels.attention import decode_attention, sliding_window_attention
from titans.kernels.memory import memory_apply
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
    tokens: AttentionCache  # x keys/values of the last C tokens, a ring [batch, heads, C, dim]
    retrievals: AttentionCache  # h keys/values of the same tokens


class MAC(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(**cfg.dtypes, rngs=rngs)
        width = cfg.attn_width
        self.norm = RMSNorm(cfg.d_model, **kw)
        self.retrieval = ConvProjection(cfg.d_model, cfg.memory.width, kernel=cfg.memory.conv_kernel, **kw)
        self.q_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.kx_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.vx_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.kh_proj = dense(cfg.memory.width, width, ("heads", "heads"), **kw)
        self.vh_proj = dense(cfg.memory.width, width, ("heads", "heads"), **kw)
        self.persistent_k, self.persistent_v = persistent_slots(cfg.n_persistent, cfg.attn_heads, cfg.attn_dim,
                                                                cfg.jnp_param_dtype, rngs)
        self.memory = NeuralMemory(cfg.memory, width, **cfg.dtypes, rngs=rngs)
        self.memory_norm = RMSNorm(cfg.memory.width, name="heads", **kw)
        self.out_proj = dense(width, cfg.d_model, ("heads", "embed"), **kw)

    def init_state(self, batch_size: int) -> MACState:
        cfg = self.cfg
        memory = self.memory.init_state(batch_size)
        zeros = jnp.zeros((batch_size, cfg.attn_heads, cfg.segment_len, cfg.attn_dim), cfg.jnp_dtype)
        cache = AttentionCache(zeros, zeros)
        return MACState(memory, memory.memory.weights, self.retrieval.zero_tail(batch_size), cache, cache)

    def start_state(self, memory: MemoryLayerState) -> MACState:
        # The first segment retrieves from the memory it starts with (M_{s-1} = M_0).
        fresh = self.init_state(memory.memory.weights[0].shape[0])
        return fresh._replace(memory=memory, segment_weights=memory.memory.weights)

    def _piece(self, x: jax.Array, state: MACState, start, aligned: bool) -> tuple[jax.Array, MACState, dict]:
        """x `[batch, n, d_model]` (normed) at positions `start ..`, all inside one segment;
        `aligned`: known to start the segment (then no earlier key can be seen).

        Returns the output, the new state and the memory's records (sown by the caller).
        """
        cfg = self.cfg
        batch, n, _ = x.shape
        seg = cfg.segment_len
        mcfg = self.memory.config

        q_r, retrieval_tail = self.retrieval(x, state.retrieval_tail)
        q_r = l2_normalize(q_r.reshape(batch, n, mcfg.heads, mcfg.head_dim))
        # Retrieval from M_{s-1} in the memory's float32; [batch, heads, n, dim] for the per-head MLP.
        weights = state.segment_weights
        h = memory_apply(weights, q_r.astype(weights[0].dtype).transpose(0, 2, 1, 3), mcfg.activation,
                         mcfg.use_residual_norm)
        h = h.transpose(0, 2, 1, 3).reshape(batch, n, mcfg.width).astype(cfg.jnp_dtype)

        split = lambda u: u.reshape(batch, n, cfg.attn_heads, cfg.attn_dim)
        cos, sin = rope_angles(start + jnp.arange(n), cfg.attn_dim, cfg.rope_base)
        rope = lambda u: apply_rope(split(u), cos, sin)
        q = rope(self.q_proj(x))
        own = {"tokens": (rope(self.kx_proj(x)), split(self.vx_proj(x))),
               "retrievals": (rope(self.kh_proj(h)), split(self.vh_proj(h)))}
        persistent = persistent_values(self.persistent_k, self.persistent_v)
        if n == 1 and not aligned:  # decode: attend to the rings and this token, then write its slots
            seen = ring_seen(start, seg, start - start % seg)  # this segment's tokens only
            y = decode_attention(q[:, 0], [tuple(getattr(state, name)) for name in own], seen, persistent,
                                 current=[tuple(u[:, 0] for u in own[name]) for name in own])
            caches = {name: write_slot(getattr(state, name), *(u[:, 0] for u in own[name]), start) for name in own}
        else:
            if aligned and n == seg:
                # A whole segment from its start (training's scan over segments): its own keys are
                # all it sees and, as they stand, the new rings (slot p % C holds position p).
                keys = own
                caches = {name: AttentionCache(*(u.astype(c.dtype).transpose(0, 2, 1, 3)
                                                 for c, u in zip(getattr(state, name), own[name])))
                          for name in own}
            else:
                # The rings hold the C tokens before x; the query at `start` sees at most the last C - 1.
                full = {name: tuple(jnp.concatenate([c[:, 1:], u.astype(c.dtype)], axis=1)
                                    for c, u in zip(unroll(getattr(state, name), start), own[name]))
                        for name in own}
                keys = own if aligned else full
                caches = {name: roll_up(*(u[:, -seg:] for u in full[name]), start + n) for name in full}
            # Positions from the segment start: the cached keys of an earlier segment fall before 0.
            y = sliding_window_attention(q, *keys["tokens"], window=seg, start=start % seg, persistent=persistent,
                                         aligned_kv=keys["retrievals"], block=cfg.attn_block, impl=cfg.attn_impl)
        y = y.reshape(batch, n, cfg.attn_width)

        m, memory, records = self.memory.scan_unrecorded(y, state.memory)
        ends_segment = (start % seg) + n == seg
        segment_weights = tuple(
            jnp.where(ends_segment, w, w_prev) for w, w_prev in zip(memory.memory.weights, weights)
        )
        out = self.out_proj(y * jax.nn.sigmoid(self.memory_norm(m.reshape(batch, n, mcfg.width))))
        return out, MACState(memory, segment_weights, retrieval_tail, **caches), records

    def __call__(self, x, state, start, plan):
        """x `[batch, seq, d_model]` -> (delta, state); `plan` splits seq at segment boundaries."""
        if plan is None or sum(plan) != x.shape[1]:
            raise ValueError(f"MAC needs plan = segment_plan(start, {x.shape[1]}, segment_len), got {plan!r}")
        # A piece after the first starts a segment; the first does when the stream starts here.
        first_aligned = state is None or (isinstance(start, int) and start % self.cfg.segment_len == 0)
        if state is None:
            state = self.init_state(x.shape[0])
        h = self.norm(x)
        outs, done, seg = [], 0, self.cfg.segment_len
        for n, group in itertools.groupby(plan):
            count = len(list(group))
            piece = h[:, done : done + n * count]
            aligned = done > 0 or first_aligned
            if n == seg and count > 1:
                # Whole segments: one compiled step scanned over them, [count, batch, seg, d_model].
                def step(carry, xs):
                    st, pos = carry
                    # Whole segments start on a chunk boundary (C % b == 0): a concrete zero offset
                    # spares the chunk scan the extra chunk it runs for an unknown one.
                    aligned_memory = st.memory.memory._replace(offset=np.zeros((), np.int32))
                    st = st._replace(memory=st.memory._replace(memory=aligned_memory))
                    out, st, records = self._piece(xs, st, pos, aligned=True)
                    return (st, pos + seg), (out, records)

                # Backprop keeps one carry per segment and recomputes the segment: without this the
                # memory's per-chunk states of every segment stay alive (small, 4K tokens: XLA temp
                # 1898 MB -> 632 MB, same tokens/s on 2 CPU cores).
                step = jax.checkpoint(step)
                pieces = piece.reshape(x.shape[0], count, seg, -1).swapaxes(0, 1)
                (state, _), (out, records) = jax.lax.scan(step, (state, jnp.asarray(start + done, jnp.int32)), pieces)
                self.memory.record(records, stacked=True)
                outs.append(out.swapaxes(0, 1).reshape(x.shape[0], count * seg, -1))
            else:
                for i in range(count):
                    out, state, records = self._piece(piece[:, i * n : (i + 1) * n], state, start + done + i * n,
                                                      aligned=aligned or i > 0)
                    self.memory.record(records)
                    outs.append(out)
            done += n * count
        return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], state
