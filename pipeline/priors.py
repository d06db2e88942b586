"""Class priors at inference: a fixed deployment prior, and a per-camera online estimate of the label shift.

A classifier's probabilities p(y|x) carry the class prior it was trained under. Where faces come with
another prior (on most cameras most faces are neutral; FER2013's training split has about as many sad
faces as neutral ones), Bayes' rule gives the probabilities under the new prior by re-weighting each
class and renormalising:

    p'(y|x) = p(y|x) * target(y) / train(y) / sum_k p(k|x) * target(k) / train(k)

which is adding ``log target(y) - log train(y)`` to the logits (a logit adjustment). ``FixedPriorShift``
applies a configured target prior (``priors.deployment_prior``). ``OnlineLabelShift`` estimates the
target prior of one camera from its own recent faces with the EM of Saerens, Latinne & Decaestecker
(2002), "Adjusting the outputs of a classifier to new a priori probabilities: a simple procedure",
Neural Computation 14(1): the E step re-weights the window's probabilities with the current estimate,
the M step takes their mean as the next estimate. A floor keeps every class's estimated share above
zero, so a class that did not occur in the window can still be predicted when it does.

Both assume the model's probabilities are calibrated and that only the class prior differs between
training and deployment (p(x|y) unchanged); neither holds exactly for faces on video, so the result is
a correction of the prior, not of the domain shift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from pipeline.config import ConfigError, OnlineLabelShiftConfig, PriorsConfig

__all__ = [
    "FER2013_TRAIN_COUNTS",
    "FixedPriorShift",
    "OnlineLabelShift",
    "PriorSettings",
    "ProbabilityAdjuster",
    "apply_floor",
    "estimate_prior",
    "reweight",
]

# Images per class in FER2013's Training split (28,709), as MODEL_CARD.md lists them and as
# /work/shared/datasets/fer2013/train holds them: the training prior of the shipped model and of any
# model `ferstream train` made from that split. ModelMetadata records no class counts, so this is the
# default for a model with exactly these classes; other models need ``priors.train_prior``.
FER2013_TRAIN_COUNTS: Mapping[str, int] = {
    "angry": 3995,
    "disgust": 436,
    "fear": 4097,
    "happy": 7215,
    "neutral": 4965,
    "sad": 4830,
    "surprise": 3171,
}


class ProbabilityAdjuster(Protocol):
    """Turns one frame's classifier probabilities (faces x classes, in the model's class order) into the
    probabilities under another class prior. One instance per camera: it may keep state across frames."""

    def adjust(self, probabilities: np.ndarray) -> np.ndarray: ...


def reweight(probabilities: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Each row times ``ratio`` (target / train prior per class), renormalised to sum 1.

    A row whose re-weighted mass is zero (every class it gives mass to has target weight 0) is left as it was:
    there is no posterior under that prior to give, and a row of zeros or NaN would break every consumer.
    """
    rows = np.asarray(probabilities, dtype=np.float64)
    weighted = rows * ratio
    mass = weighted.sum(axis=1, keepdims=True)
    adjusted = np.where(mass > 0, weighted / np.where(mass > 0, mass, 1.0), rows)
    return adjusted.astype(np.float32)


def apply_floor(prior: np.ndarray, floor: float) -> np.ndarray:
    """``prior`` normalised, with every share at least ``floor``: classes below it get exactly ``floor``, the others
    share the rest in their old proportions (repeated until none falls below). Needs ``floor * classes <= 1``."""
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    if floor <= 0:
        return prior
    if floor * len(prior) > 1 + 1e-12:
        raise ValueError(f"a floor of {floor} for {len(prior)} classes sums to more than 1")
    at_floor = np.zeros(len(prior), dtype=bool)
    while True:
        free_mass = 1.0 - floor * at_floor.sum()
        free_total = prior[~at_floor].sum()
        if free_total <= 0:  # only when floor * classes == 1: every class is at the floor
            return np.full(len(prior), floor)
        floored = np.where(at_floor, floor, prior * free_mass / free_total)
        below = ~at_floor & (floored < floor)
        if not below.any():
            return floored
        at_floor |= below


def estimate_prior(
    probabilities: np.ndarray, train_prior: np.ndarray, start: np.ndarray, max_iterations: int, tolerance: float, floor: float
) -> tuple[np.ndarray, int]:
    """The class prior of the faces behind ``probabilities`` (rows of calibrated posteriors under ``train_prior``),
    by Saerens et al.'s EM from ``start``, each estimate floored; returns the estimate and the iterations run."""
    rows = np.asarray(probabilities, dtype=np.float64)
    estimate = apply_floor(start, floor)
    for iteration in range(1, max_iterations + 1):
        # E step: the posteriors under the current estimate; M step: their mean is the next estimate.
        weighted = rows * (estimate / train_prior)
        mass = weighted.sum(axis=1, keepdims=True)
        posteriors = weighted / np.where(mass > 0, mass, 1.0)
        updated = apply_floor(posteriors.mean(axis=0), floor)
        converged = float(np.abs(updated - estimate).max()) < tolerance
        estimate = updated
        if converged:
            return estimate, iteration
    return estimate, max_iterations


class FixedPriorShift:
    """The configured deployment prior, the same for every frame: a constant logit adjustment."""

    def __init__(self, train_prior: np.ndarray, target_prior: np.ndarray) -> None:
        self.ratio = target_prior / train_prior

    def adjust(self, probabilities: np.ndarray) -> np.ndarray:
        return reweight(probabilities, self.ratio) if len(probabilities) else probabilities


class OnlineLabelShift:
    """One camera's class prior, estimated from the last ``window`` per-face probability vectors it produced.

    Each frame's vectors join the window (as the classifier gave them: the EM needs posteriors under the
    training prior), the estimate is updated from the window (warm-started from the last one, so it
    usually takes a few iterations), and the frame's vectors are re-weighted with it. Until the window
    holds ``min_samples`` vectors, the starting prior (the deployment prior, or the training prior) applies.
    """

    def __init__(self, train_prior: np.ndarray, start_prior: np.ndarray, config: OnlineLabelShiftConfig) -> None:
        self.train_prior = train_prior
        self.config = config
        self.estimate = apply_floor(start_prior, config.floor)
        self.last_iterations = 0
        # A ring buffer rather than a deque of rows: the EM reads the whole window every frame.
        self._window = np.zeros((config.window, len(train_prior)), dtype=np.float64)
        self._filled = 0
        self._next = 0
        self._start_prior = np.asarray(start_prior, dtype=np.float64)

    @property
    def samples(self) -> int:
        return self._filled

    def adjust(self, probabilities: np.ndarray) -> np.ndarray:
        if not len(probabilities):
            return probabilities
        self._remember(np.asarray(probabilities, dtype=np.float64))
        config = self.config
        if self._filled >= config.min_samples:
            self.estimate, self.last_iterations = estimate_prior(
                self._window[: self._filled], self.train_prior, self.estimate, config.max_iterations, config.tolerance, config.floor
            )
            return reweight(probabilities, self.estimate / self.train_prior)
        return reweight(probabilities, self._start_prior / self.train_prior)

    def _remember(self, rows: np.ndarray) -> None:
        size = len(self._window)
        for row in rows[-size:]:
            self._window[self._next] = row
            self._next = (self._next + 1) % size
        self._filled = min(size, self._filled + len(rows))


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """``priors`` resolved against the model's classes, once at start; ``new_adjuster`` gives each camera its own state."""

    classes: tuple[str, ...]
    train_prior: np.ndarray
    deployment_prior: np.ndarray | None
    online: OnlineLabelShiftConfig | None

    @classmethod
    def from_config(cls, config: PriorsConfig, classes: Sequence[str]) -> PriorSettings | None:
        """None when ``priors`` is off. Raises ``ConfigError`` naming the field when a prior does not fit the model."""
        if not config.enabled:
            return None
        classes = tuple(classes)
        if config.train_prior is not None:
            train_prior = _class_vector(config.train_prior, classes, "priors.train_prior")
        elif set(classes) == set(FER2013_TRAIN_COUNTS):
            train_prior = _class_vector(FER2013_TRAIN_COUNTS, classes, "priors.train_prior")
        else:
            raise ConfigError(
                f"priors.train_prior: required for a model whose classes ({', '.join(classes)}) are not FER2013's seven "
                "(the default training prior is FER2013's training counts)"
            )
        deployment_prior = None
        if config.deployment_prior is not None:
            deployment_prior = _class_vector(config.deployment_prior, classes, "priors.deployment_prior")
        if config.online is not None and config.online.floor * len(classes) > 1:
            raise ConfigError(
                f"priors.online.floor: {config.online.floor} for each of the model's {len(classes)} classes sums to more than 1"
            )
        return cls(classes=classes, train_prior=train_prior, deployment_prior=deployment_prior, online=config.online)

    def new_adjuster(self) -> ProbabilityAdjuster:
        start = self.deployment_prior if self.deployment_prior is not None else self.train_prior
        if self.online is not None:
            return OnlineLabelShift(self.train_prior, start, self.online)
        return FixedPriorShift(self.train_prior, start)


def _class_vector(weights: Mapping[str, float], classes: tuple[str, ...], field: str) -> np.ndarray:
    """``weights`` in the model's class order, normalised; every class named, no other."""
    missing = [name for name in classes if name not in weights]
    unknown = sorted(set(weights) - set(classes))
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unknown:
            problems.append(f"not a class of the model: {', '.join(unknown)}")
        raise ConfigError(f"{field}: {'; '.join(problems)} (the model's classes: {', '.join(classes)})")
    vector = np.array([weights[name] for name in classes], dtype=np.float64)
    return vector / vector.sum()
