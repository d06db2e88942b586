"""``serve run configs/serve-gpu.yaml`` on this GPU-less machine, as far as it can go without CUDA.

The Ray head advertises 8 CPUs and 1 GPU as logical resources, and the shipped GPU Serve config
runs as it is (replica counts, fractional ``num_gpus``, autoscaling, batching settings) with one
change: in its pipeline config (``configs/pipeline-gpu.yaml``) the detector and the classifier run
on ``cpu``, because there is no CUDA device. This proves the config deploys, its replicas are placed
on GPU resources and the app produces events; CUDA kernels and float16 are not exercised here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.events import validate_event_dict
from tests.conftest import RedisServer
from tests.serve_app.serving import running_service

pytestmark = pytest.mark.integration

CLIP = "head-pose-face-detection-female-and-male"  # two people

REPLICA_RESOURCES = """
from ray.util.state import list_actors
alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
print(json.dumps([[actor.class_name, actor.required_resources] for actor in alive if actor.class_name.startswith("ServeReplica:")]))
"""


def test_the_gpu_serve_config_deploys_on_gpu_resources_and_produces_events(
    tmp_path: Path, redis_server: RedisServer, shared_clips: dict[str, Path]
) -> None:
    clip = shared_clips[CLIP].resolve()
    # The API opens files only inside url_policy.allowed_file_dirs.
    on_cpu = {"detector": {"device": "cpu"}, "classifier": {"device": "cpu"}, "url_policy": {"allowed_file_dirs": [str(clip.parent)]}}
    resources = ("--num-cpus=8", "--num-gpus=1")
    with running_service(tmp_path, "serve-gpu.yaml", redis_server.url, resources, pipeline_overrides=on_cpu) as service:
        response = service.post_stream({"camera_id": "gpu-config", "url": clip.as_uri(), "target_fps": 5, "loop": True})
        assert response.status_code == 201, response.text
        service.wait_until(lambda: service.event_count("gpu-config") >= 30, 240, "30 events from the GPU config's app")
        events = service.events("gpu-config")
        for event in events:
            validate_event_dict(event.to_json_dict())
        assert sum(count == 2 for count in Counter(event.frame_index for event in events).values()) >= 10

        replicas: Counter[str] = Counter()
        for class_name, required in service.ray_driver(REPLICA_RESOURCES):
            deployment = class_name.rsplit(":", 1)[-1]
            replicas[deployment] += 1
            expected_gpus = {"FaceDetector": 0.5, "ExpressionClassifier": 0.25}.get(deployment)
            assert required.get("GPU") == expected_gpus, f"{deployment}: {required}"
        assert replicas == {"Controller": 1, "Ingest": 2, "FaceDetector": 1, "ExpressionClassifier": 1}
