"""What an archive carries (issue #32): the handler as a package, the OIP metadata, nothing of the
checkout needed at serve time. A folder handed to the archiver is copied flat, which is how
archives once held service.py, engine.py ... at their root and no handler package."""
import json
import zipfile
from pathlib import Path

import handler
from handler.oip import OUTPUTS, model_metadata
from model_store.build_archive import archive


def test_the_archive_carries_the_handler_package_and_its_oip_metadata(tiny_checkpoint, tmp_path):
    mar = archive(tiny_checkpoint, tmp_path, name="tiny", graph="eager", workers=1)
    names = set(zipfile.ZipFile(mar).namelist())
    for src in Path(handler.__file__).parent.glob("*.py"):
        if src.name != "ts_handler.py":
            assert f"handler/{src.name}" in names, src.name
            assert src.name not in names  # not flat at the root
    assert "ts_handler.py" in names and "handler/ts_handler.py" not in names  # the entry point, once
    assert not any("__pycache__" in n for n in names)
    meta = json.loads(zipfile.ZipFile(mar).read("oip_metadata.json"))
    assert meta == model_metadata(gallery=False)


def test_model_metadata_lists_what_a_request_can_get():
    plain, with_gallery = model_metadata(gallery=False), model_metadata(gallery=True)
    assert plain["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert {o["name"] for o in with_gallery["outputs"]} == set(OUTPUTS)
    assert {o["name"] for o in plain["outputs"]} == {n for n in OUTPUTS if not n.startswith("neighbor_")}
    shapes = {o["name"]: o["shape"] for o in with_gallery["outputs"]}
    assert shapes["label"] == [1] and shapes["top_k_labels"] == [-1] and shapes["embedding"] == [-1]
    assert all(o["datatype"] == OUTPUTS[o["name"]] for o in with_gallery["outputs"])
