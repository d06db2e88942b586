"""One dataset selection for every model command: format detection, every layout through load_split, the options."""

import argparse

import pytest

from pipeline.training.data import FER_CLASSES, DatasetError
from pipeline.training.splits import add_dataset_arguments, load_split, resolve_format
from tests.pipeline.training.conftest import RAFDB_ITEMS, pattern_csv, scheme_folders, write_dataset, write_rafdb


def test_auto_format_detection(tmp_path):
    csv_path = pattern_csv(tmp_path / "fer2013.csv", {"Training": 1})
    rafdb = write_rafdb(tmp_path / "basic", RAFDB_ITEMS)
    folder = write_dataset(tmp_path / "fer", per_class=1)
    assert resolve_format(csv_path) == "fer2013-csv"
    assert resolve_format(csv_path, ferplus_csv=tmp_path / "fer2013new.csv") == "ferplus"
    assert resolve_format(rafdb) == "rafdb"
    assert resolve_format(folder) == "imagefolder"
    assert resolve_format(tmp_path / "missing") == "imagefolder"  # and load_image_folder then says it does not exist
    assert resolve_format(rafdb, "imagefolder") == "imagefolder"
    with pytest.raises(DatasetError, match="--data-format ferplus needs --ferplus-csv"):
        resolve_format(csv_path, "ferplus")
    with pytest.raises(DatasetError, match="does not apply to --data-format imagefolder"):
        resolve_format(folder, ferplus_csv=tmp_path / "fer2013new.csv")
    with pytest.raises(DatasetError, match="unknown data format 'parquet'"):
        resolve_format(folder, "parquet")


def test_load_split_reads_every_layout(tmp_path):
    csv_path = pattern_csv(tmp_path / "fer2013.csv", {"Training": 3, "PublicTest": 2, "PrivateTest": 1})
    assert len(load_split(csv_path, "PublicTest")) == 14
    assert len(load_split(csv_path, "PrivateTest", fmt="fer2013-csv")) == 7
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
    usages = ["Training"] * 21 + ["PublicTest"] * 14 + ["PrivateTest"] * 7
    plus = tmp_path / "fer2013new.csv"
    plus.write_text("\n".join([header, *(f"{u},x.png,0,10,0,0,0,0,0,0,0,0" for u in usages)]) + "\n")
    relabelled = load_split(csv_path, "PublicTest", ferplus_csv=plus)
    assert len(relabelled) == 14 and set(relabelled.labels.tolist()) == {FER_CLASSES.index("happy")}
    rafdb = write_rafdb(tmp_path / "basic", RAFDB_ITEMS)
    assert len(load_split(rafdb, "test")) == 2
    folder = write_dataset(tmp_path / "fer" / "val", per_class=1, folder_names=scheme_folders("affectnet"))
    assert len(load_split(tmp_path / "fer", "val", label_scheme="affectnet")) == 7
    assert len(load_split(folder, None, label_scheme="affectnet")) == 7
    with pytest.raises(DatasetError, match="needs a split: one of Training, PublicTest, PrivateTest"):
        load_split(csv_path, None)
    with pytest.raises(DatasetError, match="--label-scheme affectnet applies to ImageFolder"):
        load_split(csv_path, "Training", label_scheme="affectnet")
    with pytest.raises(DatasetError, match="reads fer2013.csv, but .* is a folder"):
        load_split(folder, "Training", fmt="fer2013-csv")
    with pytest.raises(DatasetError, match="CSV file .*nope.csv does not exist"):
        load_split(tmp_path / "nope.csv", "Training")


def test_cli_dataset_options():
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args([])
    assert (args.data_format, args.ferplus_csv, args.label_scheme, args.skip_classes) == ("auto", None, "names", [])
    args = parser.parse_args(["--data-format", "rafdb", "--label-scheme", "affectnet", "--skip-classes", "contempt, unknown"])
    assert args.skip_classes == ["contempt", "unknown"]
