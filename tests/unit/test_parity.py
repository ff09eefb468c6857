import numpy as np

from bench.parity import markdown, parity
from calibration.outputs import Outputs


def outputs(pred, conf, labels) -> Outputs:
    return Outputs(np.asarray(conf, dtype=np.float32), np.asarray(pred, dtype=np.int32),
                   np.asarray(labels), (8, 16, 2048), {})


def test_parity_counts_agreement_per_size_and_through_the_cascade():
    labels = [0, 1, 2, 3]
    fp32 = outputs([[0, 0, 0], [1, 1, 1], [0, 2, 2], [3, 3, 3]],
                   [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [0.9, 0.9, 0.9]], labels)
    # bf16 flips image 1 at size 8 (wrong) and pushes image 3 below the 8-d threshold (then 16 answers, right)
    bf16 = outputs([[0, 0, 0], [2, 1, 1], [0, 2, 2], [3, 3, 3]],
                   [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [0.4, 0.9, 0.9]], labels)
    r = parity(fp32, bf16, {"p": [0.5, 0.5]})
    assert r["agreement"] == {"8": 0.75, "16": 1.0, "2048": 1.0}
    assert r["top1"]["fp32"]["8"] == 0.75 and r["top1"]["bf16"]["8"] == 0.5
    c = r["cascade"]["p"]
    assert c["fp32"]["top1"] == 1.0 and c["bf16"]["top1"] == 0.75 and c["top1_delta"] == -0.25
    assert c["agreement"] == 0.75
    assert c["fp32"]["expected_dims"] == 10.0 and c["bf16"]["expected_dims"] == 12.0
    r.update(data="d", graph="jit", machine={"cpu": "x"}, command="c", date="t", thresholds_numerics="fp32")
    assert "| p | 1.0000 | 0.7500 | -25.00 |" in markdown(r)
