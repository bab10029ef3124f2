"""thinkfast: distil Transformer reasoners into fast Mamba-2 students and measure inference scaling under fixed time."""

__version__ = "0.1.0"

from . import models  # noqa: E402  registers model_type "thinkfast" with the transformers Auto classes
from .engine.decode import DecodeStep  # noqa: E402

# transformers' generate() on a thinkfast model decodes with the engine's fused step (models/ cannot import it)
models.ThinkfastForCausalLM.generation_step = DecodeStep
