"""Dataset loading into uint8 arrays in RAM: ImageFolder trees (``<root>/<class>/*.jpg|png``), fer2013.csv, FER+.

FER2013 is tiny (28,709 x 48 x 48 bytes = 66 MB), so the whole split is decoded once and kept as
one numpy array; the two CPU cores then go to the network instead of to JPEG decoding every
epoch. The decoded arrays are cached on disk keyed by the files' paths, sizes and mtimes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CLASS_ALIASES",
    "FER_CLASSES",
    "DatasetError",
    "ImageDataset",
    "cache_dir",
    "canonical_class",
    "ferplus_majority_label",
    "load_fer2013_csv",
    "load_ferplus",
    "load_image_folder",
]

# Canonical order: the seven FER2013 names, alphabetical. Label i always means FER_CLASSES[i].
FER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# Folder names other datasets/exports use for the same expressions (compared case-insensitively).
CLASS_ALIASES: dict[str, str] = {
    "anger": "angry",
    "mad": "angry",
    "disgusted": "disgust",
    "disgusting": "disgust",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happiness": "happy",
    "joy": "happy",
    "neutrality": "neutral",
    "calm": "neutral",
    "sadness": "sad",
    "unhappy": "sad",
    "surprised": "surprise",
    "suprise": "surprise",  # misspelling found in several public FER folder dumps
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm")
_CACHE_VERSION = "1"


class DatasetError(ValueError):
    """The dataset tree is malformed; the message names the offending folder or file."""


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray  # N x H x W uint8 (grayscale)
    labels: np.ndarray  # N int64, indices into classes
    classes: tuple[str, ...]
    paths: tuple[str, ...]  # relative to the root, for error reports and audits

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


def canonical_class(name: str, classes: Sequence[str] = FER_CLASSES) -> str | None:
    key = name.strip().lower()
    if key in classes:
        return key
    alias = CLASS_ALIASES.get(key)
    return alias if alias in classes else None


def cache_dir() -> Path:
    return Path(os.environ.get("FERSTREAM_CACHE", Path.home() / ".cache" / "ferstream")) / "data"


def _list_files(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    entries: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = canonical_class(folder.name, classes)
        if name is None:
            raise DatasetError(f"unknown class folder {folder.name!r} in {root}; expected one of {', '.join(classes)} (or an alias)")
        if name in seen:
            raise DatasetError(f"class folders {seen[name]!r} and {folder.name!r} in {root} both mean {name!r}")
        seen[name] = folder.name
        label = classes.index(name)
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((f"{folder.name}/{file.name}", label))
    if not entries:
        raise DatasetError(f"no images found under {root} (expected {root}/<class>/*.jpg|png)")
    return entries


def _cache_key(root: Path, entries: Iterable[tuple[str, int]], image_size: int, classes: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{root.resolve()}|{image_size}|{','.join(classes)}".encode())
    for rel, label in entries:
        stat = (root / rel).stat()
        digest.update(f"|{rel}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _decode(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
            if gray.size != (image_size, image_size):
                gray = gray.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def load_image_folder(
    root: str | Path,
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    use_cache: bool = True,
) -> ImageDataset:
    """Decode every image under ``root/<class>/`` to ``image_size`` x ``image_size`` grayscale uint8.

    Class folders may use aliases (``anger``, ``happiness``...). Labels always index ``classes``
    in canonical order, whatever subset of folders exists. Errors name the folder or file.
    """
    root = Path(root)
    classes = tuple(classes)
    entries = _list_files(root, classes)
    cache_file: Path | None = None
    if use_cache:
        cache_file = cache_dir() / f"{_cache_key(root, entries, image_size, classes)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as cached:
                    images, labels = cached["images"], cached["labels"]
                if len(labels) == len(entries):
                    return ImageDataset(images, labels, classes, tuple(rel for rel, _ in entries))
            except (OSError, KeyError, ValueError):
                pass  # a corrupt cache entry is rebuilt below
    images = np.empty((len(entries), image_size, image_size), dtype=np.uint8)
    for i, (rel, _) in enumerate(entries):
        images[i] = _decode(root / rel, image_size)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(cache_file)
    return ImageDataset(images, labels, classes, tuple(rel for rel, _ in entries))


# --------------------------------------------------------------------------- FER2013 CSV and FER+ labels

# fer2013.csv "emotion" codes (Goodfellow et al. 2013): 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral.
FER2013_CSV_CODES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
# fer2013new.csv (FER+, Barsoum et al. 2016) vote columns, in file order, mapped to our names; None = not one of our classes.
FERPLUS_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("neutral", "neutral"),
    ("happiness", "happy"),
    ("surprise", "surprise"),
    ("sadness", "sad"),
    ("anger", "angry"),
    ("disgust", "disgust"),
    ("fear", "fear"),
    ("contempt", None),
    ("unknown", None),
    ("NF", None),
)


def _select_usage(usage: str | Sequence[str] | None) -> set[str]:
    wanted = set(FER2013_USAGES) if usage is None else {usage} if isinstance(usage, str) else set(usage)
    unknown = wanted - set(FER2013_USAGES)
    if unknown:
        raise DatasetError(f"unknown Usage {sorted(unknown)}; fer2013.csv has {', '.join(FER2013_USAGES)}")
    return wanted


def _read_fer2013_rows(csv_path: Path) -> list[tuple[int, str, np.ndarray]]:
    """(csv code, Usage, 48x48 uint8) per data row of fer2013.csv, in file order."""
    rows: list[tuple[int, str, np.ndarray]] = []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path} lacks column(s) {', '.join(sorted(missing))} (expected emotion,pixels,Usage)")
        for line, row in enumerate(reader, start=2):
            try:
                code = int(row["emotion"])
                pixels = np.array(row["pixels"].split(), dtype=np.int32)
            except ValueError as exc:
                raise DatasetError(f"{csv_path}:{line}: unreadable row: {exc}") from exc
            if not 0 <= code < len(FER2013_CSV_CODES) or pixels.size != 48 * 48 or pixels.min() < 0 or pixels.max() > 255:
                raise DatasetError(f"{csv_path}:{line}: expected an emotion code 0-6 and 2304 pixel values 0-255")
            rows.append((code, row["Usage"], pixels.astype(np.uint8).reshape(48, 48)))
    return rows


def load_fer2013_csv(csv_path: str | Path, usage: str | Sequence[str] | None = "Training") -> ImageDataset:
    """The original ``fer2013.csv`` (``emotion,pixels,Usage``): Training = train, PublicTest = val, PrivateTest = test."""
    csv_path = Path(csv_path)
    wanted = _select_usage(usage)
    rows = [(i, code, image) for i, (code, use, image) in enumerate(_read_fer2013_rows(csv_path)) if use in wanted]
    if not rows:
        raise DatasetError(f"{csv_path} has no rows with Usage in {sorted(wanted)}")
    images = np.stack([image for _, _, image in rows])
    labels = np.array([FER_CLASSES.index(FER2013_CSV_CODES[code]) for _, code, _ in rows], dtype=np.int64)
    return ImageDataset(images, labels, FER_CLASSES, tuple(f"{csv_path.name}:row{i}" for i, _, _ in rows))


def ferplus_majority_label(votes: Sequence[float]) -> str | None:
    """FER+ "majority" label of one row of 10 vote counts, or None when the image is dropped.

    As in the FER+ reference code: single votes are treated as noise and zeroed, then the top
    emotion must hold more than half of the remaining votes; rows whose majority is contempt,
    unknown or not-a-face (NF) have no FER2013 class and are dropped.
    """
    if len(votes) != len(FERPLUS_COLUMNS):
        raise ValueError(f"expected {len(FERPLUS_COLUMNS)} vote counts, got {len(votes)}")
    cleaned = np.array([v if v > 1 else 0.0 for v in votes], dtype=np.float64)
    total = cleaned.sum()
    if total <= 0:
        return None
    top = int(cleaned.argmax())
    if cleaned[top] <= 0.5 * total:  # also rules out ties
        return None
    return FERPLUS_COLUMNS[top][1]


def load_ferplus(fer2013_csv: str | Path, ferplus_csv: str | Path, usage: str | Sequence[str] | None = "Training") -> ImageDataset:
    """FER2013 pixels relabelled with FER+ majority votes (``fer2013new.csv``, same row order as fer2013.csv)."""
    fer2013_csv, ferplus_csv = Path(fer2013_csv), Path(ferplus_csv)
    wanted = _select_usage(usage)
    pixel_rows = _read_fer2013_rows(fer2013_csv)
    with open(ferplus_csv, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        vote_names = [name for name, _ in FERPLUS_COLUMNS]
        if header[:1] != ["Usage"] or header[2 : 2 + len(vote_names)] != vote_names:
            raise DatasetError(f"{ferplus_csv} does not look like fer2013new.csv (header {header})")
        vote_rows = list(reader)
    if len(vote_rows) != len(pixel_rows):
        raise DatasetError(f"{ferplus_csv} has {len(vote_rows)} rows but {fer2013_csv} has {len(pixel_rows)}; they must align row by row")
    images, labels, paths = [], [], []
    for i, ((_, use, image), votes) in enumerate(zip(pixel_rows, vote_rows, strict=True)):
        if votes[0] != use:
            raise DatasetError(f"{ferplus_csv}: row {i + 2} has Usage {votes[0]!r} but {fer2013_csv} says {use!r}")
        if use not in wanted:
            continue
        try:
            label = ferplus_majority_label([float(v) for v in votes[2 : 2 + len(FERPLUS_COLUMNS)]])
        except ValueError as exc:
            raise DatasetError(f"{ferplus_csv}:{i + 2}: unreadable votes: {exc}") from exc
        if label is None:
            continue
        images.append(image)
        labels.append(FER_CLASSES.index(label))
        paths.append(f"{ferplus_csv.name}:row{i}")
    if not images:
        raise DatasetError(f"no FER+ majority-labelled rows with Usage in {sorted(wanted)}")
    return ImageDataset(np.stack(images), np.array(labels, dtype=np.int64), FER_CLASSES, tuple(paths))
