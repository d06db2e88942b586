import dataclasses

import numpy as np
import pytest
import torch

from pipeline.architectures import build_model
from pipeline.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    preprocess_crops,
    save_checkpoint,
)
from tests.pipeline.conftest import make_metadata  # noqa: E402


def test_round_trip_restores_weights_metadata_and_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 7, dropout=0.3).to(memory_format=torch.channels_last)
    metadata = make_metadata(arch_kwargs={"dropout": 0.3})
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, metadata)
    loaded, loaded_metadata = load_checkpoint(path)
    assert loaded_metadata == metadata
    assert not loaded.training
    x = torch.randn(3, 1, 44, 44)
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        # Layouts differ (channels_last vs contiguous), so kernels may round differently: close, not bitwise.
        torch.testing.assert_close(model(x), loaded(x), atol=1e-5, rtol=1e-5)
    assert loaded.dropout.p == 0.3


def test_wrong_format_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else/9", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=f"expected '{CHECKPOINT_FORMAT}'"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("tiny", 7), make_metadata())
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["arch"] = "transformer-xxl"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="transformer-xxl"):
        load_checkpoint(path)


def test_metadata_rejects_crop_larger_than_resize():
    with pytest.raises(ValueError, match="input_size"):
        make_metadata(input_size=50)


def test_preprocess_shapes_for_gray_and_bgr_any_size():
    metadata = make_metadata()
    rng = np.random.default_rng(0)
    crops = [
        rng.integers(0, 256, (48, 48), dtype=np.uint8),
        rng.integers(0, 256, (100, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (20, 30), dtype=np.uint8),
    ]
    out = preprocess_crops(crops, metadata)
    assert out.shape == (3, 1, 44, 44) and out.dtype == torch.float32
    assert preprocess_crops([], metadata).shape == (0, 1, 44, 44)
    colour = dataclasses.replace(metadata, grayscale=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert preprocess_crops(crops, colour).shape == (3, 3, 44, 44)


def test_preprocess_values_are_centre_crop_then_normalize():
    metadata = make_metadata()
    image = (np.arange(48 * 48) % 251).astype(np.uint8).reshape(48, 48)
    out = preprocess_crops([image], metadata)[0, 0].numpy()
    expected = (image[2:46, 2:46].astype(np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_preprocess_bgr_uses_luma_and_constant_stays_constant():
    metadata = make_metadata()
    gray = np.full((60, 60), 128, np.uint8)
    bgr = np.full((60, 60, 3), 128, np.uint8)
    a, b = preprocess_crops([gray, bgr], metadata)
    np.testing.assert_allclose(a.numpy(), (128 / 255 - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5)
    # Pure blue in BGR has luma 0.114 * 255 ~ 29.
    blue = np.zeros((48, 48, 3), np.uint8)
    blue[..., 0] = 255
    value = preprocess_crops([blue], metadata)[0, 0, 0, 0].item() * 0.25 + 0.5
    assert value == pytest.approx(0.114, abs=1e-3)


def test_preprocess_resizes_a_scaled_copy_to_the_same_pixels():
    metadata = make_metadata(input_size=48)
    small = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, np.ones((12, 12), np.uint8))  # 48x48 blocks
    big = np.kron(small, np.ones((2, 2), np.uint8))  # 96x96, same picture
    a, b = preprocess_crops([small, big], metadata)
    assert (a - b).abs().mean() < 0.02


def test_preprocess_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_crops([np.zeros((48, 48), np.float32)], make_metadata())


def test_default_checkpoint_path_points_into_the_package():
    path = default_checkpoint_path()
    assert path.name == "expression_default.pt" and path.parent.name == "assets"
