"""calibration.outputs' cache (issue #33 item 7): an image folder's key follows its files, so images
re-exported into the same folder are run again, never scored as the old ones."""
import os

import numpy as np
from PIL import Image

from calibration.outputs import collect


def export(root, seed: int, n: int = 12) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(folder / f"{i}.png")


def run(checkpoint, data, cache):
    return collect(checkpoint, str(data), graph="eager", cache_dir=cache, progress=False)


def test_a_folder_reexported_in_place_is_run_again(tiny_checkpoint, tmp_path):
    data, cache = tmp_path / "holdout", tmp_path / "cache"
    export(data, seed=0)
    first = run(tiny_checkpoint, data, cache)
    again = run(tiny_checkpoint, data, cache)
    assert not first.meta["cached"] and again.meta["cached"]  # unchanged: the cache serves
    np.testing.assert_array_equal(again.conf, first.conf)

    export(data, seed=1)  # the same names, other images
    fresh = collect(tiny_checkpoint, str(data), graph="eager", cache_dir=None, progress=False)
    redone = run(tiny_checkpoint, data, cache)
    assert not redone.meta["cached"]
    np.testing.assert_array_equal(redone.conf, fresh.conf)
    assert not np.array_equal(redone.conf, first.conf)


def test_a_changed_file_with_the_same_size_and_a_touched_file_change_the_key(tiny_checkpoint, tmp_path):
    data, cache = tmp_path / "holdout", tmp_path / "cache"
    export(data, seed=0)
    run(tiny_checkpoint, data, cache)
    f = data / "3" / "3.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    assert not run(tiny_checkpoint, data, cache).meta["cached"]
    (data / "3" / "3.png").rename(data / "4" / "3.png")  # the same file under another class
    assert not run(tiny_checkpoint, data, cache).meta["cached"]
