"""Tiny generated FER-style datasets (written with PIL into tmp dirs) for the training tests."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, save_checkpoint
from pipeline.training.data import FER2013_CSV_CODES, FER_CLASSES, LABEL_SCHEMES


def class_image(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """An easy, class-dependent pattern (a bright bar whose position encodes the class) plus noise."""
    image = rng.integers(0, 60, size=(size, size)).astype(np.uint8)
    band = size // len(FER_CLASSES)
    image[label * band : (label + 1) * band, 8:-8] = 220
    return image


def write_dataset(root: Path, per_class: int, seed: int = 0, folder_names: dict[str, str] | None = None, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(FER_CLASSES):
        folder = root / (folder_names or {}).get(name, name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng)).save(folder / f"{i:03d}{suffix}")
    return root


def write_fer2013_csv(path: Path, rows: list[tuple[int, str, int | np.ndarray]]) -> Path:
    """A fer2013.csv from rows of (emotion code, Usage, constant pixel value or 48x48 uint8 image)."""
    lines = ["emotion,pixels,Usage"]
    for code, usage, pixels in rows:
        image = np.full((48, 48), pixels, np.uint8) if isinstance(pixels, int) else pixels
        lines.append(f"{code},{' '.join(map(str, image.ravel().tolist()))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def pattern_csv(path: Path, per_usage: dict[str, int], seed: int = 0) -> Path:
    """fer2013.csv with ``per_usage[usage]`` learnable images per class and Usage (codes in CSV order)."""
    rng = np.random.default_rng(seed)
    rows = [
        (code, usage, class_image(FER_CLASSES.index(name), rng))
        for usage, count in per_usage.items()
        for code, name in enumerate(FER2013_CSV_CODES)
        for _ in range(count)
    ]
    return write_fer2013_csv(path, rows)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or fill the user's real ~/.cache/ferstream from tests.
    monkeypatch.setenv("FERSTREAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_fer")
    write_dataset(root / "train", per_class=12, seed=1)
    write_dataset(root / "val", per_class=4, seed=2, suffix=".jpg")
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained ``tiny`` checkpoint with FER2013's classes and preprocessing."""
    torch.manual_seed(0)
    meta = ModelMetadata("tiny-test", "tiny", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.1, {})
    path = tmp_path / "model" / "tiny.pt"
    save_checkpoint(path, build_model("tiny", 7), meta)
    return path


# RAF-DB's basic label codes, as its README lists them (independent of LABEL_SCHEMES on purpose).
RAFDB_CODES = {"surprise": "1", "fear": "2", "disgust": "3", "happy": "4", "sad": "5", "angry": "6", "neutral": "7"}


def write_rafdb(root: Path, items: list[tuple[str, str]], aligned: bool = True) -> Path:
    """RAF-DB basic layout: EmoLabel/list_patition_label.txt + 100x100 RGB faces, items = (image name, class)."""
    rng = np.random.default_rng(0)
    images = root / "Image" / ("aligned" if aligned else "original")
    images.mkdir(parents=True)
    (root / "EmoLabel").mkdir()
    for name, cls in items:
        file = f"{Path(name).stem}_aligned.jpg" if aligned else name
        face = Image.fromarray(class_image(FER_CLASSES.index(cls), rng, size=100)).convert("RGB")
        face.save(images / file)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{name} {RAFDB_CODES[cls]}\n" for name, cls in items))
    return root


def scheme_folders(scheme: str) -> dict[str, str]:
    """Canonical class name -> that scheme's digit folder."""
    return {name: code for code, name in LABEL_SCHEMES[scheme].items() if name in FER_CLASSES}


RAFDB_ITEMS = [
    ("train_00001.jpg", "surprise"),
    ("train_00002.jpg", "neutral"),
    ("train_00003.jpg", "happy"),
    ("test_0001.jpg", "angry"),
    ("test_0002.jpg", "fear"),
]
