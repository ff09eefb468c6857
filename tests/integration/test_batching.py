"""Greedy batching (model_store/java/mrl/oip/GreedyBatching.java) on a real TorchServe: under
config.properties' frontend a lone request is not held for the archive's maxBatchDelay and
concurrent requests still share batches; the same archive under TorchServe's own batching (the
agent without -Dmrl.batching=greedy) holds every lone request for the whole delay."""
import statistics

from client.http import run_load
from model_store.serve import GREEDY, config_vmargs
from tests.integration.server import running_server

DELAY_MS = 500  # far above what the tiny model takes to answer, so the two ways cannot be confused


def _counter(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _lone_ms(server, body: bytes, n: int = 5) -> list[float]:
    client = server.client()
    out = []
    for _ in range(n):
        r = client.predict(body)
        assert r.status == 200, r.body
        out.append(1000 * r.seconds)
    return out


def test_greedy_batching_answers_a_lone_request_at_once_and_still_batches_under_load(tmp_path, tiny_checkpoint,
                                                                                      test_images):
    with running_server(tmp_path, tiny_checkpoint, batch_size=8, batch_delay=DELAY_MS) as server:
        lone = _lone_ms(server, test_images[0])
        before = server.scrape()
        results = run_load(server.client(), test_images, concurrency=8, count=96)
        after = server.scrape()
        log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "greedy batching: a worker takes what is queued" in log
    # the batches reached the worker from the WorkerThread itself (config.properties' -Dmrl.send=inline)
    assert "inline send: a worker thread writes its batch to its worker itself" in log
    assert "NOT enabled" not in log
    assert statistics.median(lone) < DELAY_MS / 2, lone
    assert [r.status for r in results] == [200] * 96
    batches = _counter(after, "mrl_batches_total") - _counter(before, "mrl_batches_total")
    items = _counter(after, "mrl_batch_items_total") - _counter(before, "mrl_batch_items_total")
    assert items == 96 and batches < 96 / 2, (items, batches)  # the queue filled batches while one ran


def test_torchserves_own_batching_holds_a_lone_request_for_the_delay(tmp_path, tiny_checkpoint, test_images):
    """The control: without the property the agent leaves Model alone (so the test above can fail)."""
    assert GREEDY in config_vmargs().split()
    vmargs = config_vmargs(drop=(GREEDY,))
    with running_server(tmp_path, tiny_checkpoint, batch_size=8, batch_delay=DELAY_MS,
                        config_extra=f"\nvmargs={vmargs}\n") as server:
        lone = _lone_ms(server, test_images[0], n=3)
        log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "greedy batching" not in log
    assert min(lone) >= DELAY_MS, lone
