"""The batched sampling engine (teacher and students alike), the samples file, and `thinkfast bench`."""

from .engine import Completion, Engine, EngineStats, model_role, stop_token_ids
from .sampling import SamplingParams, sample_seed, sample_tokens

__all__ = ["Completion", "Engine", "EngineStats", "SamplingParams", "model_role", "sample_seed", "sample_tokens", "stop_token_ids"]
