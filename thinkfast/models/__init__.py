from .config import ModelConfig
from .hf import ThinkfastConfig, ThinkfastForCausalLM
from .model import LMOutput, ModelState, ThinkfastLM
from .transfer import from_teacher

__all__ = ["ModelConfig", "ThinkfastConfig", "ThinkfastForCausalLM", "ThinkfastLM", "ModelState", "LMOutput", "from_teacher"]
