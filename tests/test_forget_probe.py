"""The forget probe (titans.train.eval.forget, scripts/forget_probe.py): the shift lands on every
memory layer's forget-gate bias and changes the gate; `--drift` and `--gates` read the state and
the gates (mac's through its segment scan too); a model without memory and a missing run fail in
one line."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titans
from tests.scripts import run_script
from titans.train.eval import forget as forget_probe


def test_shift_moves_every_forget_gate():
    model = titans.TitansLM(titans.load_preset("tiny", variant="mag"), rngs=nnx.Rngs(0))
    memories = [block.mixer.memory for block in model.blocks]  # mag holds the NeuralMemory itself
    before = [np.asarray(m.b_alpha[...]) for m in memories]
    x = jnp.ones((1, 3, model.config.d_model))
    alpha = lambda m: float(jnp.mean(m.gates(x)[2]))
    gates = [alpha(m) for m in memories]
    forget_probe.shifted(model, -3.0)
    for m, b, g in zip(memories, before, gates):
        np.testing.assert_allclose(np.asarray(m.b_alpha[...]), b - 3.0, rtol=1e-6)
        assert alpha(m) < 0.1 * g
    with pytest.raises(ValueError, match="a swa model has no memory to probe"):
        forget_probe.shifted(titans.TitansLM(titans.load_preset("tiny", variant="swa"), rngs=nnx.Rngs(0)), 1.0)


def test_missing_run_fails_in_one_line(tmp_path):
    code, _, stderr = run_script("forget_probe", "--checkpoint", str(tmp_path))
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("forget_probe: ") and "is neither a run folder" in stderr


def test_drift_reports_filler_loss_and_memory_norms():
    """`--drift`: a row per power of two of the piece; strong forgetting shrinks the memory below
    W^0 while no forgetting does not."""
    from titans.tokenizer import ByteTokenizer

    cfg = titans.load_preset("tiny", variant="lmm")
    rows = {}
    for shift in (-30.0, 6.0):
        model = forget_probe.shifted(titans.TitansLM(cfg, rngs=nnx.Rngs(0)), shift)
        rows[shift] = forget_probe.drift(model, ByteTokenizer(), 1536, piece=256)
    assert [r["position"] for r in rows[6.0]] == [256, 512, 1024, 1536]
    for r in rows[6.0] + rows[-30.0]:
        assert 0 < r["bits"] < 16 and len(r["norm_ratio"]) == cfg.n_layers
    assert rows[6.0][0]["norm_ratio"][0] < 0.5 and rows[-30.0][0]["norm_ratio"][0] > 0.9


def test_gates_by_part_and_their_sums_after_the_needle():
    """`--gates`: a bias shift on one layer's write rate moves that layer's theta and not its alpha;
    a constant gate gives sums of exactly one value per filler token between needle and question."""
    from titans.train.data import needles
    from titans.tokenizer import ByteTokenizer

    cfg = titans.load_preset("tiny", variant="lmm")
    model = titans.TitansLM(cfg, rngs=nnx.Rngs(0))
    base = forget_probe.gate_profile(model, ByteTokenizer(), 1024, piece=256)
    assert len(base) == cfg.n_layers
    first = forget_probe.memories(model)[0]
    first.b_theta[...] = first.b_theta[...] - 4.0
    lowered = forget_probe.gate_profile(model, ByteTokenizer(), 1024, piece=256)
    for part in ("filler", "needle", "question"):
        assert lowered[0][part]["theta"] < 0.1 * base[0][part]["theta"]
        assert lowered[0][part]["alpha"] == pytest.approx(base[0][part]["alpha"], rel=1e-5)
    assert lowered[0]["theta_sum_after"] < 0.1 * base[0]["theta_sum_after"]
    # with its input weights zeroed, a gate is a constant: the sums count the filler after the needle
    second = forget_probe.memories(model)[1]
    second.w_theta[...], second.w_alpha[...] = 0 * second.w_theta[...], 0 * second.w_alpha[...]
    theta, _, alpha = (float(g.mean()) for g in second.gates(jnp.zeros((1, 1, cfg.d_model))))
    sample = needles.make_sample("passkey", 1024, 0.5, 0, ByteTokenizer())
    after = 1024 - sample.needle_at - sample.needle_len - sample.question_len
    row = forget_probe.gate_profile(model, ByteTokenizer(), 1024, piece=256)[1]
    assert row["filler"]["theta"] == pytest.approx(theta, rel=1e-5)
    assert row["theta_sum_after"] == pytest.approx(after * theta, rel=1e-4)
    assert row["alpha_sum_after"] == pytest.approx(after * alpha, rel=1e-4)
    with pytest.raises(ValueError, match="a swa model has no memory"):
        forget_probe.gate_profile(titans.TitansLM(titans.load_preset("tiny", variant="swa"), rngs=nnx.Rngs(0)),
                                  ByteTokenizer(), 1024)
    # mac's memory runs inside its segment scan, whose records come out joined along the sequence
    mac = titans.TitansLM(titans.load_preset("tiny", variant="mac"), rngs=nnx.Rngs(0))
    rows = forget_probe.gate_profile(mac, ByteTokenizer(), 1024, piece=200)  # pieces cut segments
    assert len(rows) == cfg.n_layers
    assert all(0 < row[part]["theta"] < cfg.memory.max_lr for row in rows for part in ("filler", "needle", "question"))
