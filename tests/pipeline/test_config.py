from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import (
    BackoffConfig,
    BlazeFaceConfig,
    ClassifierConfig,
    ConfigError,
    MTCNNConfig,
    PipelineConfig,
    PriorsConfig,
    SourceConfig,
    environment_overrides,
    load_config,
    merge_sections,
    parse_config,
    preview_on,
    url_scheme,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name", ["pipeline.yaml", "pipeline-mtcnn.yaml", "pipeline-gpu.yaml", "pipeline-onnx.yaml", "pipeline-ensemble.yaml", "demo.yaml"]
)
def test_shipped_configs_are_valid(name):
    load_config(REPO / "configs" / name)


def test_the_reference_config_lists_exactly_the_defaults():
    # configs/pipeline.yaml says "every value below is the default": hold it to that.
    assert load_config(REPO / "configs" / "pipeline.yaml").model_dump() == PipelineConfig().model_dump()
    mtcnn = load_config(REPO / "configs" / "pipeline-mtcnn.yaml")
    assert mtcnn.detector == MTCNNConfig()
    assert mtcnn.model_dump(exclude={"detector"}) == PipelineConfig().model_dump(exclude={"detector"})


def test_blazeface_is_the_default_detector_and_cuda_needs_its_torch_runtime():
    assert PipelineConfig().detector == BlazeFaceConfig()
    assert parse_config(PipelineConfig, {"detector": {"threads": 1}}, "test").detector.kind == "blazeface"
    with pytest.raises(ConfigError, match=r"detector\.blazeface.*runtime 'torch'"):
        parse_config(PipelineConfig, {"detector": {"device": "cuda"}}, "test")
    assert load_config(REPO / "configs" / "pipeline-gpu.yaml").detector.runtime == "torch"


def test_threads_on_the_torch_runtime_fail_because_they_would_change_the_classifiers():
    with pytest.raises(ConfigError, match=r"detector\.blazeface.*threads applies to runtime 'litert'"):
        parse_config(PipelineConfig, {"detector": {"runtime": "torch", "threads": 2}}, "test")
    assert parse_config(PipelineConfig, {"detector": {"runtime": "torch"}}, "test").detector.runtime == "torch"
    # configs/pipeline.yaml lists threads: 1; a section merged over it that picks the torch runtime stays valid.
    assert parse_config(PipelineConfig, {"detector": {"runtime": "torch", "threads": 1}}, "test").detector.runtime == "torch"


def test_the_demo_config_has_a_camera():
    assert load_config(REPO / "configs" / "demo.yaml").cameras


def test_the_onnx_config_selects_onnxruntime_without_needing_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty home: the exported model does not exist
    classifier = load_config(REPO / "configs" / "pipeline-onnx.yaml").classifier
    assert classifier.backend == "onnxruntime" and classifier.device == "cpu"
    assert classifier.checkpoint_path == tmp_path / ".cache" / "ferstream" / "export" / "expression_default.onnx"
    assert not classifier.checkpoint_path.exists()
    # Otherwise the same as the reference config.
    onnx_config = load_config(REPO / "configs" / "pipeline-onnx.yaml").model_dump(exclude={"classifier"})
    assert onnx_config == load_config(REPO / "configs" / "pipeline.yaml").model_dump(exclude={"classifier"})


def test_the_ensemble_config_differs_from_the_reference_only_in_the_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(REPO / "configs" / "pipeline-ensemble.yaml")
    assert config.classifier.backend == "torch"
    assert config.classifier.checkpoint_path == tmp_path / ".cache" / "ferstream" / "runs" / "ensemble-v2" / "ensemble-cal.pt"
    reference = load_config(REPO / "configs" / "pipeline.yaml")
    assert config.model_dump(exclude={"classifier"}) == reference.model_dump(exclude={"classifier"})
    assert config.classifier.model_dump(exclude={"checkpoint"}) == reference.classifier.model_dump(exclude={"checkpoint"})


def test_priors_and_abstaining_are_off_by_default():
    config = load_config(REPO / "configs" / "pipeline.yaml")
    assert config.priors == PriorsConfig() and not config.priors.enabled and config.events.abstain_below is None
    assert PriorsConfig(online={}).enabled and PriorsConfig(deployment_prior={"neutral": 1}).enabled


def test_classifier_backend_defaults_to_torch_and_the_shipped_model():
    config = ClassifierConfig()
    assert config.backend == "torch" and config.checkpoint is None and config.checkpoint_path is None
    assert ClassifierConfig(backend="onnxruntime", checkpoint="m.onnx").checkpoint_path == Path("m.onnx")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("cameras: [{camera_id: a, url: x.mp4, target_fps: 0}]", "cameras.0.target_fps"),
        ("cameras: [{camera_id: a, url: 'ftp://host/x'}]", "cameras.0.url"),
        ("cameras: [{camera_id: 'bad id', url: x.mp4}]", "cameras.0.camera_id"),
        ("cameras: [{camera_id: a, url: x.mp4, transport: quic}]", "cameras.0.transport"),
        ("cameras: [{camera_id: a, url: x.mp4}, {camera_id: a, url: y.mp4}]", "cameras"),
        ("detector: {score_threshold: 1.5}", "detector.blazeface.score_threshold"),
        ("detector: {kind: mtcnn, score_threshold: 1.5}", "detector.mtcnn.score_threshold"),
        ("detector: {kind: yunet}", "detector.yunet.onnx_path"),
        ("detector: {kind: blazeface, threads: 0}", "detector.blazeface.threads"),
        ("events: {redis_url: 'http://x'}", "events.redis_url"),
        ("events: {retry: {initial_s: 5, max_s: 1}}", "events.retry"),
        ("tracker: {ema_alpha: 0}", "tracker.ema_alpha"),
        ("classifier: {backend: tensorrt}", "classifier.backend"),
        ("classifier: {backend: onnxruntime, checkpoint: m.onnx, device: cuda}", "classifier.device"),
        ("classifier: {backend: onnxruntime}", "classifier.checkpoint"),
        ("classifier: {backend: onnxruntime, checkpoint: null}", "classifier.checkpoint"),
        ("metrics: {prot: 1}", "metrics.prot"),
        ("events: {abstain_below: 0}", "events.abstain_below"),
        ("events: {abstain_below: 1.5}", "events.abstain_below"),
        ("priors: {deployment_prior: {neutral: -1}}", "priors.deployment_prior.neutral"),
        ("priors: {deployment_prior: {neutral: 0, sad: 0}}", "priors.deployment_prior"),
        # pydantic's path: the (empty) class name, then [key] for "in the key, not the value".
        ("priors: {deployment_prior: {'': 1}}", "priors.deployment_prior..[key]"),
        ("priors: {train_prior: {neutral: 0, sad: 1}}", "priors.train_prior"),
        ("priors: {online: {window: 5}}", "priors.online.window"),
        ("priors: {online: {window: 20, min_samples: 21}}", "priors.online"),
        ("priors: {online: {max_iterations: 0}}", "priors.online.max_iterations"),
        ("priors: {online: {tolerance: 0}}", "priors.online.tolerance"),
        ("priors: {online: {floor: 0.2}}", "priors.online.floor"),
        ("priors: {online: {flor: 0.01}}", "priors.online.flor"),
        ("priors: {prior: {}}", "priors.prior"),
    ],
)
def test_bad_values_fail_with_the_field_named(tmp_path, yaml_text, field):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, yaml_text))
    assert f": {field}: " in str(error.value)


def test_unreadable_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "cameras: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_an_unreadable_or_binary_config_names_the_file(tmp_path):
    binary = tmp_path / "video.yaml"
    binary.write_bytes(b"cameras: []\n\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"video\.yaml: not a UTF-8 text file \(byte 12"):
        load_config(binary)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"a-folder: cannot read config: Is a directory"):
        load_config(folder)


def test_the_metrics_server_binds_loopback_by_default():
    assert PipelineConfig().metrics.host == "127.0.0.1"
    assert load_config(REPO / "configs" / "pipeline.yaml").metrics.host == "127.0.0.1"


def test_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path, "cameras: [{camera_id: cam-1, url: rtsp://h/s}]"), overrides={"events": {"maxlen": 5}})
    assert config.cameras[0].transport == "tcp"
    assert config.events.maxlen == 5
    assert config.events.stream_prefix == "ferstream"
    assert not config.cameras[0].is_file


def test_a_mapping_override_merges_into_its_section(tmp_path):
    path = write(tmp_path, "events: {stream_prefix: site-a, maxlen: 50}\ncameras: [{camera_id: a, url: rtsp://h/a}]")
    config = load_config(path, overrides={"events": {"maxlen": 5}, "cameras": [{"camera_id": "b", "url": "rtsp://h/b"}]})
    assert (config.events.stream_prefix, config.events.maxlen) == ("site-a", 5)
    assert [camera.camera_id for camera in config.cameras] == ["b"]  # a list replaces the section


def test_merge_sections_later_overrides_win():
    merged = merge_sections(
        {"events": {"redis_url": "redis://file/0", "maxlen": 9}},
        {"events": {"redis_url": "redis://env/0"}},
        {"events": {"redis_url": "redis://flag/0"}},
    )
    assert merged == {"events": {"redis_url": "redis://flag/0", "maxlen": 9}}


def test_load_config_names_the_given_origin(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.yaml with --flag: max_cameras: "):
        load_config(write(tmp_path, "{}"), overrides={"max_cameras": 0}, origin="config.yaml with --flag")


def test_the_environment_gives_the_redis_url_and_password():
    environ = {"FERSTREAM_REDIS_URL": "redis://cache:6380/1", "FERSTREAM_REDIS_PASSWORD": "s3cret", "OTHER": "x"}
    assert environment_overrides(environ) == {"events": {"redis_url": "redis://cache:6380/1", "password": "s3cret"}}
    assert environment_overrides({"FERSTREAM_REDIS_URL": ""}) == {}


def test_url_scheme():
    assert url_scheme("/videos/a.mp4") == "file"
    assert url_scheme("RTSP://cam/1") == "rtsp"
    assert url_scheme("https://h/live.m3u8") == "https"


def test_models_are_frozen_and_strict():
    source = parse_config(SourceConfig, {"camera_id": "a", "url": "a.mp4"}, "test")
    with pytest.raises(ValidationError):
        source.url = "b.mp4"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="reconect"):
        parse_config(PipelineConfig, {"cameras": [{"camera_id": "a", "url": "a.mp4", "reconect": {}}]}, "test")
    assert BackoffConfig().max_s >= BackoffConfig().initial_s


def test_the_onnxruntime_backend_is_cpu_only_and_needs_a_file():
    with pytest.raises(ValidationError, match="CPU only"):
        ClassifierConfig(backend="onnxruntime", checkpoint="m.onnx", device="cuda")
    with pytest.raises(ValidationError, match="ferstream export --format onnx"):
        ClassifierConfig(backend="onnxruntime")
    assert ClassifierConfig(device="cuda").backend == "torch"


@pytest.mark.parametrize(
    ("mode", "asked", "on"),
    [("per_camera", False, False), ("per_camera", True, True), ("all", False, True), ("all", True, True), ("none", False, False)],
)
def test_preview_on_follows_the_apps_mode_then_the_camera(mode, asked, on):
    assert preview_on(mode, SourceConfig(camera_id="a", url="rtsp://h/a", preview=asked)) is on


def test_previews_none_refuses_a_camera_that_asks_for_one_naming_it(tmp_path):
    path = tmp_path / "pipeline.yaml"
    cameras = "  - {camera_id: ok, url: rtsp://h/a}\n  - {camera_id: door, url: rtsp://h/b, preview: true}\n"
    path.write_text(f"previews: none\ncameras:\n{cameras}")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "cameras" in str(error.value) and "1.preview" in str(error.value) and "'door'" in str(error.value)
    assert PipelineConfig().previews == "per_camera"  # off unless a camera asks
