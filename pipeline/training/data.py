"""Dataset loading into uint8 arrays in RAM, every layout mapped to one canonical class order.

Layouts: ImageFolder trees (``<root>/<class>/*.jpg|png``) with class names or, under a label
scheme, the digit folders of the Kaggle RAF-DB (``1``-``7``) and AffectNet (``0``-``7``) exports;
the original RAF-DB basic release (``EmoLabel/list_patition_label.txt`` + ``Image/aligned/``);
fer2013.csv (``emotion,pixels,Usage``); FER+ majority labels (``fer2013new.csv``) on fer2013.csv.
:func:`pipeline.training.splits.load_split` picks one of them (``--data-format``) for ``ferstream train`` and ``ferstream eval``.

FER2013 is tiny (28,709 x 48 x 48 bytes = 66 MB), so the whole split is decoded once and kept as
one numpy array; the two CPU cores then go to the network instead of to JPEG decoding every
epoch. Decoded image files are cached on disk keyed by the files' paths, labels, sizes and mtimes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CLASS_ALIASES",
    "FER_CLASSES",
    "LABEL_SCHEMES",
    "DatasetError",
    "ImageDataset",
    "cache_dir",
    "canonical_class",
    "ferplus_majority_label",
    "load_fer2013_csv",
    "load_ferplus",
    "load_image_folder",
    "load_rafdb",
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

# Digit class folders/labels -> class names. "names" (the default) means folders named after the classes.
LABEL_SCHEMES: dict[str, dict[str, str]] = {
    # RAF-DB basic emotion labels (list_patition_label.txt and the Kaggle train/1..7 exports).
    "rafdb": {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"},
    # AffectNet expression codes 0-7 (the Kaggle 8-class exports); 7 contempt is not a FER2013 class.
    "affectnet": {"0": "neutral", "1": "happy", "2": "sad", "3": "surprise", "4": "fear", "5": "disgust", "6": "angry", "7": "contempt"},
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm")
_CACHE_VERSION = "1"


class DatasetError(ValueError):
    """The dataset is malformed; the message names the offending folder, file or line."""


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


def _scheme_summary(scheme: str) -> str:
    return ", ".join(f"{code} {name}" for code, name in LABEL_SCHEMES[scheme].items())


class _Labeler:
    """A dataset's class name -> label index in ``classes``; None for a class in ``skip_classes``.

    Any other class outside ``classes`` is a DatasetError naming it and where it was found.
    """

    def __init__(self, classes: Sequence[str], skip_classes: Iterable[str] = ()) -> None:
        self.classes = tuple(classes)
        self.skip = {CLASS_ALIASES.get(key, key) for key in (name.strip().lower() for name in skip_classes)}

    def __call__(self, name: str, where: str) -> int | None:
        key = name.strip().lower()
        if key in self.skip or CLASS_ALIASES.get(key) in self.skip:
            return None
        canonical = canonical_class(key, self.classes)
        if canonical is None:
            raise DatasetError(
                f"unknown class {where}; expected one of {', '.join(self.classes)} (or an alias); "
                f"to leave it out, skip it (--skip-classes {key})"
            )
        return self.classes.index(canonical)


def cache_dir() -> Path:
    return Path(os.environ.get("FERSTREAM_CACHE", Path.home() / ".cache" / "ferstream")) / "data"


def _folder_class(folder: Path, label_scheme: str) -> str:
    """The class name a class folder stands for under ``label_scheme``."""
    name = folder.name
    if label_scheme == "names":
        if name.isdigit():
            raise DatasetError(
                f"class folder {name!r} in {folder.parent} is a number; numeric class folders need a label scheme: "
                f"--label-scheme rafdb ({_scheme_summary('rafdb')}) or --label-scheme affectnet ({_scheme_summary('affectnet')})"
            )
        return name
    codes = LABEL_SCHEMES[label_scheme]
    code = str(int(name)) if name.isdigit() else name
    if code not in codes:
        raise DatasetError(f"class folder {name!r} in {folder.parent} is not a {label_scheme} label; expected folders {', '.join(codes)}")
    return codes[code]


def _list_files(root: Path, labeler: _Labeler, label_scheme: str) -> list[tuple[str, int]]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if label_scheme != "names" and label_scheme not in LABEL_SCHEMES:
        raise DatasetError(f"unknown label scheme {label_scheme!r}; expected names, {', '.join(LABEL_SCHEMES)}")
    entries: list[tuple[str, int]] = []
    seen: dict[int, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = _folder_class(folder, label_scheme)
        label = labeler(name, f"folder {folder.name!r}{'' if name == folder.name else f' ({name})'} in {root}")
        if label is None:
            continue
        if label in seen:
            raise DatasetError(f"class folders {seen[label]!r} and {folder.name!r} in {root} both mean {labeler.classes[label]!r}")
        seen[label] = folder.name
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


def _gray(image: Image.Image, image_size: int) -> np.ndarray:
    """``image`` as ``image_size`` x ``image_size`` grayscale uint8: the one conversion every loader uses."""
    gray = image.convert("L")
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def _decode(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _gray(image, image_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def _load_files(root: Path, entries: list[tuple[str, int]], image_size: int, classes: tuple[str, ...], use_cache: bool) -> ImageDataset:
    """Decode ``root/<rel>`` of every (rel, label) entry, through the on-disk decoded-array cache."""
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


def load_image_folder(
    root: str | Path,
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    use_cache: bool = True,
    label_scheme: str = "names",
    skip_classes: Iterable[str] = (),
) -> ImageDataset:
    """Decode every image under ``root/<class>/`` to ``image_size`` x ``image_size`` grayscale uint8.

    With ``label_scheme="names"`` class folders are class names or aliases (``anger``, ``happiness``...);
    ``"rafdb"`` and ``"affectnet"`` read digit folders with those datasets' label codes. Folders of
    classes in ``skip_classes`` (e.g. AffectNet's ``contempt``) are left out; any other class outside
    ``classes`` is an error. Labels always index ``classes`` in canonical order, whatever subset of
    folders exists. Errors name the folder or file.
    """
    root = Path(root)
    classes = tuple(classes)
    entries = _list_files(root, _Labeler(classes, skip_classes), label_scheme)
    return _load_files(root, entries, image_size, classes, use_cache)


# --------------------------------------------------------------------------- RAF-DB basic release

RAFDB_SPLITS = ("train", "test")
RAFDB_LIST = Path("EmoLabel") / "list_patition_label.txt"  # sic: the release's spelling


def load_rafdb(
    root: str | Path,
    split: str = "train",
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    use_cache: bool = True,
    skip_classes: Iterable[str] = (),
) -> ImageDataset:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` lines ``train_00001.jpg 5``, split by the name prefix.

    Images come from ``Image/aligned/<name>_aligned.jpg`` (the 100x100 aligned faces) when that
    folder exists, else from ``Image/original/<name>``.
    """
    root = Path(root)
    classes = tuple(classes)
    if split not in RAFDB_SPLITS:
        raise DatasetError(f"unknown RAF-DB split {split!r}; expected {' or '.join(RAFDB_SPLITS)}")
    list_file = root / RAFDB_LIST
    if not list_file.is_file():
        raise DatasetError(f"RAF-DB label list {list_file} does not exist (expected <root>/{RAFDB_LIST.as_posix()})")
    aligned = (root / "Image" / "aligned").is_dir()
    if not aligned and not (root / "Image" / "original").is_dir():
        raise DatasetError(f"no RAF-DB images under {root}: expected {root / 'Image' / 'aligned'} or {root / 'Image' / 'original'}")
    labeler, codes = _Labeler(classes, skip_classes), LABEL_SCHEMES["rafdb"]
    entries: list[tuple[str, int]] = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in codes or not fields[0].startswith(tuple(f"{s}_" for s in RAFDB_SPLITS)):
            raise DatasetError(f"{list_file}:{number}: expected '<train_|test_ image name> <label 1-7>', got {line.strip()!r}")
        name, code = fields
        if not name.startswith(f"{split}_"):
            continue
        label = labeler(codes[code], f"{codes[code]!r} (label {code}) at {list_file}:{number}")
        if label is None:
            continue
        stem, suffix = os.path.splitext(name)
        rel = f"Image/aligned/{stem}_aligned{suffix}" if aligned else f"Image/original/{name}"
        if not (root / rel).is_file():
            raise DatasetError(f"{list_file}:{number}: image {root / rel} does not exist")
        entries.append((rel, label))
    if not entries:
        raise DatasetError(f"{list_file} lists no {split}_* images")
    return _load_files(root, entries, image_size, classes, use_cache)


# --------------------------------------------------------------------------- FER2013 CSV and FER+ labels

# fer2013.csv "emotion" codes (Goodfellow et al. 2013): 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral.
FER2013_CSV_CODES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
# fer2013new.csv (FER+, Barsoum et al. 2016) vote columns, in file order, mapped to class names;
# None = not an expression (the FER+ protocol drops such rows).
FERPLUS_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("neutral", "neutral"),
    ("happiness", "happy"),
    ("surprise", "surprise"),
    ("sadness", "sad"),
    ("anger", "angry"),
    ("disgust", "disgust"),
    ("fear", "fear"),
    ("contempt", "contempt"),
    ("unknown", None),
    ("NF", None),
)


def _select_usage(usage: str | Sequence[str] | None) -> set[str]:
    wanted = set(FER2013_USAGES) if usage is None else {usage} if isinstance(usage, str) else set(usage)
    unknown = wanted - set(FER2013_USAGES)
    if unknown:
        raise DatasetError(f"unknown Usage {sorted(unknown)}; fer2013.csv has {', '.join(FER2013_USAGES)}")
    return wanted


def _open_csv(path: Path) -> TextIO:
    if not path.is_file():
        raise DatasetError(f"CSV file {path} does not exist")
    return open(path, newline="")


def _read_fer2013_rows(csv_path: Path) -> list[tuple[int, str, np.ndarray]]:
    """(csv code, Usage, 48x48 uint8) per data row of fer2013.csv, in file order."""
    rows: list[tuple[int, str, np.ndarray]] = []
    with _open_csv(csv_path) as handle:
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


def _array_dataset(
    rows: Iterable[tuple[str | None, str, np.ndarray, str]], labeler: _Labeler, image_size: int, nothing_left: str
) -> ImageDataset:
    """An ImageDataset from CSV rows of (class name or None to drop, where it was found, 48x48 pixels,
    path), labelled by ``labeler`` and converted like decoded files when ``image_size`` differs;
    ``nothing_left`` is the error when no row remains."""
    images, labels, paths = [], [], []
    for name, where, image, path in rows:
        label = None if name is None else labeler(name, where)
        if label is not None:
            images.append(image if image_size == 48 else _gray(Image.fromarray(image), image_size))
            labels.append(label)
            paths.append(path)
    if not images:
        raise DatasetError(nothing_left)
    return ImageDataset(np.stack(images), np.array(labels, dtype=np.int64), labeler.classes, tuple(paths))


def load_fer2013_csv(
    csv_path: str | Path,
    usage: str | Sequence[str] | None = "Training",
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    skip_classes: Iterable[str] = (),
) -> ImageDataset:
    """The original ``fer2013.csv`` (``emotion,pixels,Usage``): Training = train, PublicTest = val, PrivateTest = test."""
    csv_path, classes = Path(csv_path), tuple(classes)
    wanted = _select_usage(usage)
    rows = (
        (FER2013_CSV_CODES[code], f"{FER2013_CSV_CODES[code]!r} (emotion {code}) at {csv_path}:{i + 2}", image, f"{csv_path.name}:row{i}")
        for i, (code, use, image) in enumerate(_read_fer2013_rows(csv_path))
        if use in wanted
    )
    return _array_dataset(rows, _Labeler(classes, skip_classes), image_size, f"{csv_path} has no rows with Usage in {sorted(wanted)}")


def ferplus_majority_label(votes: Sequence[float]) -> str | None:
    """FER+ "majority" label of one row of 10 vote counts, or None when the image is dropped.

    As in the FER+ reference code: single votes are treated as noise and zeroed, then the top
    emotion must hold more than half of the remaining votes; rows without such a majority, or
    whose majority is unknown or not-a-face (NF), are dropped. A contempt majority is returned as
    ``"contempt"``, which is not a FER2013 class: loaders reject it unless told to skip it.
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


def load_ferplus(
    fer2013_csv: str | Path,
    ferplus_csv: str | Path,
    usage: str | Sequence[str] | None = "Training",
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    skip_classes: Iterable[str] = (),
) -> ImageDataset:
    """FER2013 pixels relabelled with FER+ majority votes (``fer2013new.csv``, same row order as fer2013.csv)."""
    fer2013_csv, ferplus_csv, classes = Path(fer2013_csv), Path(ferplus_csv), tuple(classes)
    wanted = _select_usage(usage)
    labeler = _Labeler(classes, skip_classes)
    pixel_rows = _read_fer2013_rows(fer2013_csv)
    with _open_csv(ferplus_csv) as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        vote_names = [name for name, _ in FERPLUS_COLUMNS]
        if header[:1] != ["Usage"] or header[2 : 2 + len(vote_names)] != vote_names:
            raise DatasetError(f"{ferplus_csv} does not look like fer2013new.csv (header {header})")
        vote_rows = list(reader)
    if len(vote_rows) != len(pixel_rows):
        raise DatasetError(f"{ferplus_csv} has {len(vote_rows)} rows but {fer2013_csv} has {len(pixel_rows)}; they must align row by row")

    def majority_rows() -> Iterator[tuple[str | None, str, np.ndarray, str]]:
        for i, ((_, use, image), votes) in enumerate(zip(pixel_rows, vote_rows, strict=True)):
            if votes[0] != use:
                raise DatasetError(f"{ferplus_csv}: row {i + 2} has Usage {votes[0]!r} but {fer2013_csv} says {use!r}")
            if use not in wanted:
                continue
            try:
                name = ferplus_majority_label([float(v) for v in votes[2 : 2 + len(FERPLUS_COLUMNS)]])
            except ValueError as exc:
                raise DatasetError(f"{ferplus_csv}:{i + 2}: unreadable votes: {exc}") from exc
            yield name, f"{name!r} (FER+ majority) at {ferplus_csv}:{i + 2}", image, f"{ferplus_csv.name}:row{i}"

    return _array_dataset(majority_rows(), labeler, image_size, f"no FER+ majority-labelled rows with Usage in {sorted(wanted)}")
