"""The stages on a tiny model: what trains, what stays frozen, losses fall, and KD is zero when student = teacher."""

import pytest
import torch

from thinkfast.data.packing import DataConfig, build_data
from thinkfast.distill.stages import AlignTask, KDTask, SFTTask, StageConfig, check_compatible, distill, sft
from thinkfast.distill.toy import chain_sum_problems, char_tokenizer, random_model, tiny_config
from thinkfast.distill.trainer import TrainConfig, train
from thinkfast.errors import ConfigError
from thinkfast.models import from_teacher





@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    cfg = tiny_config(len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
    teacher = random_model(cfg, seed=0, tokenizer=tok)
    data = DataConfig(specs=[chain_sum_problems(60, seed=1)], instruction="none", chat=False)
    return tok, teacher, data


def _tc(steps, B=4, T=64, **kw):
    return TrainConfig(tokens=steps * B * T, batch_size=B, seq_len=T, log_every=1, warmup=0, **kw)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.lm.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.lm.named_parameters() if not torch.equal(before[n], p.detach())}


def test_matrix_stage_trains_only_mixers_and_its_loss_falls(setup):
    tok, teacher, data = setup
    student = from_teacher(teacher, "llamba")
    before = _snapshot(student)
    mix = build_data(data, tok, 64)
    task = AlignTask(teacher, student, "matrix")
    res = train(task, mix, _tc(12, lr=3e-3), progress=False)
    changed = _changed(before, student)
    assert changed and all(".mixer." in n for n in changed)
    losses = [r["step_loss"] for r in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert {"layer0", "layer1"} <= set(res.history[0])


def test_matrix_stage_leaves_the_rows_its_loss_never_reads_as_they_were(setup):
    """The mixing matrix reads only in_proj's B, C and dt rows: weight decay must not shrink the x and z rows
    (x copied from the teacher's V), which nothing in the stage optimises."""
    tok, teacher, data = setup
    student = from_teacher(teacher, "llamba")
    mixer = student.lm.layers[0].mixer
    unread = slice(0, mixer.d_inner + mixer.d_x)  # z, then x
    before = mixer.in_proj.weight.detach().clone()
    train(AlignTask(teacher, student, "matrix"), build_data(data, tok, 64), _tc(5, lr=1e-2, weight_decay=0.1),
          progress=False)
    after = mixer.in_proj.weight.detach()
    assert torch.equal(after[unread], before[unread])
    assert not torch.equal(after, before)  # the rows the matrix reads did train
    student = from_teacher(teacher, "llamba")  # the hidden stage's loss reads every row: it decays as configured
    assert AlignTask(teacher, student, "hidden").weight_decay_applies


def test_kd_cross_entropy_averages_over_the_solution_tokens(setup):
    """--ce-weight w adds w x the CE per solution token (SFT's and HF's labels loss), also when the KL counts
    every real position (prompts included)."""
    tok, teacher, data = setup
    student = from_teacher(teacher, "llamba")
    batch = build_data(data, tok, 64).next_batch(4)
    sft_task = SFTTask(student)
    with torch.no_grad():
        sft_loss, _ = sft_task.loss(batch)
    ce_per_solution_token = float(sft_loss) / sft_task.count(batch)
    for positions in ("all", "targets"):
        with torch.no_grad():
            totals = {}
            for w in (0.0, 2.0):
                task = KDTask(teacher, student, ce_weight=w, positions=positions)
                n = task.count(batch)
                loss, parts = task.loss(batch)
                totals[w] = float(loss) / n
        assert (totals[2.0] - totals[0.0]) / 2 == pytest.approx(ce_per_solution_token, rel=1e-5)
        assert float(parts["ce"]) / n == pytest.approx(ce_per_solution_token, rel=1e-5)  # as logged
    assert task.count(batch) < int(batch["real"].sum())
    assert KDTask(teacher, student).count(batch) == int(batch["real"].sum())


def test_a_python_student_built_from_a_bf16_teacher_trains_in_float32(setup, caplog):
    tok, teacher, data = setup
    half = random_model(teacher.model_config, seed=0, tokenizer=tok).to(torch.bfloat16)
    student = distill(half, "llamba", data, [StageConfig("kd", train=_tc(1))], tokenizer=tok, progress=False)
    assert student.lm.embed.weight.dtype == torch.float32
    with caplog.at_level("WARNING", logger="thinkfast"):
        sft(from_teacher(half, "llamba"), data, _tc(1), tokenizer=tok, progress=False)
    assert "bfloat16" in caplog.text and "model.float()" in caplog.text


def test_hidden_stage_loss_falls_and_mlps_train_only_when_asked(setup):
    tok, teacher, data = setup
    mix = build_data(data, tok, 64)
    student = from_teacher(teacher, "llamba")
    before = _snapshot(student)
    res = train(AlignTask(teacher, student, "hidden", layers=[1]), mix, _tc(12, lr=3e-3), progress=False)
    changed = _changed(before, student)
    assert changed and all(n.startswith("layers.1.mixer.") for n in changed)
    assert res.history[-1]["step_loss"] < res.history[0]["step_loss"]
    before = _snapshot(student)
    train(AlignTask(teacher, student, "hidden", train_mlp=True), build_data(data, tok, 64), _tc(2, lr=3e-3), progress=False)
    assert any(".mlp." in n for n in _changed(before, student))


def test_kd_is_zero_when_the_student_is_the_teacher(setup):
    tok, teacher, data = setup
    same = from_teacher(teacher, "teacher")  # every layer keeps attention
    batch = build_data(data, tok, 64).next_batch(4)
    for loss in ("forward_kl", "reverse_kl"):
        task = KDTask(teacher, same, loss)
        l_sum, parts = task.loss(batch)
        assert abs(l_sum.item()) / task.count(batch) < 1e-5
    student = from_teacher(teacher, "hybrid", attn_layers=[1])
    task = KDTask(teacher, student, "reverse_kl")
    assert task.loss(batch)[0].item() / task.count(batch) > 1e-4


def test_kd_with_frozen_mlps_and_hybrid_distill_lowers_kl(setup):
    tok, teacher, data = setup
    student = from_teacher(teacher, "hybrid", attn_layers=[1])
    before = _snapshot(student)
    stage = StageConfig("kd", _tc(10, lr=3e-3), freeze=["mlp"])
    records = []
    distill(teacher, student, data, [stage], tokenizer=tok, progress=records.append)
    changed = _changed(before, student)
    assert not any(".mlp." in n for n in changed)
    assert any("layers.0.mixer" in n for n in changed)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["stage"] == "kd" and "kl" in records[0]


def test_sft_from_scratch_lowers_cross_entropy(setup):
    tok, teacher, data = setup
    cfg = teacher.model_config
    model = random_model(cfg, seed=3, tokenizer=tok)
    records = []
    sft(model, data, _tc(15, lr=1e-2), tokenizer=tok, progress=records.append)
    assert records[-1]["step_loss"] < records[0]["step_loss"] - 0.5


def test_mismatched_teacher_and_student_are_refused(setup):
    tok, teacher, data = setup
    other = random_model(tiny_config(len(tok), d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64), seed=1)
    student = from_teacher(other, "llamba")
    with pytest.raises(ConfigError, match="d_model 32 vs 48"):
        distill(teacher, student, data, [StageConfig("matrix", _tc(1))], tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match="not Mamba layers"):
        distill(teacher, from_teacher(teacher, "hybrid", attn_layers=[1]), data,
                [StageConfig("matrix", _tc(1), layers=[1])], tokenizer=tok, progress=False)
    check_compatible(teacher.model_config, student.model_config.replace(d_model=48), "kd")  # KD needs only the vocab


def test_sft_task_counts_completion_tokens_only(setup):
    tok, teacher, data = setup
    batch = build_data(data, tok, 64).next_batch(4)
    task = SFTTask(random_model(teacher.model_config, seed=2))
    assert task.count(batch) == int((batch["targets"] != -100).sum()) < int(batch["real"].sum())


def test_python_runs_train_on_the_prompts_the_teacher_declares(setup, tmp_path):
    """A DataConfig without an instruction takes the one the teacher (or the model sft trains) declares, as the
    CLI does; a student trained on other prompts declares those, so `thinkfast sample` prompts it as trained."""
    import copy
    import json

    from thinkfast.models import ThinkfastForCausalLM

    tok, teacher, data = setup
    declaring = copy.deepcopy(teacher)
    declaring.config.prompt_style = {"instruction": "none"}
    specs = DataConfig(specs=data.specs, chat=False)
    assert specs.instruction is None
    student = distill(declaring, "llamba", specs, [StageConfig("kd", train=_tc(1))], tokenizer=tok,
                      out_dir=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["data"]["instruction"] == "none"
    assert student.config.prompt_style == {"instruction": "none"}
    hashed = DataConfig(specs=data.specs, chat=False, instruction="hash")
    distill(declaring, "llamba", hashed, [StageConfig("kd", train=_tc(1))], tokenizer=tok, out_dir=tmp_path / "b",
            progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["prompt_style"] == {"instruction": "hash"}
    tuned = sft(random_model(teacher.model_config, seed=3, tokenizer=tok), specs, _tc(1, T=256), tokenizer=tok,
                out_dir=tmp_path / "c", progress=False)  # declares nothing: auto, and nothing to declare
    assert json.loads((tmp_path / "c" / "run.json").read_text())["data"]["instruction"] == "auto"
    assert getattr(ThinkfastForCausalLM.from_pretrained(tmp_path / "c").config, "prompt_style", None) is None
    assert tuned.config.to_dict().get("prompt_style") is None


@pytest.mark.parametrize("kind", ["matrix", "hidden"])
def test_a_student_in_another_precision_than_its_teacher_aligns(setup, kind):
    """fp32 teacher, bf16 student (and the reverse): the student's layers read the teacher's hidden states in
    their own precision (a dtype error from inside torch before)."""
    tok, teacher, data = setup
    for t_dtype, s_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        student = from_teacher(teacher, kind="llamba").to(s_dtype)
        records = []
        distill(random_model(teacher.model_config, seed=0, tokenizer=tok).to(t_dtype), student, data,
                [StageConfig(kind, train=_tc(1))], tokenizer=tok, progress=records.append)
        assert records and all(torch.isfinite(torch.tensor(r["step_loss"])) for r in records if "step_loss" in r)
        assert student.lm.embed.weight.dtype == s_dtype
