import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.training.data import (
    FER_CLASSES,
    DatasetError,
    cache_dir,
    canonical_class,
    ferplus_majority_label,
    load_fer2013_csv,
    load_ferplus,
    load_image_folder,
)
from tests.pipeline.training.conftest import write_dataset


def test_loads_tree_in_canonical_order(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=3)
    data = load_image_folder(root, use_cache=False)
    assert data.classes == FER_CLASSES
    assert data.images.shape == (21, 48, 48) and data.images.dtype == np.uint8
    assert data.class_counts().tolist() == [3] * 7
    first_happy = data.paths.index("happy/000.png")
    assert data.labels[first_happy] == FER_CLASSES.index("happy")
    np.testing.assert_array_equal(data.images[first_happy], np.asarray(Image.open(root / "happy/000.png")))


def test_aliases_and_missing_classes(tmp_path):
    aliases = {"angry": "Anger", "happy": "happiness", "surprise": "surprised", "neutral": "neutrality"}
    root = write_dataset(tmp_path / "d", per_class=1, folder_names=aliases)
    data = load_image_folder(root, use_cache=False)
    names = {path.split("/")[0]: FER_CLASSES[label] for path, label in zip(data.paths, data.labels, strict=True)}
    assert names["Anger"] == "angry" and names["happiness"] == "happy" and names["surprised"] == "surprise"
    assert names["neutrality"] == "neutral"
    # A split without some classes keeps the canonical label indices.
    for folder in ("disgust", "fear"):
        for file in (root / folder).iterdir():
            file.unlink()
        (root / folder).rmdir()
    data = load_image_folder(root, use_cache=False)
    assert data.class_counts()[FER_CLASSES.index("disgust")] == 0
    assert data.classes == FER_CLASSES
    assert canonical_class("SADNESS") == "sad" and canonical_class("contempt") is None


def test_unknown_class_folder_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=1)
    (root / "contempt").mkdir()
    with pytest.raises(DatasetError, match="unknown class folder 'contempt'"):
        load_image_folder(root, use_cache=False)


def test_two_folders_for_one_class_are_rejected(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=1)
    (root / "anger").mkdir()
    with pytest.raises(DatasetError, match="both mean 'angry'"):
        load_image_folder(root, use_cache=False)


def test_undecodable_image_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=1)
    (root / "fear" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"fear/broken\.jpg"):
        load_image_folder(root, use_cache=False)


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "happy").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path / "empty")


def test_other_sizes_and_colour_are_converted(tmp_path):
    folder = tmp_path / "d" / "happy"
    folder.mkdir(parents=True)
    Image.new("RGB", (96, 64), (255, 0, 0)).save(folder / "big.png")
    data = load_image_folder(tmp_path / "d", use_cache=False)
    assert data.images.shape == (1, 48, 48)
    assert abs(int(data.images[0, 10, 10]) - 76) <= 1  # luma of pure red


def test_cache_is_used_and_invalidated_by_mtime(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=2)
    first = load_image_folder(root)
    files = list(cache_dir().glob("*.npz"))
    assert len(files) == 1
    again = load_image_folder(root)
    np.testing.assert_array_equal(first.images, again.images)
    assert list(cache_dir().glob("*.npz")) == files
    # Rewrite one image with new content and a new mtime: the cache must not serve stale pixels.
    target = root / "sad" / "000.png"
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    updated = load_image_folder(root)
    assert (updated.images[updated.paths.index("sad/000.png")] == 7).all()
    assert len(list(cache_dir().glob("*.npz"))) == 2


def write_fer2013_csv(path: Path, rows: list[tuple[int, str, int]]) -> Path:
    """rows of (emotion code, Usage, constant pixel value)."""
    lines = ["emotion,pixels,Usage"] + [f"{code},{' '.join([str(value)] * 2304)},{usage}" for code, usage, value in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fer2013_csv_maps_codes_to_canonical_order(tmp_path):
    # codes: 4 = Sad, 6 = Neutral in the CSV; our order is alphabetical.
    csv_path = write_fer2013_csv(
        tmp_path / "fer2013.csv", [(4, "Training", 10), (6, "Training", 20), (0, "PublicTest", 30), (5, "PrivateTest", 40)]
    )
    train = load_fer2013_csv(csv_path)
    assert [FER_CLASSES[i] for i in train.labels] == ["sad", "neutral"]
    assert train.images.shape == (2, 48, 48) and (train.images[1] == 20).all()
    val = load_fer2013_csv(csv_path, usage="PublicTest")
    assert [FER_CLASSES[i] for i in val.labels] == ["angry"] and val.paths == ("fer2013.csv:row2",)
    assert len(load_fer2013_csv(csv_path, usage=None)) == 4
    with pytest.raises(DatasetError, match="Usage"):
        load_fer2013_csv(csv_path, usage="Validation")


def test_fer2013_csv_bad_rows_are_located(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(DatasetError, match="bad.csv:2"):
        load_fer2013_csv(path)
    path.write_text("label,pixels\n")
    with pytest.raises(DatasetError, match="emotion"):
        load_fer2013_csv(path)


@pytest.mark.parametrize(
    "votes,expected",
    [
        ([0, 8, 1, 0, 0, 0, 0, 0, 1, 0], "happy"),  # single votes are noise
        ([4, 0, 0, 4, 0, 0, 0, 0, 0, 2], None),  # no majority
        ([6, 4, 0, 0, 0, 0, 0, 0, 0, 0], "neutral"),
        ([0, 0, 0, 0, 0, 0, 0, 9, 1, 0], None),  # contempt has no FER2013 class
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None),  # not a face
        ([0, 0, 0, 0, 3, 0, 0, 0, 0, 0], "angry"),
        ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None),
    ],
)
def test_ferplus_majority(votes, expected):
    assert ferplus_majority_label(votes) == expected


def test_ferplus_relabels_aligned_rows(tmp_path):
    fer = write_fer2013_csv(tmp_path / "fer2013.csv", [(0, "Training", 1), (3, "Training", 2), (6, "Training", 3), (2, "PublicTest", 4)])
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
    votes = ["Training,fer0000000.png,0,0,8,0,2,0,0,0,0,0", "Training,fer0000001.png,4,4,0,0,0,0,0,0,2,0", "Training,,0,0,0,0,0,0,0,0,0,10"]
    plus = tmp_path / "fer2013new.csv"
    plus.write_text("\n".join([header, *votes, "PublicTest,fer0000003.png,0,0,0,0,0,0,10,0,0,0"]) + "\n")
    train = load_ferplus(fer, plus)
    assert [FER_CLASSES[i] for i in train.labels] == ["surprise"]  # FER2013 said angry; rows 2 and 3 are dropped
    assert (train.images[0] == 1).all() and train.paths == ("fer2013new.csv:row0",)
    assert [FER_CLASSES[i] for i in load_ferplus(fer, plus, usage="PublicTest").labels] == ["fear"]
    plus.write_text("\n".join([header, *votes]) + "\n")
    with pytest.raises(DatasetError, match="align"):
        load_ferplus(fer, plus)
