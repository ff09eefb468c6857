"""The images make serve's printout sends: its han1000 curl shows the cascade escalating (issue #34,
acceptance 1), as the README's second answer says, and the easy_* images stop at 8 dims. In process,
through the worker's own service, with the committed checkpoint and thresholds."""
from pathlib import Path

import pytest

from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import load_thresholds
from model_store.serve import EXAMPLES, ROOT

HAN1000 = ROOT / "model_store" / "han1000"


def answers(images: list[Path]) -> list[dict]:
    checkpoint = HAN1000 / "mrl_resnet50_fp16.pt"
    if not checkpoint.exists():
        pytest.fail(f"{checkpoint} is missing: git checkout -- {checkpoint.relative_to(ROOT)} restores it",
                    pytrace=False)
    model, card = load_mrl_resnet50(checkpoint)
    points = load_thresholds(HAN1000 / "thresholds.json", nesting=card.nesting,
                             checkpoint_sha256=file_sha256(checkpoint), numerics=card.numerics)
    service = MRLService(model, card, points, name="han1000", numerics=card.numerics)
    out = service.handle([{"body": path.read_bytes()} for path in images])
    assert [status for status, _ in out] == [200] * len(images)
    return [body for _, body in out]


def test_the_printed_han1000_example_escalates_and_the_easy_ones_do_not():
    easy = sorted((ROOT / "examples" / "han1000").glob("easy_*.png"))
    printed, *rest = answers([ROOT / "examples" / EXAMPLES["han1000"], *easy])
    assert (printed["label"], printed["sizes_tried"]) == ("半", [8, 16, 32, 64, 128, 256, 512, 1024])
    assert [a["sizes_tried"] for a in rest] == [[8]] * len(easy) and len(easy) == 3
