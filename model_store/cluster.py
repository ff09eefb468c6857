"""N TorchServe replicas behind an HAProxy gateway that checks API keys (make serve REPLICAS=N).

    python -m model_store.cluster start --replicas 3   # gateway on 127.0.0.1:8080, like one server
    python -m model_store.cluster stop                 # everything it started (make stop runs it)
    python -m model_store.cluster status               # HAProxy's view: each replica UP or DOWN

Layout (all loopback): replica i serves inference on 8180+10i, management 8181+10i, metrics
8182+10i, gRPC 8183+10i/8184+10i, with its worker ports from 9100+100i. Each runs in its own
folder under logs/cluster/ with its own TMPDIR (TorchServe keeps one pid file per temp dir).
The gateway is the only door that opens without a replica's own keys:

- API keys come from a file, one per line (``--api-keys``; default logs/cluster/api_keys,
  generated on first start with mode 0600). A request without ``Authorization: Bearer KEY`` for
  one of them (scheme in any case, the key exactly) gets a 401 JSON error from HAProxy and never
  reaches TorchServe; the header is removed before forwarding and HAProxy's log format records no
  headers. /ping and /v2/health/{live,ready} answer without a key (load balancers and probes).
- Each replica keeps TorchServe's token auth on, so that nobody else on the machine calls its
  inference, management or gRPC ports (they all listen on loopback) without its keys, which
  TorchServe writes to key_file.json (0600) in the replica's folder. The gateway hands each
  request to a small per-replica proxy on a Unix socket (mode 0600, in a 0700 folder) that adds
  that replica's inference key; a restarted replica's new key reaches HAProxy through its admin
  socket. The metrics ports need no key (Prometheus).
- HAProxy health-checks GET /ping every second (down after 2 failures, up after 2 passes),
  retries a request on another replica when a connection fails, and times out slow clients
  (10 s for the request head, 30 s idle).

One Prometheus scrapes every replica: start() writes logs/cluster/prometheus.yml (each target
labelled ``replica``), and `make monitor REPLICAS=N` uses it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from model_store.serve import ROOT, SERVER_ENV, processes, read_keys, wait_ready, write_config
from model_store.serve import start as start_server
from model_store.serve import stop as stop_server

CLUSTER = ROOT / "logs" / "cluster"
GATEWAY_PORT = 8080
BASE_PORT = 8180
BASE_WORKER_PORT = 9100
HAPROXY = "haproxy"  # Debian package haproxy (setup/debian-packages.txt)
# TorchServe's keys expire (60 minutes by default) and the gateway cannot renew them by itself:
# a replica's keys live as long as the replica, here ten years. They never leave the machine.
TOKEN_LIFETIME_MIN = 10 * 365 * 24 * 60


@dataclass(frozen=True)
class Replica:
    index: int
    home: Path        # its working directory: config, logs/, tmp/
    base_port: int
    threads: int = 0  # intra-op threads of its workers (MRL_THREADS); 0: the handler's default

    @property
    def name(self) -> str:
        return f"replica{self.index}"

    def port(self, kind: str) -> int:
        offset = {"inference": 0, "management": 1, "metrics": 2, "grpc_inference": 3, "grpc_management": 4}
        return self.base_port + offset[kind]

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port(kind)}"

    @property
    def env(self) -> dict[str, str]:
        """TMPDIR keys TorchServe's pid file, TEMP its Java temp dir (archives unpack there);
        MRL_THREADS splits the cores between replicas (spinning OpenMP threads of several
        processes on the same cores cost 4.5x in throughput here, docs/scaling.md); the rest as
        one server's (``SERVER_ENV``, which this environment may override)."""
        tmp = str(self.home / "tmp")
        env = {**SERVER_ENV, **os.environ, "TMPDIR": tmp, "TEMP": tmp}
        if self.threads:
            env |= {"MRL_THREADS": str(self.threads), "OMP_WAIT_POLICY": "PASSIVE"}
            env.pop("GOMP_SPINCOUNT", None)  # it would override the passive policy's 0
        return env


@dataclass(frozen=True)
class Cluster:
    home: Path = CLUSTER
    replicas: int = 3
    gateway_port: int = GATEWAY_PORT
    base_port: int = BASE_PORT
    base_worker_port: int = BASE_WORKER_PORT

    def replica(self, i: int) -> Replica:
        threads = max(1, len(os.sched_getaffinity(0)) // self.replicas) if self.replicas > 1 else 0
        return Replica(i, self.home / f"replica{i}", self.base_port + 10 * i, threads)

    @property
    def members(self) -> list[Replica]:
        return [self.replica(i) for i in range(self.replicas)]

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def _key(self) -> str:
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]

    @property
    def stats_socket(self) -> Path:
        """HAProxy's admin socket: in the temp dir under a short name keyed by this cluster's folder,
        since a Unix socket path must fit in 107 bytes and a checkout's path may not."""
        return Path(tempfile.gettempdir()) / f"mrl-haproxy-{self._key}.sock"

    @property
    def socket_dir(self) -> Path:
        """The folder (0700) of the per-replica proxies' Unix sockets, short for the same reason."""
        return Path(tempfile.gettempdir()) / f"mrl-gateway-{self._key}"

    @property
    def key_map(self) -> Path:
        """Each replica's inference key (``replica0 KEY`` lines, 0600), which HAProxy adds."""
        return self.home / "gateway" / "replica_keys.map"


def replica_config(cluster: Cluster, r: Replica, model_store: Path, load_models: str | None) -> Path:
    r.home.mkdir(parents=True, exist_ok=True)
    (r.home / "tmp").mkdir(exist_ok=True)
    overrides = {
        "disable_token_authorization": "false",  # every other local user would reach the ports
        "token_expiration_min": str(TOKEN_LIFETIME_MIN),
        "grpc_inference_port": str(r.port("grpc_inference")),
        "grpc_management_port": str(r.port("grpc_management")),
        "initial_worker_port": str(cluster.base_worker_port + 100 * r.index),
    }
    if load_models:
        overrides["load_models"] = load_models
    ports = {k: r.port(k) for k in ("inference", "management", "metrics")}
    return write_config(r.home / "config.properties", model_store, ports, overrides=overrides)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 whatever mode an older file had: a new file
    (created 0600) renamed over it, so the secret is never readable by others, even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def api_keys(path: Path) -> list[str]:
    """The keys of a key file (one per line, '#' comments); creates the file with one key if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# mrl-serve gateway API keys, one per line\n{secrets.token_urlsafe(24)}\n")
    keys = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    bad = [k for k in keys if any(c.isspace() for c in k) or len(k) < 16]
    if not keys or bad:
        raise SystemExit(f"{path}: need one or more keys of at least 16 characters, no spaces")
    return keys


def replica_key(r: Replica) -> str:
    """The inference key that replica ``r``'s TorchServe wrote at its last start."""
    return read_keys(r.home)["inference"]


def _proxy(cluster: Cluster, r: Replica) -> str:
    """The per-replica proxy, the only place that sends ``r``'s key: HAProxy cannot add a header
    per server of one backend, so each server of the balanced backend is one of these, on a Unix
    socket that only this user can open. It health-checks its replica (GET /ping with the key)
    and marks it down at the first refused connection (observe layer4: TorchServe's own 5xx never
    count), and the balanced backend's server tracks that state: a request retried after a dead
    replica is then sent to another one, as it was when the gateway connected to the replicas
    directly. It never retries by itself and answers no error of its own (an empty errorfile
    closes the connection instead), so the balanced backend retries as on a lost connection."""
    key = f'"Bearer %[str({r.name}),map({cluster.key_map})]"'
    return f"""
listen {r.name}
    bind unix@{cluster.socket_dir / f"{r.name}.sock"} mode 600
    retries 0
    timeout server 40s
    errorfile 502 /dev/null
    errorfile 503 /dev/null
    errorfile 504 /dev/null
    option httpchk
    http-check send meth GET uri /ping hdr authorization {key}
    http-check expect status 200
    http-request set-header authorization {key}
    server {r.name} 127.0.0.1:{r.port('inference')} check inter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
"""


def haproxy_config(cluster: Cluster, keys_acl: Path) -> str:
    servers = "\n".join(f"    server {r.name} unix@{cluster.socket_dir / f'{r.name}.sock'} track {r.name}/{r.name}"
                        for r in cluster.members)
    unauthorized = ('{"code": 401, "type": "Unauthorized", '
                    '"message": "missing or unknown API key: send Authorization: Bearer KEY"}')
    return f"""# Written by model_store/cluster.py; edit that, not this.
global
    maxconn 1024
    # L7 retries need the whole request in one buffer: 256 KiB holds our test images; bigger
    # bodies are still retried on a refused connection, never after they were sent.
    tune.bufsize 262144
    stats socket {cluster.stats_socket} mode 600 level admin
    log stdout format raw local0

defaults
    mode http
    timeout connect 2s
    timeout http-request 10s
    timeout client 30s
    timeout http-keep-alive 10s
    timeout queue 5s
    timeout server 35s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout

frontend gateway
    bind 127.0.0.1:{cluster.gateway_port}
    log global
    option httplog
    acl health path /ping /v2/health/live /v2/health/ready
    # The whole header (req.fhdr: req.hdr would cut it at commas, which keys may hold); the
    # scheme in any case (RFC 7235), the key compared exactly.
    acl bearer req.fhdr(authorization) -m reg -i ^bearer[[:space:]]+[^[:space:]]+$
    acl known_key req.fhdr(authorization),regsub(^[^[:space:]]+[[:space:]]+,) -m str -f {keys_acl}
    http-request return status 401 content-type application/json string '{unauthorized}' if !health !bearer or !health !known_key
    http-request del-header authorization
    default_backend torchserve

backend torchserve
    balance leastconn
    default-server maxconn 64
{servers}
{"".join(_proxy(cluster, r) for r in cluster.members)}"""


def prometheus_config(cluster: Cluster) -> str:
    targets = "\n".join(f"      - targets: [\"127.0.0.1:{r.port('metrics')}\"]\n"
                        f"        labels: {{replica: \"{r.name}\"}}" for r in cluster.members)
    rules = ROOT / "monitoring" / "alerts.yml"
    return f"""# Written by model_store/cluster.py: one Prometheus for every replica (make monitor REPLICAS=N).
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - {rules}
scrape_configs:
  - job_name: torchserve
    static_configs:
{targets}
"""


def _pid_file(cluster: Cluster) -> Path:
    return cluster.home / "gateway" / "haproxy.pid"


def start_gateway(cluster: Cluster, keys_file: Path) -> subprocess.Popen:
    gw = cluster.home / "gateway"
    gw.mkdir(parents=True, exist_ok=True)
    acl = gw / "keys.acl"
    write_private(acl, "".join(f"{k}\n" for k in api_keys(keys_file)))
    write_private(cluster.key_map, "".join(f"{r.name} {replica_key(r)}\n" for r in cluster.members))
    cluster.socket_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(cluster.socket_dir, 0o700)  # mkdir's mode yields to the umask, and the folder may be old
    cfg = gw / "haproxy.cfg"
    cfg.write_text(haproxy_config(cluster, acl))
    subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], check=True)
    with open(gw / "haproxy.log", "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen([HAPROXY, "-W", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _pid_file(cluster).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"haproxy exited with status {proc.returncode}; see {gw / 'haproxy.log'}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", cluster.gateway_port)) == 0:
                return proc
        time.sleep(0.1)
    raise SystemExit(f"haproxy did not listen on {cluster.gateway_port}; see {gw / 'haproxy.log'}")


def start_replica(cluster: Cluster, r: Replica, model_store: Path, models: list[str], timeout: float,
                  load_models: str | None = None) -> float:
    """Start replica ``r`` and wait until each of ``models`` has a READY worker; seconds taken."""
    config = replica_config(cluster, r, model_store, load_models)
    os.chmod(r.home, 0o700)  # its key file, its workers' sockets (tmp/), its logs
    (r.home / "key_file.json").unlink(missing_ok=True)
    # TorchServe writes its new keys at once, long before READY: hand the gateway the new inference
    # key then, so that a restarted replica is back UP as soon as it answers /ping.
    done = threading.Event()
    publisher = threading.Thread(target=_publish_key_when_written, args=(cluster, r, done, timeout), daemon=True)
    publisher.start()
    try:
        took = start_server(models[0], timeout, root=r.home, config=config, model_store=model_store,
                            management=r.url("management"), env=r.env)
        for other in models[1:]:
            took += wait_ready(other, timeout, r.home, r.url("management"))
    finally:
        done.set()
        publisher.join()
    publish_key(cluster, r)  # again, in case the thread gave up early
    return took


def _publish_key_when_written(cluster: Cluster, r: Replica, done: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        try:
            publish_key(cluster, r)
            return
        except (OSError, ValueError, KeyError):  # not written yet, or half written
            done.wait(0.1)


def publish_key(cluster: Cluster, r: Replica) -> None:
    """Hand the gateway replica ``r``'s current inference key: into the key map HAProxy reads at
    start, and, when the gateway runs, into the running HAProxy through its admin socket."""
    key = replica_key(r)
    if not cluster.key_map.exists():
        return  # the gateway has not been started yet: start_gateway writes the map
    lines = dict(line.split(" ", 1) for line in cluster.key_map.read_text().splitlines() if " " in line)
    lines[r.name] = key
    write_private(cluster.key_map, "".join(f"{name} {k}\n" for name, k in lines.items()))
    try:
        answer = admin(cluster, f"set map {cluster.key_map} {r.name} {key}")
    except OSError:
        return  # no gateway running: it reads the map when it starts
    if answer.strip():
        raise RuntimeError(f"HAProxy refused the new key of {r.name}: {answer.strip()}")


def start(cluster: Cluster, models: list[str], keys_file: Path, *, model_store: Path = ROOT / "model_store",
          load_models: str | None = None, timeout: float = 300) -> float:
    """Every replica (one after the other: each start is CPU-bound), then the gateway."""
    t0 = time.monotonic()
    stop(cluster)
    cluster.home.mkdir(parents=True, exist_ok=True)
    for r in cluster.members:
        start_replica(cluster, r, model_store, models, timeout, load_models)
    (cluster.home / "prometheus.yml").write_text(prometheus_config(cluster))
    start_gateway(cluster, keys_file)
    return time.monotonic() - t0


def kill_replica(r: Replica) -> list[int]:
    """SIGKILL a whole instance, frontend and workers, as a crash would; returns the pids killed."""
    import psutil

    victims = processes(r.env)
    if not victims:
        raise RuntimeError(f"{r.name} is not running (no TorchServe pid file in {r.env['TMPDIR']})")
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def stop(cluster: Cluster) -> None:
    try:
        pid = int(_pid_file(cluster).read_text())
        os.killpg(pid, signal.SIGTERM)  # its own session: master and workers
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    _pid_file(cluster).unlink(missing_ok=True)
    # HAProxy leaves its Unix sockets behind: without this, the temp dir gains a few per start.
    shutil.rmtree(cluster.socket_dir, ignore_errors=True)
    cluster.stats_socket.unlink(missing_ok=True)
    for i in range(64):
        r = cluster.replica(i)
        if not r.home.exists():
            break
        stop_server(r.home, env=r.env)


def wait_status(cluster: Cluster, name: str, prefix: str, timeout: float = 60) -> float:
    """Poll HAProxy until replica ``name``'s status starts with ``prefix`` (UP, DOWN); returns
    time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway_stats(cluster)[name]["status"].startswith(prefix):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"{name} not {prefix} after {timeout} s: {gateway_stats(cluster)[name]}")


def admin(cluster: Cluster, command: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(cluster.stats_socket))
        s.sendall(command.encode() + b"\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    return raw.decode()


def gateway_stats(cluster: Cluster) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` for the backend's servers: {replica name: {status, scur, stot, ...}}."""
    lines = admin(cluster, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows
            if row["pxname"] == "torchserve" and row["svname"] not in ("FRONTEND", "BACKEND")}


def main(argv: list[str] | None = None) -> None:
    from model_store.serve import EXAMPLES, served_models

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--api-keys", type=Path, default=CLUSTER / "api_keys", help="one key per line (0600)")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    cluster = Cluster(replicas=args.replicas)
    if args.action == "stop":
        stop(cluster)
        return
    if args.action == "status":
        for name, row in gateway_stats(cluster).items():
            print(f"{name}: {row['status']}  in flight {row['scur']}  served {row['stot']}")
        return
    if args.replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    models = served_models()
    if not models:
        raise SystemExit("model_store holds no archive of a bundled model: run `make serve REPLICAS=N`")
    took = start(cluster, models, args.api_keys, timeout=args.timeout)
    key = api_keys(args.api_keys)[0]
    lines = [f"{args.replicas} replicas behind HAProxy: {', '.join(models)} READY after {took:.1f} s.", ""]
    for model in models:
        example = os.path.relpath(ROOT / "examples" / EXAMPLES[model])
        lines.append(f"  curl -H 'Authorization: Bearer {key}' -T {example} {cluster.gateway}/predictions/{model}")
    lines += ["", f"API keys: {os.path.relpath(args.api_keys)} (one per line; restart to reload).",
              f"Replicas: python -m model_store.cluster status   Metrics: make monitor REPLICAS={args.replicas}",
              "Stop: make stop"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
