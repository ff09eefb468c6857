"""fit_thresholds.py --numerics/--add: one thresholds file with a set per numerics mode, each fit in
its mode (bf16 emulated where the CPU has no bf16 instructions), served by the worker of that mode."""
import json

import numpy as np
from PIL import Image

from calibration import fit_thresholds
from calibration.outputs import collect
from handler.checkpoint import file_sha256
from handler.thresholds import SETS_SCHEMA, load_thresholds


def holdout_folder(root, n=60):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(folder / f"{i}.png")
    return root


def test_a_set_per_numerics_mode_each_fit_in_its_mode(tiny_checkpoint, tmp_path):
    data = holdout_folder(tmp_path / "holdout")
    out = tmp_path / "thr" / "thresholds.json"
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--no-cache"]
    bf16 = fit_thresholds.main([*common, "--numerics", "bf16"])
    fp32 = fit_thresholds.main([*common, "--numerics", "fp32", "--add"])
    doc = json.loads(out.read_text())
    assert doc["schema"] == SETS_SCHEMA and sorted(doc["sets"]) == ["bf16", "fp32"]
    assert doc["sets"]["bf16"]["meta"]["numerics"] == "bf16" and fp32["meta"]["numerics"] == "fp32"
    assert doc["sets"]["bf16"]["operating_points"] == bf16["operating_points"]
    assert (out.parent / "thresholds_report.md").exists() and (out.parent / "thresholds_report_fp32.md").exists()
    sha = file_sha256(tiny_checkpoint)
    for mode, want in (("bf16", bf16), ("fp32", fp32)):
        points = load_thresholds(out, nesting=want["meta"]["nesting"], checkpoint_sha256=sha, numerics=mode)
        assert points.meta["numerics"] == mode
        assert points.points["balanced"] == tuple(want["operating_points"]["balanced"]["thresholds"].values())
    # bf16 was really run (rounded), not fp32 under another name: the per-size confidences differ.
    runs = {m: collect(tiny_checkpoint, str(data), numerics=m, emulate=True, cache_dir=None, progress=False)
            for m in ("bf16", "fp32")}
    assert runs["bf16"].meta["numerics"] == "bf16" and runs["fp32"].meta["numerics"] == "fp32"
    assert not np.allclose(runs["bf16"].conf, runs["fp32"].conf, rtol=0, atol=1e-6)
    np.testing.assert_allclose(runs["bf16"].conf, runs["fp32"].conf, atol=0.05)  # but only by rounding
