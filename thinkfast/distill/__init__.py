"""Distillation: MOHAWK stages 1-3 (Llamba), hybrid KD (MambaInLlama), SFT, and the one trainer they share.

    from thinkfast.distill import distill, sft, StageConfig, TrainConfig, DataConfig
    student = distill(teacher, "llamba", DataConfig(specs=["gsm8k:..."]),
                      [StageConfig("matrix", TrainConfig(tokens=100_000)), StageConfig("hidden", ...),
                       StageConfig("kd", ...)], tokenizer=tok, out_dir="runs/llamba")
"""

from ..data.packing import DataConfig, DataMix, build_data
from .recipes import load_recipe, make_plan
from .stages import StageConfig, distill, sft
from .trainer import TrainConfig, TrainingDiverged, train

__all__ = ["distill", "sft", "train", "StageConfig", "TrainConfig", "DataConfig", "DataMix", "build_data",
           "load_recipe", "make_plan", "TrainingDiverged"]
