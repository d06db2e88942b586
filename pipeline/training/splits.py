"""One dataset selection for every model command: which layout a ``--data-path`` is, and which split of it.

:func:`load_split` maps (source, split, format) onto the loaders of :mod:`pipeline.training.data`;
:func:`add_dataset_arguments` and :func:`load_split_from_args` give ``ferstream train``, ``eval``,
``calibrate``, ``ensemble`` ... the same options for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.training.data import (
    FER2013_USAGES,
    FER_CLASSES,
    LABEL_SCHEMES,
    RAFDB_SPLITS,
    DatasetError,
    ImageDataset,
    load_fer2013_csv,
    load_ferplus,
    load_image_folder,
    load_rafdb,
)

__all__ = ["DATA_FORMATS", "SPLITS", "LoadedSplit", "add_dataset_arguments", "load_split", "load_split_from_args", "resolve_format"]

DATA_FORMATS = ("auto", "imagefolder", "fer2013-csv", "ferplus", "rafdb")
# (train, val) split of the formats whose splits are named inside the data; an ImageFolder's splits
# are subfolders (`ferstream train --train-dir/--val-dir`, `ferstream eval --data <split folder>`).
SPLITS: dict[str, tuple[str, str]] = {
    "fer2013-csv": ("Training", "PublicTest"),
    "ferplus": ("Training", "PublicTest"),
    "rafdb": ("train", "test"),
}


def resolve_format(source: str | Path, fmt: str = "auto", ferplus_csv: str | Path | None = None) -> str:
    """``fmt`` checked, or for ``auto`` detected from ``source``.

    A ``.csv`` file is fer2013.csv (FER+ with ``ferplus_csv``), a folder with ``EmoLabel/`` is RAF-DB
    basic, anything else an ImageFolder tree.
    """
    if fmt not in DATA_FORMATS:
        raise DatasetError(f"unknown data format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")
    if fmt == "auto":
        source = Path(source).expanduser()
        if source.suffix.lower() == ".csv":
            fmt = "ferplus" if ferplus_csv else "fer2013-csv"
        elif (source / "EmoLabel").is_dir():
            fmt = "rafdb"
        else:
            fmt = "imagefolder"
    if fmt == "ferplus" and not ferplus_csv:
        raise DatasetError("--data-format ferplus needs --ferplus-csv (fer2013new.csv) next to the fer2013.csv data")
    if ferplus_csv and fmt != "ferplus":
        raise DatasetError(f"--ferplus-csv relabels fer2013.csv rows; it does not apply to --data-format {fmt}")
    return fmt


def load_split(
    source: str | Path,
    split: str | None,
    fmt: str = "auto",
    image_size: int = 48,
    classes: Sequence[str] = FER_CLASSES,
    use_cache: bool = True,
    ferplus_csv: str | Path | None = None,
    label_scheme: str = "names",
    skip_classes: Iterable[str] = (),
) -> ImageDataset:
    """One split of a dataset in any supported layout (``fmt``, see :func:`resolve_format`).

    ``split`` is, per format: imagefolder, a subfolder of ``source`` (None: ``source`` itself);
    fer2013-csv and ferplus, a Usage (Training, PublicTest, PrivateTest); rafdb, train or test.
    """
    source = Path(source).expanduser()
    fmt = resolve_format(source, fmt, ferplus_csv)
    if label_scheme != "names" and fmt != "imagefolder":
        raise DatasetError(f"--label-scheme {label_scheme} applies to ImageFolder class folders, not to --data-format {fmt}")
    if fmt == "imagefolder":
        root = source / split if split else source
        return load_image_folder(root, image_size, classes, use_cache, label_scheme=label_scheme, skip_classes=skip_classes)
    if split is None:
        raise DatasetError(f"--data-format {fmt} needs a split: one of {', '.join(RAFDB_SPLITS if fmt == 'rafdb' else FER2013_USAGES)}")
    if fmt == "rafdb":
        return load_rafdb(source, split, image_size, classes, use_cache, skip_classes)
    if source.is_dir():
        raise DatasetError(f"--data-format {fmt} reads fer2013.csv, but {source} is a folder")
    if fmt == "fer2013-csv":
        return load_fer2013_csv(source, split, image_size, classes, skip_classes)
    return load_ferplus(source, Path(ferplus_csv).expanduser(), split, image_size, classes, skip_classes)


@dataclass(frozen=True)
class LoadedSplit:
    dataset: ImageDataset
    data_format: str
    split: str | None


def load_split_from_args(
    args: argparse.Namespace,
    source: str | Path,
    split: str | None,
    image_size: int,
    classes: Sequence[str] = FER_CLASSES,
    default_split: int = 1,
) -> LoadedSplit:
    """:func:`load_split` with the options :func:`add_dataset_arguments` put on ``args`` (and ``--no-cache``).
    A ``split`` of None means ``source`` itself for an ImageFolder, else the format's train
    (``default_split=0``) or val (1) split from ``SPLITS``."""
    fmt = resolve_format(source, args.data_format, args.ferplus_csv)
    if split is None and fmt != "imagefolder":
        split = SPLITS[fmt][default_split]
    dataset = load_split(
        source,
        split,
        fmt=fmt,
        image_size=image_size,
        classes=classes,
        use_cache=not args.no_cache,
        ferplus_csv=args.ferplus_csv,
        label_scheme=args.label_scheme,
        skip_classes=args.skip_classes,
    )
    return LoadedSplit(dataset, fmt, split)


def _class_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset-selection options of ``ferstream train`` and ``ferstream eval`` (see :func:`load_split`)."""
    parser.add_argument(
        "--data-format",
        default="auto",
        choices=DATA_FORMATS,
        help="auto: a .csv file is fer2013.csv (ferplus with --ferplus-csv), a folder with EmoLabel/ is RAF-DB, else an ImageFolder tree",
    )
    parser.add_argument("--ferplus-csv", default=None, help="FER+ fer2013new.csv: relabel the fer2013.csv rows by FER+ majority vote")
    parser.add_argument(
        "--label-scheme",
        default="names",
        choices=("names", *LABEL_SCHEMES),
        help="ImageFolder class folders: names (angry/, happiness/...), rafdb digits (1-7) or affectnet digits (0-7)",
    )
    parser.add_argument(
        "--skip-classes",
        type=_class_list,
        default=[],
        metavar="NAMES",
        help="comma-separated classes outside the model's to leave out (e.g. contempt); without it they are an error",
    )
