"""A bounded job queue (build_archive --queue-size, TorchServe's per-model jobQueueSize): under a
burst far beyond what the queue holds, every request is answered or refused with 503 at once;
nothing else, nothing waits out a timeout. bench/overload.py measures the same at 1x/2x/4x the
saturation rate, open loop."""
import concurrent.futures as cf
import time

import pytest

from tests.integration.server import ROOT, running_server

pytestmark = pytest.mark.integration
DEMO = ROOT / "model_store" / "fashion_mnist"


def test_a_full_job_queue_refuses_at_once_with_503(tmp_path, test_images):
    with running_server(tmp_path, DEMO / "mrl_resnet50_fp16.pt", batch_size=1, batch_delay=1,
                        queue_size=2) as server:
        client = server.client()
        assert client.predict(test_images[0]).status == 200
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(client.predict, test_images[:192]))
        wall = time.perf_counter() - t0
    statuses = {r.status for r in results}
    assert statuses <= {200, 503}, statuses
    refused = [r for r in results if r.status == 503]
    answered = [r for r in results if r.status == 200]
    assert refused and answered, (len(refused), len(answered))
    assert all(r.body and r.body.get("code") == 503 and r.body.get("message") for r in refused), refused[0].body
    # a refusal is the frontend's answer, not a wait: each comes back well inside the burst
    assert max(r.seconds for r in refused) < max(1.0, wall / 2), (max(r.seconds for r in refused), wall)
