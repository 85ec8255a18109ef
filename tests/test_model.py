"""TitansLM, every variant on the `tiny` preset: causality, reach (attention stays in its window, the
memory carries past it), streaming `extend` over uneven pieces == the parallel pass, a fixed-size
state, gradients everywhere; MAC against a plain segment-by-segment oracle."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import titans
from titans.config import MemoryConfig
from titans.kernels.memory import memory_apply
from titans.attention import apply_rope, rope_angles
from titans.layers import l2_normalize
from titans.mixers import MAC, segment_plan
from titans.memory_layer import Telemetry, record
from titans.model import TitansLM

VARIANTS = ("swa", "lmm", "mag", "mal", "mac")
B, T = 2, 64
# Crosses chunk (4), window (16) and segment (16) boundaries; the one-token pieces at 35..39 decode
# from a ring cache that has wrapped, and the last piece unrolls a ring that decode steps wrote.
PIECES = (13, 1, 1, 20, 1, 1, 1, 1, 1, 24)


MEMORY_FIELDS = {f.name for f in dataclasses.fields(MemoryConfig)}


@functools.cache
def build(variant: str, **overrides):
    """The tiny preset's model (keyword overrides of model fields, or of the memory's by their names)."""
    memory = {k: overrides.pop(k) for k in list(overrides) if k in MEMORY_FIELDS}
    cfg = titans.load_preset("tiny", variant=variant, memory=memory, **overrides)
    model = TitansLM(cfg, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graph, p)(t))
    return model, params, forward


def tokens(seed: int = 1, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, length), 0, 256)


def scale(x) -> float:
    return float(np.max(np.abs(np.asarray(x))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model, params, forward = build(variant)
    toks = tokens()
    j = 37  # mid-segment, mid-chunk
    base = forward(params, toks)
    moved = forward(params, toks.at[:, j].set((toks[:, j] + 101) % 256))
    np.testing.assert_allclose(np.asarray(moved[:, :j]), np.asarray(base[:, :j]), rtol=0, atol=1e-6 * scale(base))
    assert scale(moved[:, j] - base[:, j]) > 1e-3 * scale(base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reach_attention_window_and_memory(variant):
    """Token 0 reaches the last position through the memory only: attention stops after
    n_layers * (window - 1) positions (swa), and MAC's attention is segment-local."""
    model, params, forward = build(variant)
    cfg = model.config
    toks = tokens()
    base = forward(params, toks)
    moved = forward(params, toks.at[:, 0].set((toks[:, 0] + 1) % 256))
    horizon = cfg.n_layers * (cfg.window - 1)
    assert T - 1 > horizon
    change = scale(moved[:, -1] - base[:, -1])
    if variant == "swa":
        assert change == 0.0
    else:
        assert change > 1e-6 * scale(base), change


@pytest.mark.parametrize("variant", VARIANTS)
def test_extend_uneven_pieces_equals_parallel(variant):
    model, params, forward = build(variant)
    toks = tokens()
    want = forward(params, toks)
    state, outs, done = model.init_state(B), [], 0
    sizes = []
    for n in PIECES:
        logits, state = model.extend(toks[:, done : done + n], state)
        outs.append(logits)
        done += n
        sizes.append(sum(x.nbytes for x in jax.tree.leaves(state)))
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * scale(want))
    assert int(state.position) == T
    # The same bytes after 13 tokens as after 64 (four segments, four windows).
    assert len(set(sizes)) == 1, sizes
    # Same tree and shapes from init to the end.
    assert jax.tree.structure(state) == jax.tree.structure(model.init_state(B))
    assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in jax.tree.leaves(model.init_state(B))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    """Every parameter of a block gets a finite, non-zero gradient (one block: the blocks are alike)."""
    model, params, _ = build(variant, n_layers=1)
    graph = nnx.graphdef(model)
    toks = tokens(length=40)

    def loss(p):
        logits = nnx.merge(graph, p)(toks[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(params)
    names = []
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        names.append(name)
        assert np.all(np.isfinite(np.asarray(g))), name
        assert np.any(np.asarray(g) != 0), name
    if variant != "swa":
        joined = "\n".join(names)
        for part in ("'q'", "'k'", "'v'", "w_theta", "b_theta", "w_eta", "b_eta", "w_alpha", "b_alpha", "init_weights"):
            assert part in joined, part


@pytest.mark.parametrize("variant", ["swa", "mag", "mac"])
def test_pallas_attention_equals_blockwise_in_the_model(variant):
    """model.attn_impl='pallas' (interpret mode on CPU; blocks of 8 over 64 tokens, window 16, MAC
    segments of 16) gives the blockwise model's logits and parameter gradients: every variant's
    attention, MAC's segment attention included, goes through the kernel switch. One block: the
    switch is per attention call, and compiling a second block costs the test as much again."""
    toks = tokens()

    def logits_and_grads(impl):
        model, params, forward = build(variant, attn_impl=impl, attn_block=8, n_layers=1)
        graph = nnx.graphdef(model)
        loss = lambda p: jnp.mean(nnx.merge(graph, p)(toks) ** 2)
        return forward(params, toks), jax.grad(loss)(params)

    (want, want_grads), (got, got_grads) = logits_and_grads("blockwise"), logits_and_grads("pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale(want))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-4 * scale(w) + 1e-9)


def test_mac_matches_plain_segment_oracle():
    """MAC written straight from spec section 4, one segment at a time with a float64 masked
    softmax over [persistent | h | x]; the mixer's fused segment steps must agree."""
    model, _, _ = build("mac")
    mixer: MAC = model.blocks[0].mixer
    cfg = mixer.cfg
    seg, heads, dim = cfg.segment_len, cfg.attn_heads, cfg.attn_dim
    x = jax.random.normal(jax.random.key(3), (B, 40, cfg.d_model))  # 2.5 segments
    got, _ = jax.jit(lambda x: mixer(x, None, 0, segment_plan(0, 40, seg)))(x)

    xn = mixer.norm(x)
    q_r, _ = mixer.retrieval(xn)  # the conv runs across segment boundaries
    q_r = l2_normalize(q_r.reshape(B, 40, cfg.memory.heads, cfg.memory.head_dim))
    mcfg = mixer.memory.config
    state = mixer.memory.init_state(B)
    outs = []
    for p0 in range(0, 40, seg):
        n = min(seg, 40 - p0)
        xs = xn[:, p0 : p0 + n]
        weights = state.memory.weights  # M_{s-1}: left by the previous segments only
        h = memory_apply(weights, q_r[:, p0 : p0 + n].transpose(0, 2, 1, 3), mcfg.activation, mcfg.use_residual_norm)
        h = h.transpose(0, 2, 1, 3).reshape(B, n, -1)
        cos, sin = rope_angles(p0 + jnp.arange(n), dim, cfg.rope_base)
        split = lambda u: u.reshape(B, n, heads, dim)
        q = np.asarray(apply_rope(split(mixer.q_proj(xs)), cos, sin), np.float64)
        k = np.concatenate([np.asarray(apply_rope(split(mixer.kh_proj(h)), cos, sin)),
                            np.asarray(apply_rope(split(mixer.kx_proj(xs)), cos, sin))], axis=1).astype(np.float64)
        v = np.concatenate([np.asarray(split(mixer.vh_proj(h))), np.asarray(split(mixer.vx_proj(xs)))], axis=1)
        pk, pv = np.asarray(mixer.persistent_k[...], np.float64), np.asarray(mixer.persistent_v[...], np.float64)
        i = np.arange(n)[:, None]
        j = np.arange(2 * n)[None, :] % n
        logits = np.concatenate([np.einsum("bqhd,nhd->bhqn", q, pk),
                                 np.where(j <= i, np.einsum("bqhd,bkhd->bhqk", q, k), -np.inf)], -1) / np.sqrt(dim)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        values = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape), v.astype(np.float64)], axis=1)
        y = jnp.asarray(np.einsum("bhqk,bkhd->bqhd", probs, values).reshape(B, n, -1), jnp.float32)
        m, state = mixer.memory.scan(y, state)
        outs.append(mixer.out_proj(y * jax.nn.sigmoid(mixer.memory_norm(m.reshape(B, n, -1)))))
    want = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * scale(want))


def test_segment_plan():
    assert segment_plan(0, 40, 16) == (16, 16, 8)
    assert segment_plan(13, 1, 16) == (1,)
    assert segment_plan(15, 20, 16) == (1, 16, 3)
    assert segment_plan(4, 12, 16) == (12,)
    assert segment_plan(4, 28, 16) == (12, 16)


def test_bfloat16_compute_keeps_float32_state():
    model, _, _ = build("mac", dtype="bfloat16")
    _, _, forward32 = build("mac")
    _, params32, _ = build("mac")
    toks = tokens(length=20)
    logits, state = model.extend(toks, model.init_state(B))
    assert logits.dtype == jnp.float32
    assert all(w.dtype == jnp.float32 for layer in state.layers for w in layer.memory.memory.weights)
    want = forward32(params32, toks)  # same seed: same parameters in float32
    assert scale(logits - want) < 0.1 * scale(want)


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_recast_to_float64_keeps_the_weights(variant):
    """`recast` keeps every weight: in float64 the stream's logits match float32 to rounding, the
    state is float64, and recasting back gives the float32 model's logits exactly."""
    from titans.model import recast

    model, _, _ = build(variant, n_layers=1)
    toks = tokens(length=20)
    want, _ = model.extend(toks, model.init_state(B))
    with pytest.raises(ValueError, match="64-bit JAX"):
        recast(model, "float64", "float64")
    with jax.enable_x64(True):
        wide = recast(model, "float64", "float64")
        logits, state = wide.extend(toks, wide.init_state(B))
        assert all(w.dtype == jnp.float64 for s in wide.memory_states(state) for w in s.memory.weights)
        back = recast(wide, "float32", "float32")
    assert 0 < scale(logits - want) < 1e-4 * scale(want)
    np.testing.assert_array_equal(np.asarray(back.extend(toks, back.init_state(B))[0]), np.asarray(want))


def test_mac_under_jit_needs_a_plan():
    model, _, _ = build("mac")
    state = model.init_state(B)
    with pytest.raises(ValueError, match="concrete state.position"):
        jax.jit(lambda s: model.run(tokens(length=4), s)[0])(state)


@pytest.mark.parametrize("bad, match", [
    (lambda m: m.extend(jnp.zeros((B, 3)), m.init_state(B)), "int array"),
    (lambda m: m.extend(jnp.zeros((B, 0), jnp.int32), m.init_state(B)), "n >= 1"),
    (lambda m: m.extend(jnp.zeros((B, 3), jnp.int32), None), "ModelState"),
    (lambda m: m.extend(jnp.zeros((B, 3), jnp.int32), m.init_state(B + 1)), "state is for batch 3"),
])
def test_extend_bad_input(bad, match):
    model, _, _ = build("swa")
    with pytest.raises(ValueError, match=match):
        bad(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_has_logical_axis_names(variant):
    """FSDP / tensor parallelism map these names onto mesh axes (titans.sharding.logical_shardings)."""
    model = nnx.eval_shape(lambda: TitansLM(titans.load_preset("tiny", variant=variant), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(state)
    for (path, leaf), (_, spec) in zip(jax.tree_util.tree_leaves_with_path(state),
                                       jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: x is None or
                                                                           isinstance(x, jax.sharding.PartitionSpec))):
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == leaf.ndim, jax.tree_util.keystr(path)
        assert any(name is not None for name in spec), jax.tree_util.keystr(path)


def test_mac_records_from_the_segment_scan():
    """MAC records from outside its segment scan: two segments scanned give the mean of the gate
    means, and the gates joined along the sequence, of the same segments run one call each."""
    model, _, _ = build("mac")
    seg = model.config.segment_len
    toks = tokens(length=2 * seg)
    both = Telemetry(gate_means=True, gates=True)
    _, whole = record(model, lambda m: m(toks), telemetry=both)
    state = model.init_state(B)
    halves = []
    for i in range(2):
        (_, state), layers = record(model, lambda m: m.run(toks[:, i * seg : (i + 1) * seg], state), telemetry=both)
        halves.append(layers)
    assert len(whole) == model.config.n_layers
    for n, layer in enumerate(whole):
        (means,) = layer["gate_means"]
        first, second = halves[0][n]["gate_means"][0], halves[1][n]["gate_means"][0]
        assert first != second
        for name in ("theta", "eta", "alpha"):
            np.testing.assert_allclose(means[name], (first[name] + second[name]) / 2, rtol=1e-5)
        (gates,) = layer["gates"]
        for g, a, b in zip(gates, halves[0][n]["gates"][0], halves[1][n]["gates"][0]):
            np.testing.assert_allclose(g, np.concatenate([a, b], axis=1), rtol=1e-6)


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_outer_gradient_stays_bounded_with_length(variant):
    """The presets' memory (plain MLP, step cap 0.01) keeps the gradient of the loss flat in length.
    With residual+LayerNorm and max_lr 0.1 this shape reached 4e9 at 1024 tokens (from 3.5 at 64;
    mac with its one block here: 4.6e9 from 2.1, `titans.train.eval.stability.grad_norm`): the
    recurrence's Jacobian expands (scripts/memory_stability.py, configs/README.md). MAC runs one
    block: the expansion is within a block, and a second one doubles the compile."""
    model, _, _ = build(variant, **({"n_layers": 1} if variant == "mac" else {}))

    @jax.jit
    def norm(params, batch):
        loss = lambda p: -jnp.mean(jax.nn.log_softmax(nnx.merge(graph, p)(batch[:, :-1]))[..., 0])
        return optax.tree.norm(jax.grad(loss)(params))

    graph, params = nnx.split(model)
    short, long = (float(norm(params, tokens(2, n + 1))) for n in (64, 1024))
    assert long < 3 * short and long < 10, (short, long)


@pytest.mark.parametrize("variant", ("lmm", "mag", "mal", "mac"))
def test_start_state_from_memories(variant):
    """`start_state` (training with state passing): from W^0 it is a sequence start; from the memory
    an earlier piece ended with (conv tails included) it continues that piece exactly wherever
    attention cannot tell the difference: lmm, and mac from a segment boundary at the same position
    (its persistent slots carry no RoPE, so the absolute position matters)."""
    model, x = build(variant, conv_kernel=1 if variant == "mac" else 4)[0], tokens()
    fresh = model.run(x[:, 32:])[0]
    from_w0 = model.run(x[:, 32:], model.start_state(model.memory_states(model.init_state(B))))[0]
    np.testing.assert_array_equal(np.asarray(from_w0), np.asarray(fresh))
    whole = model.run(x)[0][:, 32:]
    start = model.start_state(model.memory_states(model.run(x[:, :32])[1]))
    if variant in ("lmm", "mac"):
        start = start._replace(position=np.asarray(32, np.int32))
        np.testing.assert_allclose(np.asarray(model.run(x[:, 32:], start)[0]), np.asarray(whole), atol=2e-5)
    assert scale(model.run(x[:, 32:], start)[0] - fresh) > 0.05  # the carried memory is read


def test_start_state_needs_one_memory_per_block():
    model = build("lmm")[0]
    with pytest.raises(ValueError, match="one memory state per block"):
        model.start_state(model.memory_states(model.init_state(B))[:1])
    swa = build("swa")[0]
    assert swa.memory_states(swa.init_state(B)) == ()
    with pytest.raises(ValueError, match="for a swa model"):
        swa.start_state(())
