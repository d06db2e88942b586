"""Class priors at inference: the prior shift against hand-computed numbers, the floor, and the EM label-shift
estimate recovering a known prior from simulated calibrated posteriors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, OnlineLabelShiftConfig, PriorsConfig
from pipeline.priors import (
    FER2013_TRAIN_COUNTS,
    FixedPriorShift,
    OnlineLabelShift,
    PriorSettings,
    apply_floor,
    estimate_prior,
    reweight,
)

CLASSES = ("a", "b", "c")
ELEVEN_CLASSES = tuple("abcdefghijk")  # a floor of 0.1 each would need 110% of the mass
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
# Three classes in two dimensions, unit-variance Gaussians: their exact posteriors are a calibrated classifier.
MEANS = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])


def test_the_deployment_prior_reweights_by_target_over_train_as_computed_by_hand() -> None:
    # train (2, 1, 1) -> (0.5, 0.25, 0.25); target (1, 1, 2) -> (0.25, 0.25, 0.5); ratio target/train = (0.5, 1, 2).
    config = PriorsConfig(train_prior={"a": 2, "b": 1, "c": 1}, deployment_prior={"a": 1, "b": 1, "c": 2})
    settings = PriorSettings.from_config(config, CLASSES)
    assert settings is not None
    adjuster = settings.new_adjuster()
    assert isinstance(adjuster, FixedPriorShift)
    adjusted = adjuster.adjust(np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32))
    # Row 1: (0.6*0.5, 0.3*1, 0.1*2) = (0.3, 0.3, 0.2), sum 0.8 -> (0.375, 0.375, 0.25).
    # Row 2: (0.2*0.5, 0.2*1, 0.6*2) = (0.1, 0.2, 1.2), sum 1.5 -> (1/15, 2/15, 0.8).
    expected = np.array([[0.375, 0.375, 0.25], [1 / 15, 2 / 15, 0.8]])
    np.testing.assert_allclose(adjusted, expected, rtol=1e-6)
    assert adjusted.dtype == np.float32
    # The same as adding log(target) - log(train) to the logits and taking the softmax again.
    logits = np.log([0.6, 0.3, 0.1]) + np.log([0.25, 0.25, 0.5]) - np.log([0.5, 0.25, 0.25])
    np.testing.assert_allclose(adjusted[0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)


def test_the_default_training_prior_is_fer2013s_training_counts() -> None:
    # A uniform deployment prior on a uniform row leaves each class's share proportional to 1 / its count.
    uniform = {name: 1.0 for name in FER2013_CLASSES}
    settings = PriorSettings.from_config(PriorsConfig(deployment_prior=uniform), FER2013_CLASSES)
    assert settings is not None
    assert FER2013_TRAIN_COUNTS["disgust"] == 436 and sum(FER2013_TRAIN_COUNTS.values()) == 28_709
    adjusted = settings.new_adjuster().adjust(np.full((1, 7), 1 / 7, np.float32))[0]
    inverse = np.array([1 / FER2013_TRAIN_COUNTS[name] for name in FER2013_CLASSES])
    np.testing.assert_allclose(adjusted, inverse / inverse.sum(), rtol=1e-5)
    assert FER2013_CLASSES[int(np.argmax(adjusted))] == "disgust" and FER2013_CLASSES[int(np.argmin(adjusted))] == "happy"
    # In another class order the vector follows the model's order, not the constant's.
    shuffled = tuple(reversed(FER2013_CLASSES))
    reordered = PriorSettings.from_config(PriorsConfig(deployment_prior=uniform), shuffled)
    assert reordered is not None and reordered.train_prior[0] == pytest.approx(3171 / 28_709)


def test_a_deployment_prior_equal_to_the_training_prior_changes_nothing() -> None:
    counts = {name: float(count) for name, count in FER2013_TRAIN_COUNTS.items()}
    settings = PriorSettings.from_config(PriorsConfig(deployment_prior=counts), FER2013_CLASSES)
    assert settings is not None
    rows = np.random.default_rng(0).dirichlet(np.ones(7), size=5).astype(np.float32)
    np.testing.assert_allclose(settings.new_adjuster().adjust(rows), rows, rtol=1e-5)


def test_priors_off_gives_no_settings_and_empty_frames_pass_through() -> None:
    assert PriorSettings.from_config(PriorsConfig(), ("x", "y")) is None  # no train prior is needed when off
    adjuster = FixedPriorShift(np.array([0.5, 0.5]), np.array([0.9, 0.1]))
    empty = np.zeros((0, 2), np.float32)
    assert adjuster.adjust(empty) is empty


def test_a_row_with_no_mass_under_the_target_is_left_as_it_was() -> None:
    rows = np.array([[0.0, 1.0], [0.5, 0.5]])
    adjusted = reweight(rows, np.array([1.0, 0.0]))  # the target gives class 1 no weight
    np.testing.assert_allclose(adjusted, [[0.0, 1.0], [1.0, 0.0]])


def test_the_floor_lifts_small_shares_and_keeps_the_others_proportions() -> None:
    # c below 0.05 goes to 0.05; a and b share 0.95 in their ratio 0.9 : 0.08.
    np.testing.assert_allclose(apply_floor(np.array([0.9, 0.08, 0.02]), 0.05), [0.9 * 0.95 / 0.98, 0.08 * 0.95 / 0.98, 0.05])
    # b and c both below: a keeps the 0.9 left.
    np.testing.assert_allclose(apply_floor(np.array([0.96, 0.03, 0.01]), 0.05), [0.9, 0.05, 0.05])
    # Not normalised, and a zero share.
    np.testing.assert_allclose(apply_floor(np.array([3.0, 1.0, 0.0]), 0.1), [0.675, 0.225, 0.1])
    np.testing.assert_allclose(apply_floor(np.array([0.2, 0.8]), 0.0), [0.2, 0.8])
    np.testing.assert_allclose(apply_floor(np.array([1.0, 0.0]), 0.5), [0.5, 0.5])
    with pytest.raises(ValueError, match="more than 1"):
        apply_floor(np.array([0.5, 0.5]), 0.6)


def simulate(prior: np.ndarray, train_prior: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Faces drawn under ``prior`` and the exact posteriors of a classifier trained under ``train_prior``."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(prior), size=count, p=prior)
    points = MEANS[labels] + rng.standard_normal((count, 2))
    log_likelihood = -0.5 * ((points[:, None, :] - MEANS[None, :, :]) ** 2).sum(axis=2)
    joint = np.exp(log_likelihood) * train_prior
    return joint / joint.sum(axis=1, keepdims=True), labels


def test_em_recovers_a_synthetic_label_shift() -> None:
    train_prior = np.array([0.2, 0.3, 0.5])
    true_prior = np.array([0.7, 0.2, 0.1])
    posteriors, labels = simulate(true_prior, train_prior, 4000, seed=1)
    # The classifier's average posterior is pulled towards its training prior; the EM undoes that.
    assert np.abs(posteriors.mean(axis=0) - true_prior).max() > 0.1
    estimate, iterations = estimate_prior(posteriors, train_prior, train_prior, max_iterations=500, tolerance=1e-6, floor=0.0)
    np.testing.assert_allclose(estimate, true_prior, atol=0.03)
    assert 1 < iterations < 500 and estimate.sum() == pytest.approx(1.0)
    # The shares of the sample itself, not only the prior it was drawn from.
    np.testing.assert_allclose(estimate, np.bincount(labels, minlength=3) / len(labels), atol=0.03)
    # Re-weighted with the estimate, the posteriors classify the shifted faces better.
    accuracy_before = float((posteriors.argmax(1) == labels).mean())
    accuracy_after = float((reweight(posteriors, estimate / train_prior).argmax(1) == labels).mean())
    assert accuracy_after > accuracy_before + 0.03


def test_the_floor_holds_for_a_class_absent_from_the_window() -> None:
    train_prior = np.array([1 / 3, 1 / 3, 1 / 3])
    posteriors, _labels = simulate(np.array([0.8, 0.2, 0.0]), train_prior, 3000, seed=2)
    unfloored, _ = estimate_prior(posteriors, train_prior, train_prior, max_iterations=1000, tolerance=1e-7, floor=0.0)
    assert unfloored[2] < 0.02  # without the floor the EM drives the absent class towards 0
    floored, _ = estimate_prior(posteriors, train_prior, train_prior, max_iterations=1000, tolerance=1e-7, floor=0.05)
    assert floored[2] == pytest.approx(0.05) and floored.min() >= 0.05 - 1e-12 and floored.sum() == pytest.approx(1.0)
    # The other two share the rest close to their 4 : 1 (the floor's mass is taken from them within the EM, not pro rata).
    np.testing.assert_allclose(floored[:2], [0.76, 0.19], atol=0.05)
    # So a face that clearly shows that class is still called that class.
    clear_c = reweight(np.array([[0.02, 0.03, 0.95]]), floored / train_prior)
    assert int(clear_c.argmax()) == 2


def test_the_online_estimate_follows_the_camera_as_its_window_slides() -> None:
    train_prior = np.array([0.2, 0.3, 0.5])
    config = OnlineLabelShiftConfig(window=1500, min_samples=100, max_iterations=200, tolerance=1e-6, floor=0.01)
    online = OnlineLabelShift(train_prior, train_prior, config)
    first, _ = simulate(np.array([0.7, 0.2, 0.1]), train_prior, 1500, seed=3)
    second, _ = simulate(np.array([0.1, 0.3, 0.6]), train_prior, 1500, seed=4)
    for start in range(0, 1500, 3):  # three faces a frame
        online.adjust(first[start : start + 3].astype(np.float32))
    assert online.samples == 1500
    np.testing.assert_allclose(online.estimate, [0.7, 0.2, 0.1], atol=0.04)
    for start in range(0, 1500, 3):
        adjusted = online.adjust(second[start : start + 3].astype(np.float32))
    # The window now holds only the second prior's faces.
    np.testing.assert_allclose(online.estimate, [0.1, 0.3, 0.6], atol=0.04)
    # Each frame's rows are re-weighted with the estimate made with them.
    np.testing.assert_allclose(adjusted, reweight(second[-3:], online.estimate / train_prior), rtol=1e-5)


def test_the_online_estimate_waits_for_min_samples_with_the_starting_prior() -> None:
    train_prior = np.array([0.5, 0.25, 0.25])
    start = np.array([0.25, 0.25, 0.5])
    online = OnlineLabelShift(train_prior, start, OnlineLabelShiftConfig(window=20, min_samples=4, floor=0.0))
    rows = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    # 2 of 4 samples: the starting (deployment) prior, the hand-computed example above.
    np.testing.assert_allclose(online.adjust(rows), [[0.375, 0.375, 0.25], [1 / 15, 2 / 15, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(online.estimate, start)
    online.adjust(rows)  # 4 samples: the estimate is made from the window
    assert online.last_iterations > 0 and not np.allclose(online.estimate, start)


def test_online_and_deployment_settings_give_each_camera_its_own_state() -> None:
    config = PriorsConfig(deployment_prior={"a": 1, "b": 1, "c": 2}, train_prior={"a": 1, "b": 1, "c": 1}, online=OnlineLabelShiftConfig())
    settings = PriorSettings.from_config(config, CLASSES)
    assert settings is not None
    one, other = settings.new_adjuster(), settings.new_adjuster()
    assert isinstance(one, OnlineLabelShift) and isinstance(other, OnlineLabelShift)
    np.testing.assert_allclose(one.estimate, [0.25, 0.25, 0.5], atol=1e-9)  # it starts from the deployment prior
    one.adjust(np.full((40, 3), 1 / 3, np.float32))
    assert one.samples == 40 and other.samples == 0


@pytest.mark.parametrize(
    ("config", "classes", "field", "message"),
    [
        (PriorsConfig(deployment_prior={"a": 1, "b": 1, "c": 1}), CLASSES, "priors.train_prior", "not FER2013's seven"),
        (
            PriorsConfig(deployment_prior={"a": 1, "b": 1}, train_prior={"a": 1, "b": 1, "c": 1}),
            CLASSES,
            "priors.deployment_prior",
            "missing c",
        ),
        (
            PriorsConfig(deployment_prior={"a": 1, "b": 1, "c": 1, "d": 1}, train_prior={"a": 1, "b": 1, "c": 1}),
            CLASSES,
            "priors.deployment_prior",
            "not a class of the model: d",
        ),
        (PriorsConfig(deployment_prior={"a": 1, "b": 1, "c": 1}, train_prior={"a": 1, "c": 1}), CLASSES, "priors.train_prior", "missing b"),
        (
            PriorsConfig(online=OnlineLabelShiftConfig(floor=0.1), train_prior={name: 1 for name in ELEVEN_CLASSES}),
            ELEVEN_CLASSES,
            "priors.online.floor",
            "more than 1",
        ),
    ],
)
def test_a_prior_that_does_not_fit_the_model_fails_naming_the_field(
    config: PriorsConfig, classes: tuple[str, ...], field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        PriorSettings.from_config(config, classes)
    assert str(caught.value).startswith(f"{field}: ") and message in str(caught.value)
