"""thinkfast: distil Transformer reasoners into fast Mamba-2 students and measure inference scaling under fixed time."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

try:  # torch and transformers load here, for a second or more: Ctrl-C in that time is a `thinkfast` interrupt too
    from . import models  # registers model_type "thinkfast" with the transformers Auto classes
    from .engine.decode import DecodeStep
except KeyboardInterrupt:
    if _os.path.basename((getattr(_sys, "argv", None) or [""])[0]) != "thinkfast":  # a library import: the caller's
        raise
    print("thinkfast: interrupted while starting; nothing was done", file=_sys.stderr)
    raise SystemExit(130) from None

# transformers' generate() on a thinkfast model decodes with the engine's fused step (models/ cannot import it)
models.ThinkfastForCausalLM.generation_step = DecodeStep
