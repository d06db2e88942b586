"""The model deployments warm their models while the replica starts, before any camera frame reaches them."""

import pytest

import pipeline.warmup
import serve_app.deployments as deployments


def test_each_model_deployment_warms_its_model_in_its_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    warmed: list[tuple[str, object]] = []
    monkeypatch.setattr(pipeline.warmup, "warm_up_detector", lambda detector, size: warmed.append(("detector", size)))
    monkeypatch.setattr(pipeline.warmup, "warm_up_classifier", lambda classifier: warmed.append(("classifier", classifier.model_id)))
    detector = deployments.FaceDetectorDeployment.func_or_class({"detector": {"detection_size": 320}})
    classifier = deployments.ExpressionClassifierDeployment.func_or_class({})
    assert warmed == [("detector", 320), ("classifier", classifier.classifier.model_id)]
    assert detector.detector is not None
