"""Labelled image folders, class maps, stratified splits and k-shot sampling (clipfuse.export.data)."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.core.errors import ClipfuseError
from clipfuse.export.data import (
    read_class_map,
    sample_k_shot,
    scan_labelled_folder,
    seeded_split,
)
from clipfuse.runtime.images import IMAGE_EXTENSIONS


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    touch(root / "dog" / "b.JPG")
    touch(root / "dog" / "deeper" / "more" / "a.png")
    touch(root / "dog" / "notes.txt")               # not an image
    touch(root / "dog" / "._b.jpg")                 # macOS resource fork, hidden
    touch(root / "cat" / "z.webp")
    touch(root / "cat" / "y.Tiff")
    touch(root / ".thumbs" / "t.jpg")               # hidden folder: not a class
    touch(root / "README.md")                       # stray file at the top: ignored
    return root


def test_scan_lists_images_recursively_with_sorted_class_folders(tree):
    paths, labels, names = scan_labelled_folder(tree)
    assert names == ["cat", "dog"]
    rel = [p.relative_to(tree).as_posix() for p in paths]
    assert rel == ["cat/y.Tiff", "cat/z.webp", "dog/b.JPG", "dog/deeper/more/a.png"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1]


def test_labelled_scan_and_predict_folder_scan_list_the_same_files(tree):
    """One image scan: a class folder lists exactly what `clipfuse predict FOLDER` would classify."""
    from clipfuse.runtime.images import collect_images

    paths, labels, names = scan_labelled_folder(tree)
    for label, name in enumerate(names):
        assert collect_images([tree / name]) == [p for p, y in zip(paths, labels) if y == label]


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_every_image_extension_in_any_case_is_listed(tmp_path, ext):
    for i, variant in enumerate((ext, ext.upper(), ext[:2] + ext[2:].upper())):
        touch(tmp_path / "c" / f"img{i}{variant}")
    touch(tmp_path / "c" / f"img{ext}.txt")
    touch(tmp_path / "d" / "other.png")                 # a second class: one class is refused
    paths, _, _ = scan_labelled_folder(tmp_path)
    assert len([p for p in paths if p.parent.name == "c"]) == 3


def test_a_single_class_is_refused(tmp_path):
    """fit on one class is refused, not reported as 100%."""
    touch(tmp_path / "cat" / "a.png")
    with pytest.raises(ClipfuseError, match=r"has 1 class folder \('cat'\); a classifier needs at least two classes"):
        scan_labelled_folder(tmp_path)
    with pytest.raises(ClipfuseError, match="at least two classes"):
        scan_labelled_folder(tmp_path, classes={"cat": "kitty"})


def test_scan_errors_name_the_culprit(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ClipfuseError, match="nope.*does not exist"):
        scan_labelled_folder(missing)
    a_file = touch(tmp_path / "file.jpg")
    with pytest.raises(ClipfuseError, match="file.jpg.*not a folder"):
        scan_labelled_folder(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipfuseError, match="empty.*is empty"):
        scan_labelled_folder(empty)
    flat = tmp_path / "flat"
    touch(flat / "one.jpg")
    with pytest.raises(ClipfuseError, match="flat.*no class folders"):
        scan_labelled_folder(flat)
    root = tmp_path / "root"
    touch(root / "good" / "a.jpg")
    touch(root / "bad" / "readme.txt")
    with pytest.raises(ClipfuseError, match=r"bad.*has no image files"):
        scan_labelled_folder(root)


def test_class_map_tab_comma_comments_and_order(tmp_path):
    path = tmp_path / "map.tsv"
    path.write_text(
        "# folder -> name\n"
        "n02\tgolden retriever, a dog\n"
        "\n"
        "n01,tabby cat\n",
        encoding="utf-8",
    )
    assert read_class_map(path) == {"n02": "golden retriever, a dog", "n01": "tabby cat"}
    assert list(read_class_map(path)) == ["n02", "n01"]

    root = tmp_path / "root"
    touch(root / "n01" / "a.jpg")
    touch(root / "n02" / "b.jpg")
    touch(root / "n02" / "c.jpg")
    paths, labels, names = scan_labelled_folder(root, classes=path)
    # The map's order defines the labels, not the sorted folder names.
    assert names == ["golden retriever, a dog", "tabby cat"]
    assert [p.parent.name for p in paths] == ["n02", "n02", "n01"]
    assert labels.tolist() == [0, 0, 1]
    _, labels2, names2 = scan_labelled_folder(root, classes={"n01": "cat", "n02": "dog"})
    assert names2 == ["cat", "dog"] and labels2.tolist() == [0, 1, 1]


def test_class_map_errors_name_file_line_and_folder(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("n01\tcat\nn02 dog\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match=r"bad.txt.*line 2.*no tab or comma"):
        read_class_map(bad)
    bad.write_text("n01\tcat\nn01\tkitten\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match=r"line 2.*'n01' is mapped twice"):
        read_class_map(bad)
    bad.write_text("n01\tcat\nn02\tcat\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match=r"line 2.*'cat' is already used by folder 'n01'"):
        read_class_map(bad)
    bad.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ClipfuseError, match="maps no folders"):
        read_class_map(bad)
    with pytest.raises(ClipfuseError, match="missing.tsv.*does not exist"):
        read_class_map(tmp_path / "missing.tsv")

    root = tmp_path / "root"
    touch(root / "n01" / "a.jpg")
    touch(root / "n03" / "a.jpg")
    with pytest.raises(ClipfuseError, match=r"'n02'.*does not have"):
        scan_labelled_folder(root, classes={"n01": "cat", "n02": "dog", "n03": "cow"})
    with pytest.raises(ClipfuseError, match=r"'n03'.*not in the class map"):
        scan_labelled_folder(root, classes={"n01": "cat"})


def test_seeded_split_is_stratified_disjoint_and_seeded():
    counts = {0: 50, 1: 20, 2: 3, 3: 1}
    labels = np.random.default_rng(0).permutation(np.concatenate([np.full(n, c) for c, n in counts.items()]))
    train, ev = seeded_split(labels, 0.2, seed=7)
    assert np.intersect1d(train, ev).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, ev])), np.arange(len(labels)))
    expected_eval = {0: 10, 1: 4, 2: 1, 3: 0}       # round(n * 0.2), at least 1 when n >= 2, singleton stays in train
    for c, n in counts.items():
        assert int((labels[ev] == c).sum()) == expected_eval[c]
        assert int((labels[train] == c).sum()) == n - expected_eval[c]
    again = seeded_split(labels, 0.2, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], ev)
    other = seeded_split(labels, 0.2, seed=8)
    assert not np.array_equal(other[1], ev)
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ClipfuseError, match="eval_fraction"):
            seeded_split(labels, bad, seed=0)


def test_sample_k_shot_draws_k_per_class_nested_and_seeded():
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(5), 12))
    idx4 = sample_k_shot(labels, 4, seed=3)
    assert len(idx4) == 20 and len(np.unique(idx4)) == 20
    assert np.array_equal(np.bincount(labels[idx4], minlength=5), np.full(5, 4))
    assert np.array_equal(labels[idx4], np.repeat(np.arange(5), 4))        # grouped by class, label order
    assert np.array_equal(sample_k_shot(labels, 4, seed=3), idx4)
    assert not np.array_equal(sample_k_shot(labels, 4, seed=4), idx4)
    idx2 = sample_k_shot(labels, 2, seed=3)
    assert set(idx2.tolist()) <= set(idx4.tolist())                         # nested over k
    assert np.array_equal(np.sort(sample_k_shot(labels, 12, seed=0)), np.arange(60))


def test_sample_k_shot_errors_name_the_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ClipfuseError, match=r"class 'dog' \(label 1\) has 2 example\(s\), fewer than k=3"):
        sample_k_shot(labels, 3, seed=0, class_names=["cat", "dog", "cow"])
    with pytest.raises(ClipfuseError, match=r"class 1 has 2"):
        sample_k_shot(labels, 3, seed=0)
    with pytest.raises(ClipfuseError, match=r"class 'emu' \(label 3\) has 0 example"):
        sample_k_shot(labels, 1, seed=0, num_classes=4, class_names=["cat", "dog", "cow", "emu"])
    for k in (0, -1, 1.5):
        with pytest.raises(ClipfuseError, match="positive integer"):
            sample_k_shot(labels, k, seed=0)
    with pytest.raises(ClipfuseError, match="1-D"):
        sample_k_shot(labels.reshape(2, 4), 1, seed=0)
