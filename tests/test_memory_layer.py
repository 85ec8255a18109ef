"""MemoryLayer (spec section 3): causality, split == whole, reference == chunked (values and grads),
gradient coverage, gates at init, dtypes and config validation. Tiny shapes: a 2-core CPU runs it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans.config import MemoryConfig
from titans.configfile import ConfigError
from titans.kernels.memory import MemoryState, memory_scan
from titans.memory_layer import MemoryLayer, MemoryLayerState, Telemetry, record

B, T, D_MODEL = 2, 16, 16


def make(seed: int = 0, dtype=jnp.float32, **overrides) -> MemoryLayer:
    kwargs = dict(heads=2, head_dim=8, depth=2, expansion=2, chunk_size=4, impl="chunked")
    kwargs.update(overrides)
    return MemoryLayer(MemoryConfig(**kwargs), D_MODEL, dtype=dtype, rngs=nnx.Rngs(seed))


def inputs(seq: int = T, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, seq, D_MODEL), jnp.float32)


def assert_tree_close(a, b, rtol: float, name: str = "") -> None:
    """Each leaf within rtol of the other, relative to the leaf's largest magnitude."""
    leaves_a, tree = jax.tree.flatten(a)
    leaves_b = tree.flatten_up_to(b)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    for path, x, y in zip(paths, leaves_a, leaves_b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(y)), 1e-30)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=f"{name}{path}")


CASES = [
    pytest.param(dict(depth=1, per_layer_lr=False), id="depth1"),
    pytest.param(dict(depth=1, per_layer_lr=True), id="depth1-per_layer_lr"),
    pytest.param(dict(depth=2, per_layer_lr=False), id="depth2"),
    pytest.param(dict(depth=2, per_layer_lr=True), id="depth2-per_layer_lr"),
]


def test_shapes_state_and_defaults():
    layer = make()
    x = inputs()
    o, state = layer(x)
    assert o.shape == (B, T, D_MODEL) and o.dtype == jnp.float32
    assert isinstance(state, MemoryLayerState) and isinstance(state.memory, MemoryState)
    assert [w.shape for w in state.memory.weights] == [(B, 2, 8, 16), (B, 2, 16, 8)]
    assert all(w.dtype == jnp.float32 for w in state.memory.weights)
    assert int(state.memory.offset) == T % 4
    assert [c.shape for c in state.conv] == [(B, 3, 16)] * 3

    init = layer.init_state(B)
    for w, w0 in zip(init.memory.weights, layer.memory.init_weights):
        np.testing.assert_array_equal(w, jnp.broadcast_to(w0[...], w.shape))
    assert all(not np.any(m) for m in init.memory.momentum)
    assert all(not np.any(c) for c in init.conv) and int(init.memory.offset) == 0
    np.testing.assert_array_equal(layer(x, init)[0], o)

    assert MemoryConfig(heads=1, head_dim=8, depth=1).use_residual_norm is False
    assert MemoryConfig(heads=1, head_dim=8, depth=2).use_residual_norm is True
    assert MemoryConfig(heads=1, head_dim=8, depth=1, residual_norm=True).use_residual_norm


def test_every_param_has_logical_sharding_names():
    layer = make()
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    for (path, spec), param in zip(jax.tree_util.tree_leaves_with_path(specs), params):
        assert len(spec) == param.ndim and any(spec), jax.tree_util.keystr(path)


@pytest.mark.parametrize("per_layer_lr", [False, True])
def test_initial_gates_are_well_conditioned(per_layer_lr):
    layer = make(per_layer_lr=per_layer_lr)
    theta, eta, alpha = layer.memory.gates(inputs())
    assert theta.shape == ((B, T, 2, 2) if per_layer_lr else (B, T, 2))
    assert eta.shape == alpha.shape == (B, T, 2)
    # theta_init 0.01 (max_lr 0.1), eta_init 0.9, alpha_init 0.02, logits spread ~0.1 by the token
    assert 0.006 < theta.min() and theta.max() < 0.016
    assert 0.86 < eta.min() and eta.max() < 0.93
    assert 0.013 < alpha.min() and alpha.max() < 0.03
    for gate, init in zip((theta, eta, alpha), (0.01, 0.9, 0.02)):
        assert abs(float(gate.mean()) - init) < 0.1 * init


def test_ablations_switch_gates_off_or_make_them_constant():
    """The paper's ablations (MemoryConfig): momentum / decay off give eta / alpha = 0 and no
    parameters for them; constant gates are the same for every token; a mean inner loss is the sum's
    theta / head_dim, with the output of the layer whose theta is scaled by hand."""
    x, base = inputs(), make(per_layer_lr=False)
    theta0, eta0, alpha0 = base.memory.gates(x)
    off = make(per_layer_lr=False, momentum=False, decay=False)
    theta, eta, alpha = off.memory.gates(x)
    np.testing.assert_array_equal(theta, theta0)  # same seed, same theta parameters
    assert eta.shape == alpha.shape == (B, T, 2) and not np.any(eta) and not np.any(alpha)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(off, nnx.Param))}
    assert not any(g in n for g in ("w_eta", "b_eta", "w_alpha", "b_alpha") for n in names), names
    y, _ = off(x)
    assert np.all(np.isfinite(y))

    constant = make(per_layer_lr=True, data_gates=False)
    for gate in constant.memory.gates(x):
        np.testing.assert_array_equal(gate, jnp.broadcast_to(gate[:1, :1], gate.shape))
    np.testing.assert_allclose(constant.memory.gates(x)[0][0, 0], 0.01, rtol=1e-6)  # theta_init
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(constant, nnx.Param))}
    assert not any("w_theta" in n or "w_eta" in n or "w_alpha" in n for n in names), names

    mean = make(per_layer_lr=False, inner_loss="mean")
    np.testing.assert_allclose(mean.memory.gates(x)[0], theta0 / 8, rtol=1e-6)
    q, k, v, _ = base.memory.project(x)
    by_hand, _ = memory_scan(base.memory.init_state(B).memory, q, k, v, theta0 / 8, eta0, alpha0, chunk_size=4,
                             residual_norm=True, impl="chunked")
    got, _ = mean.memory.scan(x)
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6)


RBW = pytest.param(dict(read_before_write=True), id="read_before_write")


@pytest.mark.parametrize("case", [CASES[0], CASES[3], RBW])
def test_causality(case):
    layer = make(**case)
    x = inputs()
    j = 9  # mid-chunk, so the chunk of j also holds earlier tokens
    x2 = x.at[:, j].add(1.0)
    o, _ = layer(x)
    o2, _ = layer(x2)
    np.testing.assert_allclose(o2[:, :j], o[:, :j], rtol=0, atol=1e-6)
    assert np.all(np.max(np.abs(o2[:, j] - o[:, j]), axis=-1) > 1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
@pytest.mark.parametrize(
    "pieces",
    [pytest.param([6, 10], id="mid-chunk"), pytest.param([8, 8], id="boundary"),
     pytest.param([1, 1, 1, 1, 1, 11], id="single-tokens"), pytest.param([3, 2, 11], id="short-pieces")],
)
def test_split_equals_whole(case, pieces):
    layer = make(**case)
    x = inputs()
    o, state = layer(x)
    outs, carried, start = [], None, 0
    for n in pieces:
        out, carried = layer(x[:, start : start + n], carried)
        outs.append(out)
        start += n
    assert_tree_close(jnp.concatenate(outs, axis=1), o, 1e-5, "output")
    assert_tree_close(carried.memory.weights, state.memory.weights, 1e-5, "weights")
    assert_tree_close(carried.memory.momentum, state.memory.momentum, 1e-5, "momentum")
    assert int(carried.memory.offset) == int(state.memory.offset)
    for c, w in zip(carried.conv, state.conv):
        np.testing.assert_array_equal(c, w)


def test_split_equals_whole_under_jit():
    """One compiled program per piece length serves every offset (the offset is a traced leaf)."""
    layer = make()
    x = inputs()
    o, _ = layer(x)
    step = nnx.jit(lambda layer, x, state: layer(x, state))
    carried = layer.init_state(B)
    outs = []
    for start in range(0, T, 2):
        out, carried = step(layer, x[:, start : start + 2], carried)
        outs.append(out)
    assert_tree_close(jnp.concatenate(outs, axis=1), o, 1e-5)


def _loss_and_grads(layer: MemoryLayer, x: jax.Array, cotangent: jax.Array):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        o, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(o * cotangent), o

    (_, o), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return o, grads


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_chunked_values_and_grads(case):
    x = inputs(seq=10)  # 2.5 chunks: the last one is partial
    cotangent = jax.random.normal(jax.random.key(2), (B, 10, D_MODEL))
    o_ref, g_ref = _loss_and_grads(make(impl="reference", **case), x, cotangent)
    o_chk, g_chk = _loss_and_grads(make(impl="chunked", **case), x, cotangent)
    assert_tree_close(o_chk, o_ref, 1e-5, "output")
    assert_tree_close(g_chk, g_ref, 1e-5, "grad")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_gradients_reach_every_parameter(case):
    layer = make(**case)
    x = inputs(seq=10)
    _, grads = _loss_and_grads(layer, x, jax.random.normal(jax.random.key(2), (B, 10, D_MODEL)))
    names = set()
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        names.add(".".join(name.split("'")[1:-1:2]))
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), name
    want = {f"memory.{p}.{leaf}" for p in "qkv" for leaf in ("proj.kernel", "conv")}
    want |= {f"memory.{g}" for g in ("w_theta", "b_theta", "w_eta", "b_eta", "w_alpha", "b_alpha")}
    want |= {"norm_scale", "gate_proj.kernel", "out_proj.kernel"}
    assert names >= want and any(n.startswith("memory.init_weights") for n in names), names


def test_bfloat16_compute_keeps_float32_memory():
    x = inputs()
    o32, _ = make()(x)
    layer = make(dtype=jnp.bfloat16)
    o, state = layer(x)
    assert o.dtype == jnp.bfloat16
    assert all(w.dtype == jnp.float32 for w in state.memory.weights + state.memory.momentum)
    assert all(c.dtype == jnp.bfloat16 for c in state.conv)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert_tree_close(o.astype(jnp.float32), o32, 0.05)


def test_bfloat16_matmuls_reach_the_scan():
    """matmul_dtype reaches memory_scan: the output moves by bf16 round-off, not more."""
    x = inputs()
    o32, _ = make(residual_norm=False)(x)
    o16, _ = make(residual_norm=False, matmul_dtype="bfloat16")(x)
    err = float(jnp.max(jnp.abs(o16 - o32)) / jnp.max(jnp.abs(o32)))
    assert 1e-6 < err < 2e-2, err


def test_record_collects_gate_means_and_gates_for_one_call_only():
    layer = make()
    x = inputs()
    before = jax.tree.structure(nnx.state(layer))
    (o, _), (records,) = record(layer, lambda m: m(x), telemetry=Telemetry(gate_means=True, gates=True))
    gates = layer.memory.gates(x)
    (means,) = records["gate_means"]
    for name, gate in zip(("theta", "eta", "alpha"), gates):
        np.testing.assert_allclose(means[name], gate.mean(), rtol=1e-6)
    (recorded,) = records["gates"]
    for got, want in zip(recorded, gates):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(o, layer(x)[0])  # recording changes nothing computed
    _, (nothing,) = record(layer, lambda m: m(x), telemetry=Telemetry())
    assert nothing == {}
    assert layer.memory.telemetry == Telemetry()  # off again after the call
    assert jax.tree.structure(nnx.state(layer)) == before  # and nothing was added to the module's state


@pytest.mark.parametrize(
    "field, value",
    [("depth", 0), ("depth", 5), ("activation", "relu"), ("heads", -1), ("head_dim", 0),
     ("expansion", 0), ("chunk_size", 0), ("conv_kernel", 0), ("head_dim", 8.0), ("max_lr", 0.0),
     ("theta_init", 0.2), ("eta_init", 1.0), ("alpha_init", 0.0), ("impl", "cuda"), ("residual_norm", 1),
     ("per_layer_lr", "yes"), ("matmul_dtype", "float16"), ("inner_loss", "max"), ("momentum", 0)],
)
def test_config_validation(field, value):
    with pytest.raises(ConfigError, match=rf"^model\.memory\.{field} [^\n]*$"):
        MemoryConfig(**{field: value})
    dataclasses.replace(MemoryConfig())  # the defaults are valid
