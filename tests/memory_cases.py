"""Inputs and oracles shared by the memory-scan tests.

`hand_loop` is a second, independent oracle: spec section 1 in float64 numpy with every gradient
written out by hand (no autodiff), so the reference itself is checked, not only compared.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import jax.numpy as jnp

from titans.kernels.memory import MemoryState
from titans.kernels.memory.common import layer_shapes


def pairwise(factors: dict[str, list[Any]], seed: int = 0, tries: int = 64) -> list[dict[str, Any]]:
    """A small covering array: every pair of values of every two factors appears in some case.

    Greedy (AETG-style) with a fixed seed, so the cases are the same on every run.
    """
    names = list(factors)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
    }
    rng = random.Random(seed)
    cases = []
    while uncovered:
        # Seed each candidate with one uncovered pair so every round makes progress.
        best, best_gain = None, -1
        for _ in range(tries):
            a, va, b, vb = rng.choice(sorted(uncovered, key=repr))
            case = {n: rng.choice(factors[n]) for n in names}
            case[a], case[b] = va, vb
            gain = sum(
                (x, case[x], y, case[y]) in uncovered for x, y in itertools.combinations(names, 2)
            )
            if gain > best_gain:
                best, best_gain = case, gain
        uncovered -= {(x, best[x], y, best[y]) for x, y in itertools.combinations(names, 2)}
        cases.append(best)
    return cases


def random_inputs(
    seed: int,
    *,
    batch: int = 2,
    seq: int = 11,
    heads: int = 2,
    head_dim: int = 8,
    hidden: int = 16,
    depth: int = 2,
    per_layer: bool = False,
    with_mask: bool = False,
    dtype=np.float32,
) -> dict[str, Any]:
    """Well-conditioned random inputs (spec section 2, "Conditioning"): unit-norm q/k, theta <= 0.1.

    The momentum is nonzero so every carried-state term of the chunk form is exercised.
    """
    rng = np.random.default_rng(seed)
    weights = tuple(
        rng.normal(size=(batch, heads, n_in, n_out)) / np.sqrt(n_in) for n_in, n_out in layer_shapes(head_dim, hidden, depth)
    )
    momentum = tuple(0.05 * rng.normal(size=w.shape) / np.sqrt(w.shape[-2]) for w in weights)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    shape = (batch, seq, heads, head_dim)
    out = dict(
        weights=weights,
        momentum=momentum,
        q=unit(rng.normal(size=shape)),
        k=unit(rng.normal(size=shape)),
        v=rng.normal(size=shape),
        theta=rng.uniform(0.0, 0.1, size=shape[:3] + ((depth,) if per_layer else ())),
        eta=rng.uniform(0.5, 1.0, size=shape[:3]),
        alpha=rng.uniform(0.0, 0.2, size=shape[:3]),
    )
    out = {k: tuple(np.asarray(x, dtype) for x in v) if isinstance(v, tuple) else np.asarray(v, dtype) for k, v in out.items()}
    out["mask"] = rng.uniform(size=(batch, seq)) > 0.3 if with_mask else None
    return out


def state_of(inputs: dict[str, Any]) -> MemoryState:
    return MemoryState.create(tuple(map(jnp.asarray, inputs["weights"])), tuple(map(jnp.asarray, inputs["momentum"])))


# ---- the hand-written float64 oracle -------------------------------------------------------------

_C = np.sqrt(2.0 / np.pi)


def _act(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1.0 + np.tanh(_C * (x + 0.044715 * x**3)))
    return x / (1.0 + np.exp(-x))


def _act_grad(x, kind):
    if kind == "gelu":
        t = np.tanh(_C * (x + 0.044715 * x**3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * _C * (1.0 + 3 * 0.044715 * x**2)
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _forward(ws, x, kind, residual_norm):
    """One head, one token: returns prediction, layer inputs, pre-activations, LN output and scale."""
    inputs, pre = [], []
    h = x
    for layer, w in enumerate(ws):
        inputs.append(h)
        z = h @ w
        pre.append(z)
        h = _act(z, kind) if layer < len(ws) - 1 else z
    if not residual_norm:
        return h, inputs, pre, None, None
    sd = np.sqrt(np.var(h) + 1e-5)
    normed = (h - h.mean()) / sd
    return x + normed, inputs, pre, normed, sd


def _grads(ws, k, v, kind, residual_norm):
    pred, inputs, pre, normed, sd = _forward(ws, k, kind, residual_norm)
    d = 2.0 * (pred - v)
    if residual_norm:  # LayerNorm backward
        d = (d - d.mean() - normed * np.mean(d * normed)) / sd
    grads = [None] * len(ws)
    for layer in reversed(range(len(ws))):
        grads[layer] = np.outer(inputs[layer], d)
        if layer:
            d = (d @ ws[layer].T) * _act_grad(pre[layer - 1], kind)
    return grads


def hand_loop(inputs, *, chunk_size, activation, residual_norm, read_before_write=False, offset=0, anchor=None):
    """Spec section 1 token by token in float64; returns y [B, T, H, D] and (W, S, anchor)."""
    f64 = lambda x: np.asarray(x, np.float64)
    q, k, v, eta, alpha = (f64(inputs[n]) for n in ("q", "k", "v", "eta", "alpha"))
    B, T, H, _ = q.shape
    depth = len(inputs["weights"])
    theta = f64(inputs["theta"])
    if theta.ndim == 3:
        theta = np.repeat(theta[..., None], depth, axis=-1)
    mask = np.ones((B, T), bool) if inputs["mask"] is None else np.asarray(inputs["mask"])
    W = [f64(w).copy() for w in inputs["weights"]]
    S = [f64(s).copy() for s in inputs["momentum"]]
    A = [f64(a).copy() for a in (anchor if anchor is not None else inputs["weights"])]
    y = np.zeros_like(q)
    for bi, hi in itertools.product(range(B), range(H)):
        w = [x[bi, hi].copy() for x in W]
        s = [x[bi, hi].copy() for x in S]
        a = [x[bi, hi].copy() for x in A]
        pos = offset
        for t in range(T):
            if pos % chunk_size == 0:
                a = [x.copy() for x in w]
            before = [x.copy() for x in w]
            if mask[bi, t]:
                g = _grads(a, k[bi, t, hi], v[bi, t, hi], activation, residual_norm)
                for layer in range(depth):
                    s[layer] = eta[bi, t, hi] * s[layer] - theta[bi, t, hi, layer] * g[layer]
                    w[layer] = (1.0 - alpha[bi, t, hi]) * w[layer] + s[layer]
            read = before if read_before_write else w
            y[bi, t, hi] = _forward(read, q[bi, t, hi], activation, residual_norm)[0]
            pos += 1
        if pos % chunk_size == 0:
            a = [x.copy() for x in w]
        for layer in range(depth):
            W[layer][bi, hi], S[layer][bi, hi], A[layer][bi, hi] = w[layer], s[layer], a[layer]
    return y, (W, S, A)
