import json

import pytest
import torch
import torch.nn.functional as F

from pipeline import cli
from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, load_checkpoint, save_checkpoint
from pipeline.training.data import FER_CLASSES
from pipeline.training.distill import DistillationObjective, distillation_loss

FAST = ["--arch", "tiny", "--batch-size", "16", "--threads", "1", "--no-progress", "--lr-warmup-epochs", "0"]


def test_distillation_loss_is_the_weighted_sum_of_scaled_kl_and_cross_entropy() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    targets = F.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).float()
    t = 3.0
    teacher_p = torch.softmax(teacher / t, 1)
    kl = (teacher_p * (teacher_p.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    ce = F.cross_entropy(student, targets)
    assert torch.allclose(distillation_loss(student, teacher, targets, 0.25, t), 0.25 * kl + 0.75 * ce, atol=1e-6)
    assert torch.allclose(distillation_loss(student, teacher, targets, 1.0, t), kl, atol=1e-6)
    # A student equal to its teacher has nothing left to learn from the soft term.
    assert float(distillation_loss(teacher, teacher, targets, 1.0, t)) == pytest.approx(0.0, abs=1e-6)


def save_tiny(path, seed: int, mean: float = 0.5, std: float = 0.3, input_size: int = 44):
    torch.manual_seed(seed)
    meta = ModelMetadata(f"tiny-{seed}", "tiny", {}, FER_CLASSES, input_size, 48, True, (mean,), (std,), 0.0, {"accuracy": 0.5})
    save_checkpoint(path, build_model("tiny", 7), meta)
    return path


def test_teacher_sees_the_batch_in_its_own_normalization_and_gets_no_gradient(tmp_path) -> None:
    objective = DistillationObjective(save_tiny(tmp_path / "t.pt", 1, mean=0.4, std=0.2), alpha=0.5, temperature=2.0)
    student_meta = ModelMetadata("s", "tiny", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.0, {})
    objective.bind(student_meta, torch.device("cpu"), torch.contiguous_format)
    raw = torch.rand(3, 1, 44, 44)
    with torch.no_grad():
        expected = objective.teacher((raw - 0.4) / 0.2)
    logits = objective.teacher_logits((raw - 0.5) / 0.3)
    assert torch.allclose(logits, expected, atol=1e-5) and not logits.requires_grad
    mismatched = DistillationObjective(save_tiny(tmp_path / "t40.pt", 1, input_size=40), alpha=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="input_size 40 differs"):
        mismatched.bind(student_meta, torch.device("cpu"), torch.contiguous_format)


def test_ferstream_distill_trains_a_student_from_an_initial_checkpoint_and_resumes(tiny_data, tmp_path, capsys) -> None:
    teacher = save_tiny(tmp_path / "teacher.pt", 1)
    init = save_tiny(tmp_path / "init.pt", 2)
    out = tmp_path / "run"
    args = ["distill", "--data-path", str(tiny_data), "--output-dir", str(out), *FAST, "--teacher", str(teacher)]
    args += ["--init-from", str(init), "--kd-alpha", "0.8", "--kd-temperature", "3", "--label-smoothing", "0.1", "--lr", "0"]
    assert cli.main([*args, "--epochs", "2", "--stop-after", "1"]) == 0
    # lr 0: the student's weights are still exactly the initial checkpoint's (BatchNorm statistics do move).
    student, metadata = load_checkpoint(out / "best.pt")
    initial, _ = load_checkpoint(init)
    student_parameters = dict(student.named_parameters())
    for key, value in initial.named_parameters():
        assert torch.equal(student_parameters[key], value), key
    assert metadata.metrics["distillation"] == {
        "teacher": str(teacher),
        "teacher_model_id": "tiny-1",
        "teacher_val_accuracy": 0.5,
        "alpha": 0.8,
        "temperature": 3.0,
    }
    assert cli.main([*args, "--epochs", "2", "--resume", "auto"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "resumed from" in capsys.readouterr().out


def test_distill_refuses_bad_settings(tiny_data, tmp_path, capsys) -> None:
    base = ["distill", "--data-path", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST, "--epochs", "1"]
    assert cli.main([*base, "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert cli.main([*base, "--teacher", str(save_tiny(tmp_path / "t.pt", 1)), "--kd-alpha", "1.5"]) == 2
    assert "--kd-alpha must be in [0, 1]" in capsys.readouterr().err
    wide = tmp_path / "wide.pt"
    save_checkpoint(wide, build_model("wide", 7), ModelMetadata("w", "wide", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.0, {}))
    assert cli.main([*base, "--teacher", str(wide), "--init-from", str(wide)]) == 2
    assert "it is a 'wide' model" in capsys.readouterr().err
