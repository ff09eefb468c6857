import gzip

import numpy as np
import pytest
from PIL import Image

from imagedata.specs import FASHION_MNIST_CLASSES, FolderImages, holdout_split, load_spec, read_idx

needs_fashion_mnist = pytest.mark.usefixtures("fashion_mnist_installed")


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trips(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)


def test_idx_reader_rejects_truncated_file(tmp_path):
    arr = np.zeros((2, 3), dtype=np.uint8)
    write_idx(tmp_path / "x.gz", arr)
    raw = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(raw[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "y.gz")


def test_holdout_split_is_deterministic_and_disjoint():
    train, hold = holdout_split()
    train2, hold2 = holdout_split()
    np.testing.assert_array_equal(hold, hold2)
    np.testing.assert_array_equal(train, train2)
    assert len(train) == 55000 and len(hold) == 5000
    assert len(np.union1d(train, hold)) == 60000
    # Pinned: changing the documented seed would silently move calibration data into training.
    assert hold[:5].tolist() == [1, 27, 42, 57, 99]
    assert int(hold.sum()) == 148507200


@needs_fashion_mnist
def test_fashion_mnist_splits():
    test = load_spec("fashion-mnist:test")
    hold = load_spec("fashion-mnist:holdout")
    assert len(test) == 10000 and len(hold) == 5000
    img, label = test[0]
    assert img.size == (28, 28) and img.mode == "L" and label == 9  # the first test image is an ankle boot
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_folder_by_index_and_by_name(tmp_path):
    for sub in ("0", "Trouser"):
        (tmp_path / sub).mkdir()
        Image.new("L", (28, 28), 7).save(tmp_path / sub / "a.png")
    data = FolderImages(tmp_path, FASHION_MNIST_CLASSES)
    assert sorted(data.labels.tolist()) == [0, 1]
    img, _ = data[0]
    assert img.size == (28, 28)


def test_folder_with_unknown_class_is_refused(tmp_path):
    (tmp_path / "Hat").mkdir()
    with pytest.raises(ValueError, match="'Hat'"):
        FolderImages(tmp_path, FASHION_MNIST_CLASSES)


def test_a_missing_system_dependency_fails_naming_the_setup_step(tmp_path):
    """No silent skips: a PATH without promtool is a failure that says how to install it."""
    from tests import deps
    with pytest.raises(pytest.fail.Exception, match=r"promtool.*Debian package prometheus.*make setup.*setup/system.sh"):
        deps.need_binary("promtool", "prometheus", path=str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"dataset-fashion-mnist.*setup/system.sh"):
        deps.need_file(tmp_path / "t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    assert deps.need_binary("sh", "dash").endswith("/sh")
