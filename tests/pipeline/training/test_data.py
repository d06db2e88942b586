import os

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
    load_rafdb,
)
from tests.pipeline.training.conftest import RAFDB_ITEMS, pattern_csv, scheme_folders, write_dataset, write_fer2013_csv, write_rafdb


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
        ([0, 0, 0, 0, 0, 0, 0, 9, 1, 0], "contempt"),  # not a FER2013 class: loaders reject or skip it
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


def test_ferplus_contempt_majority_needs_an_explicit_skip(tmp_path):
    fer = write_fer2013_csv(tmp_path / "fer2013.csv", [(0, "Training", 1), (3, "Training", 2)])
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
    plus = tmp_path / "fer2013new.csv"
    plus.write_text(f"{header}\nTraining,a.png,0,9,0,0,0,0,0,1,0,0\nTraining,b.png,2,0,0,0,0,0,0,8,0,0\n")
    with pytest.raises(DatasetError, match=r"unknown class 'contempt' \(FER\+ majority\) at .*fer2013new.csv:3.*--skip-classes contempt"):
        load_ferplus(fer, plus)
    data = load_ferplus(fer, plus, skip_classes=("contempt",))
    assert [FER_CLASSES[i] for i in data.labels] == ["happy"] and data.paths == ("fer2013new.csv:row0",)


def test_csv_rows_are_resized_like_image_files(tmp_path):
    csv_path = pattern_csv(tmp_path / "fer2013.csv", {"Training": 1})
    small = load_fer2013_csv(csv_path, image_size=32)
    assert small.images.shape == (7, 32, 32)
    first = load_fer2013_csv(csv_path).images[0]
    expected = np.asarray(Image.fromarray(first).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(small.images[0], expected)


# --------------------------------------------------------------------------- digit folders (Kaggle RAF-DB / AffectNet exports)


def test_rafdb_digit_folders_map_to_canonical_order(tmp_path):
    root = write_dataset(tmp_path / "train", per_class=2, folder_names=scheme_folders("rafdb"))
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3", "4", "5", "6", "7"]
    data = load_image_folder(root, label_scheme="rafdb", use_cache=False)
    assert data.classes == FER_CLASSES and data.class_counts().tolist() == [2] * 7
    by_folder = {path.split("/")[0]: FER_CLASSES[label] for path, label in zip(data.paths, data.labels, strict=True)}
    assert by_folder == {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}
    # The pixels of "1/000.png" are the surprise pattern written by write_dataset.
    np.testing.assert_array_equal(data.images[data.paths.index("1/000.png")], np.asarray(Image.open(root / "1" / "000.png")))


def test_affectnet_contempt_folder_is_an_error_unless_skipped(tmp_path):
    root = write_dataset(tmp_path / "train", per_class=1, folder_names=scheme_folders("affectnet"))
    (root / "7").mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "7" / "c.png")
    with pytest.raises(DatasetError, match=r"unknown class folder '7' \(contempt\) in .*--skip-classes contempt"):
        load_image_folder(root, label_scheme="affectnet", use_cache=False)
    data = load_image_folder(root, label_scheme="affectnet", skip_classes=("contempt",), use_cache=False)
    assert len(data) == 7 and not any(path.startswith("7/") for path in data.paths)
    by_folder = {path.split("/")[0]: FER_CLASSES[label] for path, label in zip(data.paths, data.labels, strict=True)}
    assert by_folder == {"0": "neutral", "1": "happy", "2": "sad", "3": "surprise", "4": "fear", "5": "disgust", "6": "angry"}


def test_named_contempt_folder_can_be_skipped(tmp_path):
    root = write_dataset(tmp_path / "d", per_class=1)
    (root / "Contempt").mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "Contempt" / "c.png")
    data = load_image_folder(root, skip_classes=["contempt"], use_cache=False)
    assert len(data) == 7 and data.classes == FER_CLASSES


def test_digit_folders_without_a_scheme_name_the_folder_and_the_schemes(tmp_path):
    root = write_dataset(tmp_path / "train", per_class=1, folder_names=scheme_folders("rafdb"))
    with pytest.raises(DatasetError, match=r"class folder '1' in .*train is a number.*--label-scheme rafdb.*--label-scheme affectnet"):
        load_image_folder(root, use_cache=False)
    named = write_dataset(tmp_path / "named", per_class=1)
    with pytest.raises(DatasetError, match=r"class folder 'angry' in .*named is not a rafdb label; expected folders 1, 2"):
        load_image_folder(named, label_scheme="rafdb", use_cache=False)
    with pytest.raises(DatasetError, match="unknown label scheme 'ck'"):
        load_image_folder(named, label_scheme="ck", use_cache=False)


# --------------------------------------------------------------------------- RAF-DB basic release


@pytest.mark.parametrize("aligned", [True, False])
def test_rafdb_basic_layout(tmp_path, aligned):
    root = write_rafdb(tmp_path / "basic", RAFDB_ITEMS, aligned=aligned)
    train = load_rafdb(root, "train")
    assert [FER_CLASSES[i] for i in train.labels] == ["surprise", "neutral", "happy"]
    assert train.images.shape == (3, 48, 48) and train.images.dtype == np.uint8
    folder, file = ("aligned", "train_00002_aligned.jpg") if aligned else ("original", "train_00002.jpg")
    assert train.paths[1] == f"Image/{folder}/{file}"
    expected = np.asarray(Image.open(root / train.paths[1]).convert("L").resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(train.images[1], expected)
    test = load_rafdb(root, "test", image_size=40)
    assert [FER_CLASSES[i] for i in test.labels] == ["angry", "fear"] and test.images.shape == (2, 40, 40)


def test_rafdb_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DatasetError, match=r"EmoLabel/list_patition_label.txt does not exist"):
        load_rafdb(tmp_path, "train")
    root = write_rafdb(tmp_path / "basic", RAFDB_ITEMS)
    with pytest.raises(DatasetError, match="unknown RAF-DB split 'val'"):
        load_rafdb(root, "val")
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    with pytest.raises(DatasetError, match=r"list_patition_label.txt:2: image .*train_00002_aligned.jpg does not exist"):
        load_rafdb(root, "train", use_cache=False)
    assert len(load_rafdb(root, "test", use_cache=False)) == 2  # the other split is unaffected
    list_file = root / "EmoLabel" / "list_patition_label.txt"
    list_file.write_text("test_0001.jpg 6\ntest_0002.jpg 8\n")
    with pytest.raises(DatasetError, match=r"list_patition_label.txt:2: expected .* got 'test_0002.jpg 8'"):
        load_rafdb(root, "test")
    list_file.write_text("test_0001.jpg 6\n\nval_0001.jpg 1\n")
    with pytest.raises(DatasetError, match=r"list_patition_label.txt:3: "):
        load_rafdb(root, "test")
    (root / "Image" / "aligned" / "test_0001_aligned.jpg").write_bytes(b"not a jpeg")
    list_file.write_text("test_0001.jpg 6\n")
    with pytest.raises(DatasetError, match=r"cannot decode image .*test_0001_aligned.jpg"):
        load_rafdb(root, "test", use_cache=False)
