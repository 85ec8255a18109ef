"""Mixers: the token-mixing half of a block, one file each, registered by variant name.

A mixer is an `nnx.Module` built as `Mixer(cfg: ModelConfig, rngs=...)` with
    init_state(batch) -> a state pytree whose size never depends on how many tokens it has seen
    __call__(x, state, start, plan) -> (delta, state)
where `x [batch, seq, d_model]` is the residual stream (the mixer applies its own pre-norms, so MAL
can chain two residual steps), `delta` is added to it, `state=None` means a sequence start,
`start` is the absolute position of `x[:, 0]` (an int or a traced int32 scalar) and `plan` is MAC's
split of `seq` at segment boundaries (`segment_plan`; other mixers ignore it).
A new variant is one file here and one entry in `MIXERS` and in `titans.config.VARIANTS` (the
config imports no model code; tests/test_config.py checks that the two agree).
"""

from titans.mixers.lmm import LMM
from titans.mixers.mac import MAC, segment_plan
from titans.mixers.mag import MAG
from titans.mixers.mal import MAL
from titans.mixers.swa import SWA

MIXERS = {"swa": SWA, "lmm": LMM, "mag": MAG, "mal": MAL, "mac": MAC}

__all__ = ["MIXERS", "LMM", "MAC", "MAG", "MAL", "SWA", "segment_plan"]
