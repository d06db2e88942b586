"""The training steps: the schedule and one evaluation (whole epochs run in test_train.py)."""

import argparse

import pytest
import torch
from torch import nn

from pipeline.training.loop import epoch_order, epochs_within_budget, evaluate, make_scheduler


def _args(**overrides: object) -> argparse.Namespace:
    values = {"lr_scheduler": "cosine", "lr_warmup_epochs": 1.0, "epochs": 4, "lr_min_ratio": 0.1}
    return argparse.Namespace(**{**values, **overrides})


def test_cosine_warms_up_linearly_then_decays_to_its_floor() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(_args(), optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)  # lr_min_ratio


def test_sampler_order_draws_rare_classes_as_often_as_common_ones() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = epoch_order(labels, "sampler", torch.Generator().manual_seed(0), num_classes=2)
    share = float((labels[order] == 1).float().mean())
    assert len(order) == 100 and 0.35 < share < 0.65
    plain = epoch_order(labels, "none", torch.Generator().manual_seed(0), num_classes=2)
    assert sorted(plain.tolist()) == list(range(100))


def test_evaluate_scores_a_model_that_knows_the_answer() -> None:
    class Oracle(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # class 1 where the image is bright, class 0 where dark
            bright = x.mean(dim=(1, 2, 3)) > 0
            return torch.stack([(~bright).float(), bright.float()], dim=1) * 10

    inputs = torch.cat([torch.full((3, 1, 4, 4), -1.0), torch.full((2, 1, 4, 4), 1.0)])
    labels = torch.tensor([0, 0, 0, 1, 0])
    loss, metrics = evaluate(Oracle(), inputs, labels, ("dark", "bright"))
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["confusion_matrix"] == [[3, 1], [0, 1]]
    assert loss > 0


def test_a_shortened_schedule_survives_the_state_dict() -> None:
    def scheduler() -> torch.optim.lr_scheduler.LambdaLR:
        return make_scheduler(_args(epochs=100), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), steps_per_epoch=10)

    first = scheduler()
    first.lr_lambdas[0].total_steps = 200
    second = scheduler()
    second.load_state_dict(first.state_dict())
    assert second.lr_lambdas[0].total_steps == 200


@pytest.mark.parametrize(
    ("done", "times", "remaining", "expected"),
    [
        (1, [10.0], 35.0, 4),  # 3 more fit
        (3, [30.0, 10.0, 12.0], 35.0, 6),  # the mean without the slow first epoch (11 s)
        (4, [30.0, 8.0, 8.0, 20.0], 35.0, 6),  # the steady mean (12 s), not the last, slow epoch (20 s: 5)
        (5, [10.0], 5.0, 5),  # none fit: stop now, never below what is done
        (5, [10.0], 1e6, 40),  # at most what was asked
        (2, [], 10.0, 40),  # nothing measured yet
    ],
)
def test_epochs_within_budget(done: int, times: list[float], remaining: float, expected: int) -> None:
    assert epochs_within_budget(done, 40, times, remaining) == expected
