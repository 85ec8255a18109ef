"""titans-jax models: the neural long-term memory layer and the Titans language models."""

from titans.config import ConfigError, ModelConfig, load_preset, preset_names, read_config
from titans.model import ModelState, TitansLM, count_params

__all__ = ["ConfigError", "ModelConfig", "ModelState", "TitansLM", "count_params", "load_preset", "preset_names",
           "read_config"]
