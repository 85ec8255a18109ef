"""memory_scan: chunked == reference == a hand-written loop, in values and gradients (spec 1-2, 5)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from titans.kernels.memory import MemoryState, memory_scan
from tests.memory_cases import hand_loop, pairwise, random_inputs, state_of
from titans.train.bench.common import max_rel_err

ARGS = ("q", "k", "v", "theta", "eta", "alpha")
# The fast paths held to the oracle; "pallas" runs its kernels in interpret mode on CPU.
FAST_IMPLS = ("chunked", "pallas")
# The TPU kernel in Pallas' TPU interpreter (slow: every kernel op is a host callback), on a few
# cases of each kind below; `test_pallas_lowering.py` lowers it for TPU.
MOSAIC = "mosaic"

# Comparisons between impls run in float64, where they agree to ~1e-13: any wrong coefficient,
# index or dropped term shows up many orders above X64_TOL. The float32 path (the one models run)
# is then held to the float64 answer at F32_TOL: round-off of a few dozen recurrent steps, which
# LayerNorm inside deep memory amplifies to ~1e-5 (spec section 2, "Conditioning").
X64_TOL = 1e-9
F32_TOL = 2e-4


def assert_trees_close(got, want, tol, what=""):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        err = max_rel_err(g, w)
        assert err <= tol, f"{what} leaf {i}: relative error {err:.3g} > {tol}"


def run(impl, state, inputs, **kw):
    """Jitted memory_scan; the state goes in as an argument, so its offset is traced."""
    fn = jax.jit(functools.partial(memory_scan, impl=impl, mask=inputs["mask"], **kw))
    return fn(state, *(jnp.asarray(inputs[n]) for n in ARGS))


def run_fresh(impl, inputs, **kw):
    """Jitted memory_scan with the state built inside, so its offset is a known constant."""

    @jax.jit
    def fn(weights, momentum, *args):
        return memory_scan(MemoryState.create(weights, momentum), *args, impl=impl, mask=inputs["mask"], **kw)

    return fn(*(tuple(map(jnp.asarray, inputs[n])) for n in ("weights", "momentum")), *(jnp.asarray(inputs[n]) for n in ARGS))


def prefix_state(inputs, prefix, **kw):
    """The state after `prefix` tokens (reference impl): mid-chunk offset, anchor != weights."""
    pre = {n: (x[:, :prefix] if n in ARGS or n == "mask" and x is not None else x) for n, x in inputs.items()}
    pre["mask"] = None
    return run("reference", state_of(pre), pre, **kw)[1]


LENGTHS = {"one": lambda b: 1, "short": lambda b: max(1, b - 1), "exact": lambda b: 2 * b, "ragged": lambda b: 2 * b + b // 2 + 1}

VALUE_CASES = pairwise(
    dict(
        depth=[1, 2, 3, 4],
        length=list(LENGTHS),
        chunk=[2, 3, 8],
        activation=["gelu", "silu"],
        residual_norm=[False, True],
        per_layer=[False, True],
        mask=[False, True],
        read_before_write=[False, True],
        start=["fresh", "mid"],
    )
)


def _case_id(case):
    return "-".join(f"{k[:3]}{v}" if not isinstance(v, str) else v for k, v in case.items())


def _setup(case, seed):
    b = case["chunk"]
    seq = LENGTHS[case["length"]](b)
    prefix = b + 1 if case["start"] == "mid" else 0
    inputs = random_inputs(
        seed, seq=prefix + seq, depth=case["depth"], per_layer=case["per_layer"], with_mask=case["mask"],
        dtype=np.float64,
    )
    kw = dict(
        chunk_size=b, activation=case["activation"], residual_norm=case["residual_norm"],
        read_before_write=case["read_before_write"],
    )
    body = {n: (x[:, prefix:] if (n in ARGS or n == "mask") and x is not None else x) for n, x in inputs.items()}
    state = prefix_state(inputs, prefix, **kw) if prefix else None
    return body, state, kw


def to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@pytest.mark.parametrize("index", range(len(VALUE_CASES)), ids=[_case_id(c) for c in VALUE_CASES])
def test_fast_impls_match_reference_values(index):
    """Each fast impl against the token loop on one case (the reference computed once for both)."""
    case = VALUE_CASES[index]
    with jax.enable_x64(True):
        body, state, kw = _setup(case, seed=index)
        if state is None:
            y_ref, s_ref = run_fresh("reference", body, **kw)
        else:
            y_ref, s_ref = run("reference", state, body, **kw)
        assert y_ref.dtype == jnp.float64
        for impl in FAST_IMPLS + ((MOSAIC,) if index % 7 == 0 else ()):
            if state is None:
                y, s = run_fresh(impl, body, **kw)
                y_traced, s_traced = run(impl, state_of(body), body, **kw)
                assert_trees_close((y_traced, s_traced[:3]), (y_ref, s_ref[:3]), X64_TOL, f"{impl}, traced offset")
            else:
                y, s = run(impl, state, body, **kw)
            assert y.dtype == jnp.float64
            assert_trees_close(y, y_ref, X64_TOL, f"{impl} y")
            assert_trees_close(s[:3], s_ref[:3], X64_TOL, f"{impl} state")
            assert int(s.offset) == int(s_ref.offset), impl
    # float32 against the float64 reference: chunked on every case; pallas, which runs the same chunk
    # math (`chunk_forward`) and equals chunked in float64 above, on every fourth (a compile each).
    body32 = {n: to_f32(x) if n != "mask" else x for n, x in body.items()}
    for impl in FAST_IMPLS if index % 4 == 0 else ("chunked",):
        y32, s32 = run(impl, to_f32(state) if state is not None else state_of(body32), body32, **kw)
        assert y32.dtype == s32.weights[0].dtype == jnp.float32
        assert_trees_close((y32, s32[:3]), (y_ref, s_ref[:3]), F32_TOL, f"float32 {impl} vs float64 reference")


GRAD_CASES = [
    dict(depth=1, chunk=4, seq=9, residual_norm=False, per_layer=False, mask=True, rbw=False, activation="gelu", start=0),
    dict(depth=2, chunk=4, seq=10, residual_norm=True, per_layer=True, mask=False, rbw=True, activation="silu", start=3,
         mosaic=True),
    dict(depth=2, chunk=3, seq=7, residual_norm=False, per_layer=False, mask=True, rbw=False, activation="gelu", start=5),
    dict(depth=3, chunk=5, seq=5, residual_norm=True, per_layer=False, mask=True, rbw=True, activation="gelu", start=0),
    dict(depth=4, chunk=2, seq=7, residual_norm=False, per_layer=True, mask=False, rbw=False, activation="silu", start=1),
    # a single token mid-chunk, a call shorter than one chunk, and 5 chunks (a remat tail group)
    dict(depth=2, chunk=4, seq=1, residual_norm=True, per_layer=False, mask=False, rbw=True, activation="gelu", start=2),
    dict(depth=2, chunk=4, seq=3, residual_norm=False, per_layer=True, mask=True, rbw=False, activation="silu", start=0),
    dict(depth=2, chunk=3, seq=14, residual_norm=True, per_layer=False, mask=True, rbw=False, activation="gelu", start=0,
         mosaic=True),
]


def _scalar_loss(impl, inputs, offset, kw, weights, momentum, anchor, *args):
    """A random linear functional of y and the whole final state, so every output is checked."""
    state = MemoryState(weights, momentum, anchor, jnp.asarray(offset, jnp.int32))
    y, out = memory_scan(state, *args, impl=impl, mask=inputs["mask"], **kw)
    leaves = [y] + jax.tree.leaves(out[:3])
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return sum(jnp.sum(x * jax.random.normal(kk, x.shape, x.dtype)) for kk, x in zip(keys, leaves))


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"L{c['depth']}-b{c['chunk']}-T{c['seq']}-o{c['start']}")
def test_fast_impls_match_reference_gradients(case):
    with jax.enable_x64(True):
        _check_gradients(case)


def _check_gradients(case):
    b = case["chunk"]
    inputs = random_inputs(
        11, seq=case["start"] + case["seq"], depth=case["depth"], per_layer=case["per_layer"],
        with_mask=case["mask"], dtype=np.float64,
    )
    kw = dict(chunk_size=b, activation=case["activation"], residual_norm=case["residual_norm"], read_before_write=case["rbw"])
    body = {n: (x[:, case["start"]:] if (n in ARGS or n == "mask") and x is not None else x) for n, x in inputs.items()}
    state = prefix_state(inputs, case["start"], **kw) if case["start"] else state_of(body)
    primals = (state.weights, state.momentum, state.anchor, *(jnp.asarray(body[n]) for n in ARGS))
    impls = FAST_IMPLS + ((MOSAIC,) if case.get("mosaic") else ())
    grads = {}
    for which in ("reference", *impls):
        loss = functools.partial(_scalar_loss, which, body, int(state.offset), kw)
        grads[which] = jax.jit(jax.grad(loss, argnums=tuple(range(len(primals)))))(*primals)
    names = ("weights", "momentum", "anchor") + ARGS
    for impl in impls:
        for name, g_ref, g in zip(names, grads["reference"], grads[impl]):
            assert_trees_close(g, g_ref, X64_TOL, f"{impl} d/d{name}")
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
        # The inputs reach the outputs, so a zero gradient would mean a dropped term.
        for name, g in zip(names[3:], grads[impl][3:]):
            assert float(jnp.max(jnp.abs(g))) > 0, f"{impl} {name}"


@pytest.mark.parametrize(
    "depth,activation,residual_norm,chunk,offset,rbw",
    [(2, "gelu", True, 1, 0, False), (1, "silu", False, 1, 0, True), (3, "silu", True, 3, 0, False), (2, "gelu", False, 4, 3, True)],
)
def test_matches_hand_written_loop(depth, activation, residual_norm, chunk, offset, rbw):
    """Both impls against float64 numpy with hand-derived gradients (chunk 1 is the exact recurrence)."""
    with jax.enable_x64(True):
        _check_hand_loop(depth, activation, residual_norm, chunk, offset, rbw)


def _check_hand_loop(depth, activation, residual_norm, chunk, offset, rbw):
    inputs = random_inputs(3, seq=9, depth=depth, with_mask=True, dtype=np.float64)
    kw = dict(chunk_size=chunk, activation=activation, residual_norm=residual_norm, read_before_write=rbw)
    rng = np.random.default_rng(5)
    anchor = tuple(w + 0.1 * rng.normal(size=w.shape).astype(w.dtype) for w in inputs["weights"])
    y_hand, (w_hand, s_hand, a_hand) = hand_loop(inputs, offset=offset, anchor=anchor if offset else None, **kw)
    state = state_of(inputs)
    if offset:
        state = state._replace(anchor=tuple(map(jnp.asarray, anchor)), offset=jnp.asarray(offset, jnp.int32))
    for impl in ("reference", *FAST_IMPLS):
        y, s = run(impl, state, inputs, **kw)
        assert_trees_close(y, y_hand, X64_TOL, f"{impl} y")
        assert_trees_close((s.weights, s.momentum, s.anchor), (tuple(w_hand), tuple(s_hand), tuple(a_hand)), X64_TOL, impl)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS, MOSAIC])
def test_split_anywhere_equals_one_call(impl):
    """Spec invariant 4: two calls with the carried state == one call, wherever the split falls
    (the TPU kernel, slow in its interpreter: one split, inside a chunk)."""
    with jax.enable_x64(True):
        _check_split(impl, (5,) if impl == MOSAIC else (3, 4, 5, 13))


def _check_split(impl, splits):
    b = 4
    inputs = random_inputs(8, seq=14, depth=2, with_mask=True, dtype=np.float64)
    kw = dict(chunk_size=b, residual_norm=True)
    y_all, s_all = run(impl, state_of(inputs), inputs, **kw)
    for split in splits:  # inside the first chunk, on a boundary, just after, last token
        head = {n: (x[:, :split] if (n in ARGS or n == "mask") else x) for n, x in inputs.items()}
        tail = {n: (x[:, split:] if (n in ARGS or n == "mask") else x) for n, x in inputs.items()}
        y1, s1 = run(impl, state_of(head), head, **kw)
        assert int(s1.offset) == split % b
        y2, s2 = run(impl, s1, tail, **kw)
        assert_trees_close(jnp.concatenate([y1, y2], axis=1), y_all, X64_TOL, f"y, split {split}")
        assert_trees_close(s2, s_all, X64_TOL, f"state, split {split}")
        # Outside jit the carried offset is concrete: chunked then pads exactly instead.
        args = (jnp.asarray(tail[n]) for n in ARGS)
        y2_eager, s2_eager = memory_scan(s1, *args, impl=impl, mask=tail["mask"], **kw)
        assert_trees_close((y2_eager, s2_eager), (y2, s2), X64_TOL, f"eager, split {split}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_token_by_token_decode_equals_one_call(impl):
    """Streaming decode: one compiled call per token (offset traced) reproduces the parallel pass."""
    with jax.enable_x64(True):
        _check_decode(impl)


def _check_decode(impl):
    inputs = random_inputs(9, seq=7, depth=2, batch=1, heads=1, dtype=np.float64)
    kw = dict(chunk_size=3, residual_norm=False)
    y_all, s_all = run("reference", state_of(inputs), inputs, **kw)
    traces = []

    @jax.jit
    def step(state, *args):
        traces.append(1)  # runs once per trace, not per call
        return memory_scan(state, *args, impl=impl, **kw)

    state, ys = state_of(inputs), []
    for t in range(7):
        y, state = step(state, *(jnp.asarray(inputs[n][:, t : t + 1]) for n in ARGS))
        ys.append(y)
        if t == 1:
            traced = len(traces)  # the first call may differ (numpy vs jax offset leaf)
    assert_trees_close(jnp.concatenate(ys, axis=1), y_all, X64_TOL, "decode")
    assert_trees_close(state, s_all, X64_TOL, "state")
    assert len(traces) == traced  # every offset ran the same compiled program


def test_extreme_gates_are_finite_and_exact():
    """eta = 0 and alpha = 1 are legal: no NaN in values or gradients (decay products never divide),
    and the gradients still match the token loop."""
    inputs = random_inputs(4, seq=8, depth=2)
    inputs["eta"][:, ::3] = 0.0
    inputs["alpha"][:, 1::4] = 1.0
    kw = dict(chunk_size=4, residual_norm=True)
    impls = ("reference", *FAST_IMPLS)
    outs = {impl: run(impl, state_of(inputs), inputs, **kw) for impl in impls}
    for impl in FAST_IMPLS:
        assert_trees_close(outs[impl], outs["reference"], F32_TOL, f"{impl}, extreme gates")

    def loss(impl, eta, alpha):
        args = [jnp.asarray(inputs[n]) for n in ARGS]
        args[4], args[5] = eta, alpha
        return jnp.sum(jnp.sin(memory_scan(state_of(inputs), *args, impl=impl, **kw)[0]))

    with jax.enable_x64(True):
        gates = (jnp.asarray(inputs["eta"], jnp.float64), jnp.asarray(inputs["alpha"], jnp.float64))
        grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1)))(*gates) for impl in impls}
    for impl in FAST_IMPLS:
        assert all(np.all(np.isfinite(g)) for g in grads[impl])
        assert_trees_close(grads[impl], grads["reference"], F32_TOL, f"{impl}: d/d(eta, alpha) at eta=0, alpha=1")


def test_masked_tokens_leave_state_unchanged():
    inputs = random_inputs(6, seq=6, depth=2)
    inputs["mask"] = np.zeros((2, 6), bool)
    for impl in ("reference", *FAST_IMPLS):
        _, s = run(impl, state_of(inputs), inputs, chunk_size=4, residual_norm=True)
        assert_trees_close((s.weights, s.momentum), (inputs["weights"], inputs["momentum"]), 0.0, impl)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_check_grads_float64(impl):
    """Finite differences in float64 (float32 differences of this recurrence are noise)."""
    with jax.enable_x64(True):
        inputs = random_inputs(2, batch=1, heads=1, seq=6, head_dim=4, hidden=8, depth=2, per_layer=True, dtype=np.float64)
        inputs["mask"] = np.array([[True, True, False, True, True, True]])
        kw = dict(chunk_size=4, residual_norm=True)
        state = state_of(inputs)
        assert state.weights[0].dtype == jnp.float64

        def f(weights, momentum, *args):
            y, s = memory_scan(MemoryState.create(weights, momentum), *args, impl=impl, mask=inputs["mask"], **kw)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(w)) for w in s.weights) + sum(jnp.sum(m**2) for m in s.momentum)

        primals = (state.weights, state.momentum, *(jnp.asarray(inputs[n]) for n in ARGS))
        jax.test_util.check_grads(f, primals, order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_auto_is_chunked_on_cpu_and_compiled_pallas_names_the_unsupported_shape():
    inputs = random_inputs(1, seq=5)
    kw = dict(chunk_size=2, residual_norm=True)
    assert jax.default_backend() == "cpu"
    assert_trees_close(run("auto", state_of(inputs), inputs, **kw), run("chunked", state_of(inputs), inputs, **kw), 0.0)
    args = [jnp.asarray(inputs[n]) for n in ARGS]
    with pytest.raises(ValueError, match="chunk_size is 2; the Triton kernel needs a power of two >= 16"):
        memory_scan(state_of(inputs), *args, impl="pallas", interpret=False, **kw)


def test_bf16_inputs_keep_float32_state():
    inputs = random_inputs(1, seq=6)
    args = [jnp.asarray(inputs[n], jnp.bfloat16) for n in ARGS]
    y, s = memory_scan(state_of(inputs), *args, chunk_size=4, residual_norm=True)
    assert y.dtype == jnp.bfloat16 and all(w.dtype == jnp.float32 for w in s.weights + s.momentum)


def _bad(**changes):
    inputs = random_inputs(1, seq=5)
    args = {n: jnp.asarray(inputs[n]) for n in ARGS}
    call = dict(state=state_of(inputs), chunk_size=2, residual_norm=True)
    call.update(args)
    call.update(changes)
    state = call.pop("state")
    return lambda: memory_scan(state, *(call.pop(n) for n in ARGS), **call)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
        (dict(k=jnp.zeros((2, 5, 2, 7))), "k has shape"),
        (dict(q=jnp.zeros((2, 5, 8))), "q must be"),
        (dict(v=jnp.zeros((2, 5, 2, 8), jnp.int32)), "v must be a floating"),
        (dict(theta=jnp.full((2, 5, 2, 3), 0.01)), "theta has shape"),
        (dict(eta=jnp.full((2, 5, 2), 0.5)[:, :4]), "eta has shape"),
        (dict(theta=jnp.full((2, 5, 2), -0.1)), "theta must lie"),
        (dict(eta=jnp.full((2, 5, 2), 1.5)), "eta must lie"),
        (dict(alpha=jnp.full((2, 5, 2), jnp.nan)), "alpha must lie"),
        (dict(mask=jnp.ones((2, 5), jnp.int32)), "mask must be bool"),
        (dict(mask=jnp.ones((2, 4), bool)), "mask has shape"),
        (dict(activation="relu"), "activation"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(residual_norm=1), "residual_norm"),
        (dict(read_before_write="yes"), "read_before_write"),
        (dict(theta=jnp.full((2, 5, 2), jnp.inf)), "theta must lie"),
        (dict(theta=jnp.zeros((2, 5, 2), jnp.int32)), "theta must be a floating"),
        (dict(alpha=jnp.zeros((2, 5, 3))), "alpha has shape"),
        (dict(state=MemoryState.create((jnp.zeros((2, 2, 8, 8)),), (jnp.zeros((2, 2, 8, 4)),))), r"state.momentum\[0\] has shape"),
        (dict(state=MemoryState(([[0.0]],), ([[0.0]],), ([[0.0]],), 0)), "state.weights must be a tuple of arrays"),
        (dict(impl="fast"), "impl"),
        (dict(matmul_dtype="float8"), "matmul_dtype must be one of"),
        (dict(impl="reference", matmul_dtype="bfloat16"), "exact float32 oracle"),
        (dict(state=MemoryState.create((jnp.zeros((2, 2, 8, 8), jnp.float16),))), "float32"),
        (dict(state=MemoryState.create((jnp.zeros((2, 2, 8, 16)), jnp.zeros((2, 2, 8, 8))))), r"state.weights\[1\]"),
        (dict(state=MemoryState.create((jnp.zeros((1, 2, 8, 8)),))), r"state.weights\[0\] has shape"),
        (dict(state=MemoryState.create((jnp.zeros((2, 2, 8, 8)),))._replace(offset=jnp.asarray(2))), "state.offset"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_raises_value_error_naming_it(changes, match):
    with pytest.raises(ValueError, match=match):
        _bad(**changes)()


def test_pairwise_grid_covers_every_pair():
    factors = dict(a=[1, 2, 3, 4], b=["x", "y"], c=[0, 1, 2], d=[True, False])
    cases = pairwise(factors)
    for x, y in itertools.combinations(factors, 2):
        seen = {(c[x], c[y]) for c in cases}
        assert seen == set(itertools.product(factors[x], factors[y]))
    assert len(VALUE_CASES) <= 28


def _train_temp_bytes(n_chunks, chunk=4):
    """XLA's working memory for value-and-grad of a chunked scan over n_chunks chunks."""
    inputs = random_inputs(0, batch=1, seq=n_chunks * chunk, heads=2, head_dim=16, hidden=64, depth=2)
    weights = tuple(map(jnp.asarray, inputs["weights"]))

    def loss(weights, *args):
        return jnp.sum(memory_scan(MemoryState.create(weights), *args, chunk_size=chunk, residual_norm=True, impl="chunked")[0])

    args = [jnp.asarray(inputs[n]) for n in ARGS]
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(weights, *args).compile()
    return compiled.memory_analysis().temp_size_in_bytes, sum(w.nbytes for w in weights)


def test_training_memory_grows_like_sqrt_of_chunks():
    """Backprop keeps one state every ~sqrt(n) chunks, not three state copies per chunk."""
    small, state_bytes = _train_temp_bytes(64)
    large, _ = _train_temp_bytes(256)
    assert large / small < 2.6  # sqrt growth: 2; a carry per chunk: ~4
    assert large < 256 * state_bytes  # less than one weight copy per chunk


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Pallas kernel needs a GPU")
def test_compiled_pallas_matches_chunked_on_gpu():
    """Float32 on both sides (the kernel's matmuls are float32 'ieee'): values and gradients agree
    to float32 round-off of a 6-chunk recurrence at a Triton-sized shape."""
    inputs = random_inputs(12, batch=2, seq=5 * 64 + 17, heads=4, head_dim=64, hidden=256, depth=2, with_mask=True)
    kw = dict(chunk_size=64, residual_norm=True)
    outs = {impl: run(impl, state_of(inputs), inputs, interpret=False, **kw) for impl in FAST_IMPLS}
    assert_trees_close(outs["pallas"], outs["chunked"], F32_TOL, "compiled pallas vs chunked")
    state = state_of(inputs)
    primals = (state.weights, state.momentum, state.anchor, *(jnp.asarray(inputs[n]) for n in ARGS))
    grads = {
        impl: jax.jit(jax.grad(functools.partial(_scalar_loss, impl, inputs, 0, kw), argnums=tuple(range(9))))(*primals)
        for impl in FAST_IMPLS
    }
    assert_trees_close(grads["pallas"], grads["chunked"], F32_TOL, "compiled pallas vs chunked, gradients")


def test_bfloat16_matmuls_within_their_tolerance_and_alike_in_both_impls():
    """matmul_dtype='bfloat16' (bf16 matmul inputs, float32 accumulation and state): off the exact
    answer by bf16 round-off (measured 1.4e-3 relative here; 1e-2 allowed), and chunked and pallas
    round the same products, so they agree to float32 round-off. A plain MLP memory, as the presets
    use: with residual+LayerNorm memory the same inputs are off by 0.2 after 5 chunks (LN amplifies
    round-off, spec section 2 "Conditioning"), so bf16 matmuls do not suit that memory."""
    inputs = random_inputs(13, seq=21, depth=2, heads=2, head_dim=16, hidden=32, with_mask=True)
    kw = dict(chunk_size=4, residual_norm=False)
    want = run("reference", state_of(inputs), inputs, **kw)
    got = {impl: run(impl, state_of(inputs), inputs, matmul_dtype="bfloat16", **kw) for impl in FAST_IMPLS}
    for impl in FAST_IMPLS:
        err = max(max_rel_err(g, w) for g, w in zip(jax.tree.leaves(got[impl][:1] + got[impl][1][:3]),
                                                      jax.tree.leaves(want[:1] + want[1][:3])))
        assert 1e-5 < err < 1e-2, (impl, err)  # the lower bound: bf16 is really in use
    assert_trees_close(got["pallas"], got["chunked"], 1e-5, "bf16 pallas vs bf16 chunked")

    state = state_of(inputs)
    primals = (state.weights, state.momentum, state.anchor, *(jnp.asarray(inputs[n]) for n in ARGS))
    grads = {
        impl: jax.jit(jax.grad(functools.partial(_scalar_loss, impl, inputs, 0, dict(kw, **extra)), argnums=tuple(range(9))))(*primals)
        for impl, extra in (("reference", {}), ("chunked", dict(matmul_dtype="bfloat16")), ("pallas", dict(matmul_dtype="bfloat16")))
    }
    assert_trees_close(grads["chunked"], grads["reference"], 2e-2, "bf16 chunked gradients")
    assert_trees_close(grads["pallas"], grads["chunked"], 1e-5, "bf16 pallas vs bf16 chunked gradients")


def test_mosaic_bfloat16_matmuls_and_float32_alike_chunked():
    """The TPU kernel's two matmul precisions against chunked's: the same chunk math, so float32
    round-off apart (values and gradients) at a shape whose tiles are not (8, 128) multiples
    (chunk 4, head dim 16, hidden 32: Mosaic pads them), over 6 chunks (3 groups), ragged."""
    inputs = random_inputs(13, seq=21, depth=2, heads=2, head_dim=16, hidden=32, with_mask=True)
    state = state_of(inputs)
    primals = (state.weights, state.momentum, state.anchor, *(jnp.asarray(inputs[n]) for n in ARGS))
    for matmul_dtype in ("float32", "bfloat16"):
        kw = dict(chunk_size=4, residual_norm=False, matmul_dtype=matmul_dtype)
        got = {impl: run(impl, state, inputs, **kw) for impl in ("chunked", MOSAIC)}
        assert_trees_close(got[MOSAIC], got["chunked"], 1e-5, f"{matmul_dtype} mosaic vs chunked")
    grads = {
        impl: jax.jit(jax.grad(functools.partial(_scalar_loss, impl, inputs, 0, kw), argnums=tuple(range(9))))(*primals)
        for impl in ("chunked", MOSAIC)
    }
    assert_trees_close(grads[MOSAIC], grads["chunked"], 1e-5, "bf16 mosaic vs bf16 chunked gradients")


def test_pallas_and_auto_run_the_mosaic_kernel_on_tpu(monkeypatch):
    from titans.kernels.memory import api

    state = state_of(random_inputs(1, seq=5))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for impl in ("pallas", "auto", "mosaic"):
        assert api._resolve(impl, None, 16, 8, state, jnp.float32) == "mosaic"
    assert api._resolve("chunked", None, 16, 8, state, jnp.float32) == "chunked"
