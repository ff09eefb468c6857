"""Drift, for real: the bundled Fashion-MNIST model and its thresholds in a real TorchServe, scraped
by a real Prometheus, with traffic capture on. In-distribution traffic (Fashion-MNIST test images),
then drifted traffic: the same garments dark on a light background, as a product photo or a scan
gives them (the model only ever saw light garments on black).

- The disagreement counter counts exactly the answers whose label differs from a dim=2048
  request for the same image (240 images: in distribution, inverted, and han1000:ood characters
  the model never saw; at the default point, the guaranteed point and fixed sizes 8 to 32).
- The cascade escalates on the drifted images: mean dims rise and the drift alert's expression
  turns true; its disagreement with the 2048-d head rises at least 5x and the disagreement alert's
  expression turns true.
- Thresholds refit from the captured drifted traffic, with no labels, are accepted by the archive
  builder and hold their epsilon on the part of that traffic they were not fit on, over 100 splits.

Prometheus runs the project's rules with every window scaled from minutes to seconds (5m -> 10s in
the recording rules; the alerts' windows as below), so the scenario takes about two minutes.
"""
import time

import numpy as np
import pytest
from PIL import ImageOps

from calibration import fit_thresholds, split_experiment
from calibration.methods import exits
from calibration.outputs import from_capture
from client.http import run_load
from handler.thresholds import load_thresholds
from imagedata import glyphs
from imagedata.specs import FASHION_MNIST_DIR, fashion_mnist
from monitoring import prometheus
from monitoring.queries import rule_expressions
from tests import deps
from tests.integration.conftest import png
from tests.integration.server import ROOT, build_archive, prom_query, running_prometheus, running_server
from tests.integration.test_metrics import delta

pytestmark = pytest.mark.integration
DEMO = ROOT / "model_store" / "fashion_mnist"
CKPT = DEMO / "mrl_resnet50_fp16.pt"
NAME = "mrl_resnet50"
PROM_PORT = 19091
PHASE_S = 40  # seconds of each kind of traffic
EPSILON, DELTA = 0.005, 0.1


def garments(n: int, start: int = 0, inverted: bool = False) -> list[bytes]:
    """Fashion-MNIST test images start..start+n as PNG; ``inverted``: dark on light."""
    deps.need_file(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    data = fashion_mnist("test")
    images = (data[i][0].convert("L") for i in range(start, start + n))
    return [png(ImageOps.invert(img) if inverted else img) for img in images]


def characters(n: int) -> list[bytes]:
    """The first n han1000:ood renders (brush and handwriting faces) as PNG."""
    from PIL import Image

    return [png(Image.fromarray(a, "L")) for a in glyphs.render_split("ood", n, progress=False)[0]]


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, capture_dir):
    with running_server(tmp_path_factory.mktemp("demo"), CKPT, thresholds=DEMO / "thresholds.json", name=NAME,
                        graph="jit", batch_size=8, batch_delay=5, capture_dir=capture_dir) as server:
        yield server


@pytest.fixture(scope="module")
def demo_prom(tmp_path_factory, demo_server, prometheus_installed):
    tmp = tmp_path_factory.mktemp("prom-drift")
    rules = (prometheus.MONITORING / "alerts.yml").read_text().replace("[5m]", "[10s]")
    (tmp / "alerts.yml").write_text(rules)
    with running_prometheus(tmp, PROM_PORT, rules=tmp / "alerts.yml"):
        yield


def _query(expr: str) -> list:
    return prom_query(PROM_PORT, expr)["data"]["result"]


def test_the_disagreement_counter_counts_exactly_the_answers_that_differ_from_dim_2048(demo_server):
    images = garments(80) + garments(80, start=80, inverted=True) + characters(80)
    client = demo_server.client()
    before = demo_server.scrape()
    full = run_load(client, images, concurrency=4, count=len(images), headers={"X-MRL-Dim": "2048"})
    asked = {"balanced": [{}], "guaranteed": [{"X-MRL-Operating-Point": "guaranteed"}],
             "exact": [{"X-MRL-Operating-Point": "exact"}],
             "fixed_dim": [{"X-MRL-Dim": str(m)} for m in (8, 16, 32)]}
    answers = {point: [run_load(client, images, concurrency=4, count=len(images), headers=h) for h in hs]
               for point, hs in asked.items()}
    assert {r.status for runs in answers.values() for rs in runs for r in [*rs, *full]} == {200}
    time.sleep(1.5)  # the frontend applies metric lines shortly after the response
    counted = delta(demo_server.scrape(), before, "mrl_cascade_disagreements_total", by="operating_point")
    differ = {point: sum(a.body["label"] != b.body["label"] for rs in runs for a, b in zip(rs, full))
              for point, runs in answers.items()}
    # This model's thresholds skip 16 to 1024 (8 dims carry Fashion-MNIST), so its cascade answers at 8
    # or 2048; the fixed sizes add the answers of 16 and 32 dims.
    cascade = {r.body["embedding_dim"] for point in ("balanced", "guaranteed") for r in answers[point][0]}
    sizes = cascade | {r.body["embedding_dim"] for r in answers["fixed_dim"][1] + answers["fixed_dim"][2]}
    print(f"answers that differ from dim=2048, of {len(images)} images each: {differ} (counted {counted}); "
          f"cascade exits at {sorted(cascade)}, answers at {sorted(sizes)}")
    assert differ["balanced"] > 0 and len(cascade) > 1  # the mix is of mixed difficulty: it escalates, and it errs
    assert len(sizes) > 2
    assert {p: counted.get(p, 0) for p in differ} == differ  # fixed_dim: dim=2048 adds none, by construction
    assert differ["exact"] == 0


def test_drifted_images_raise_mean_dims_and_disagreement_and_turn_both_alerts_true(demo_server, demo_prom):
    test, drifted = garments(1000), garments(1000, inverted=True)
    client = demo_server.client()
    headers = {"Content-Type": "image/png"}
    base_results = run_load(client, test, concurrency=4, duration=PHASE_S, headers=headers)
    ood_results = run_load(client, drifted, concurrency=4, duration=PHASE_S, headers=headers)
    assert {r.status for r in base_results + ood_results} == {200}
    # What the clients saw: the answers' own embedding sizes.
    seen_base = sum(r.body["embedding_dim"] for r in base_results) / len(base_results)
    seen_ood = sum(r.body["embedding_dim"] for r in ood_results) / len(ood_results)
    time.sleep(3)  # a scrape and a rule evaluation after the last request
    model = f'model_name="{NAME}"'
    now = _query(f"mrl:mean_dims:rate5m{{{model}}}")
    base = _query(f"avg_over_time(mrl:mean_dims:rate5m{{{model}}}[{PHASE_S - 15}s] offset {PHASE_S + 5}s)")
    assert now and base
    drifted_dims, baseline = float(now[0]["value"][1]), float(base[0]["value"][1])
    print(f"mean dims: in distribution {seen_base:.1f} (Prometheus {baseline:.1f}), drifted {seen_ood:.1f} "
          f"(Prometheus {drifted_dims:.1f}); {len(base_results)} + {len(ood_results)} requests")
    assert seen_ood >= 2 * seen_base
    assert drifted_dims >= 1.5 * baseline
    expr = dict(rule_expressions())["MRLMeanDimsDrift"]
    scaled = (expr.replace("[10m]", "[10s]")
              .replace("[6h] offset 10m", f"[{PHASE_S - 15}s] offset {PHASE_S + 5}s"))
    assert scaled != expr
    assert _query(scaled), scaled

    # Disagreement with the 2048-d head at the default point, label-free, against its alert line.
    point = f'{model}, operating_point="balanced"'
    now = _query(f"mrl:disagreement_ratio:rate5m{{{point}}}")
    base = _query(f"avg_over_time(mrl:disagreement_ratio:rate5m{{{point}}}[{PHASE_S - 15}s] offset {PHASE_S + 5}s)")
    ratio_ood, ratio_test = float(now[0]["value"][1]), float(base[0]["value"][1])
    line = _query(f"max(mrl_disagreement_alert_ratio{{{point}}})")
    assert line, "the served thresholds file sets no alert line for the default point"
    print(f"disagreement with the 2048-d head: in distribution {ratio_test:.4f}, drifted {ratio_ood:.4f} "
          f"({ratio_ood / ratio_test:.1f}x; alert line {float(line[0]['value'][1]):.4f})")
    assert ratio_test > 0 and ratio_ood >= 5 * ratio_test  # issue #19's acceptance
    expr = dict(rule_expressions())["MRLDisagreementAboveEpsilon"]
    scaled = expr.replace("[5m]", "[10s]").replace(">= 1000", ">= 20")  # the guard, per 10 s
    assert scaled != expr
    assert _query(scaled), scaled


def test_thresholds_refit_from_captured_drifted_traffic_hold_their_epsilon(demo_server, capture_dir, tmp_path):
    # 4,000 distinct drifted images, each sent once (none of the 1,000 above): the traffic to refit on.
    ood = garments(4000, start=1000, inverted=True)
    time.sleep(2)
    t0 = time.time()
    results = run_load(demo_server.client(), ood, concurrency=4, count=len(ood))
    assert {r.status for r in results} == {200}
    time.sleep(3)  # the capture writer appends once a second
    since_hours = (time.time() - t0 + 0.5) / 3600
    out = tmp_path / "refit.json"
    doc = fit_thresholds.main(["--checkpoint", str(CKPT), "--data", f"capture:{capture_dir}", "--unlabeled",
                               "--since-hours", f"{since_hours:.6f}", "--epsilon", str(EPSILON),
                               "--delta", str(DELTA), "--out", str(out)])
    assert doc["meta"]["data"]["n"] == len(ood)  # exactly this phase's answers, none lost
    build_archive(CKPT, tmp_path / "store", thresholds=out, name=NAME)  # the server accepts it

    # The guarantee on traffic it was not fit on: 100 random calibration/evaluation splits.
    pool = from_capture(CKPT, f"capture:{capture_dir}", since=t0 - 0.5)
    assert len(pool.labels) == len(ood)
    result = split_experiment.run(pool, len(ood) // 2, 100, EPSILON, DELTA, unlabeled=True)
    served = load_thresholds(DEMO / "thresholds.json", nesting=pool.nesting, checkpoint_sha256=None,
                             numerics=pool.meta["numerics"])  # the set the server served
    default = exits(pool, list(served.points[served.default]))
    print(f"refit on {len(ood)} captured drifted answers: guaranteed point {doc['operating_points']['guaranteed']['holdout']}; "
          f"100 splits: violation rate {result['violation_rate']:.2f}, mean disagreement {result['mean_drop']:.4f}, "
          f"max {result['max_drop']:.4f}, mean dims {result['mean_expected_dims']:.1f} "
          f"(the served default point on this traffic: {np.asarray(pool.nesting)[default].mean():.1f} dims)")
    assert result["violation_rate"] <= DELTA
    assert result["mean_expected_dims"] < pool.nesting[-1]  # not vacuous: it still skips the 2048-d head
