"""The causal depthwise conv's hand-written VJP against autodiff of the plain taps (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans.conv import conv_taps, causal_depthwise_conv


@pytest.mark.parametrize("kernel,seq", [(4, 9), (1, 5), (3, 1)])
def test_conv_matches_taps_in_values_and_gradients(kernel, seq):
    with jax.enable_x64(True):
        rng = np.random.default_rng(kernel)
        x = jnp.asarray(rng.normal(size=(2, kernel - 1 + seq, 5)))
        w = jnp.asarray(rng.normal(size=(kernel, 5)))
        cot = jnp.asarray(rng.normal(size=(2, seq, 5)))
        np.testing.assert_allclose(causal_depthwise_conv(x, w), conv_taps(x, w), rtol=1e-13)
        # Reference: numpy's causal convolution per channel.
        want = np.array([[np.convolve(x[b, :, c], w[::-1, c], "valid") for c in range(5)] for b in range(2)])
        np.testing.assert_allclose(causal_depthwise_conv(x, w), np.swapaxes(want, 1, 2), rtol=1e-12)
        got = jax.grad(lambda x, w: jnp.sum(causal_depthwise_conv(x, w) * cot), argnums=(0, 1))(x, w)
        ref = jax.grad(lambda x, w: jnp.sum(conv_taps(x, w) * cot), argnums=(0, 1))(x, w)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
