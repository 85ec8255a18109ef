"""titans-jax: Titans language models (sliding-window attention beside a neural long-term memory)
in JAX / Flax NNX. Subpackages: `titans.kernels` (the memory scan and attention ops), `titans.train`
(training, evaluation, benchmarks), `titans.presets` (the preset YAML files)."""

from titans.config import MemoryConfig, ModelConfig, load_preset
from titans.configfile import ConfigError, preset_names, read_preset
from titans.loading import load
from titans.memory_layer import Telemetry, record
from titans.model import ModelState, TitansLM, count_params
from titans.sampling import generate

__all__ = ["ConfigError", "MemoryConfig", "ModelConfig", "ModelState", "Telemetry", "TitansLM", "count_params",
           "generate", "load", "load_preset", "preset_names", "read_preset", "record"]
