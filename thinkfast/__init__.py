"""thinkfast: distil Transformer reasoners into fast Mamba-2 students and measure inference scaling under fixed time."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  registers model_type "thinkfast" with the transformers Auto classes
