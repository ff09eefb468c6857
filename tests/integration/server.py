"""A real TorchServe for tests: archive built from a checkpoint, config from config.properties with
test ports, started in a temporary folder (logs and key_file.json land there), stopped after."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from client.http import Client
from model_store.build_archive import archive
from model_store.serve import describe, read_keys, start, stop, write_config

ROOT = Path(__file__).resolve().parents[2]
PORTS = {"inference": 18080, "management": 18081, "metrics": 18082}


@dataclass
class Server:
    root: Path
    model: str
    inference: str
    management: str
    metrics: str

    @property
    def keys(self) -> dict[str, str]:
        return read_keys(self.root)

    def client(self, token: str | None = "inference", **kw) -> Client:
        tok = self.keys[token] if token in ("inference", "management") else token
        return Client(self.inference, tok, self.model, **kw)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in describe(self.model, self.keys["management"], self.management)["workers"]]

    def scrape(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"{self.metrics}/metrics", timeout=10) as resp:
            return resp.read().decode()


def build_archive(checkpoint: Path, model_store: Path, *, name: str = "mrl_resnet50", graph: str = "eager",
                  batch_size: int = 8, batch_delay: int = 20, workers: int = 1, **options) -> Path:
    """A test archive: eager graph, a 20 ms batch delay and one worker unless asked (options as
    build_archive's); one worker keeps the suite's memory and start-up down."""
    return archive(checkpoint, model_store, name=name, graph=graph, batch_size=batch_size,
                   batch_delay=batch_delay, workers=workers, **options)


@contextlib.contextmanager
def running_prometheus(tmp: Path, port: int, rules: Path | None = None):
    """A real Prometheus scraping the test TorchServe every second, with the project's rules (or
    ``rules``, e.g. a copy with scaled windows)."""
    from monitoring import prometheus

    text = prometheus.CONFIG.read_text()
    text = text.replace("127.0.0.1:8082", f"127.0.0.1:{PORTS['metrics']}").replace("5s", "1s")
    text = text.replace("- alerts.yml", f"- {rules or prometheus.MONITORING / 'alerts.yml'}")
    (tmp / "prometheus.yml").write_text(text)
    prometheus.start(tmp / "prometheus.yml", tmp / "data", port=port)
    try:
        yield
    finally:
        prometheus.stop(tmp / "data")


def prom_query(port: int, expr: str) -> dict:
    """Prometheus's HTTP API answer to an instant query."""
    import json
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@contextlib.contextmanager
def running_server(tmp: Path, checkpoint: Path, *, thresholds: Path | None = None, name: str = "mrl_resnet50",
                   ready_timeout: float = 240, config_extra: str = "", **archive_kw):
    store = tmp / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    build_archive(checkpoint, store, thresholds=thresholds, name=name, **archive_kw)
    config = write_config(tmp / "config.properties", store, PORTS,
                          extra=f"\nload_models={name}.mar\n" + config_extra)
    stop(tmp)  # a stale TorchServe (one per machine) would hold the pid file
    try:
        start(name, ready_timeout, root=tmp, config=config, model_store=store,
              management=f"http://127.0.0.1:{PORTS['management']}")
        yield Server(tmp, name, *(f"http://127.0.0.1:{PORTS[k]}" for k in ("inference", "management", "metrics")))
    finally:
        stop(tmp)
