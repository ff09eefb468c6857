"""Start or stop TorchServe with this repository's config.properties, and wait until it answers.

    python -m model_store.serve start   # start, wait for READY, print a ready-to-paste curl
    python -m model_store.serve stop
    python -m model_store.serve token   # a fresh inference key (make token): keys expire after 60 min
    python -m model_store.serve swap --model NAME --archive NAME-v2.mar   # hot swap (model API on)

Run from the repository root: TorchServe writes logs/ and key_file.json (the tokens) there.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from model_store import oip_agent

ROOT = Path(__file__).resolve().parent.parent
TORCHSERVE = str(Path(sys.executable).with_name("torchserve"))  # the one installed beside this Python
MANAGEMENT = "http://127.0.0.1:8081"
# The frontend's logging: TorchServe's files, without its DEBUG lines and a line per metric line and
# per request (monitoring/log4j2.xml says what differs and why).
LOG_CONFIG = ROOT / "monitoring" / "log4j2.xml"
# The environment the frontend passes to its workers, where the caller's environment does not say:
# - glibc malloc keeps freed activations mapped instead of returning them to the OS between batches
#   (repeated page faults otherwise cost up to 2x at larger batches; docs/benchmarks.md);
# - libgomp's idle compute threads spin 10,000 rounds, not its default 300,000, before they sleep:
#   between batches that spinning held a core the frontend and the clients needed. `python -m
#   bench.server_tuning --model han1000 --variants gomp_spin300k,gomp_spin10k,omp_passive` (AMD EPYC
#   Zen 5, int8, docs/results/server_tuning_han1000_omp.json, two ABBA rounds, where the default was still
#   called config): c=16 793 against 742 img/s, one client 5.7 against 6.5 ms, the worker at 1.35
#   against 1.60 cores; never spinning (OMP_WAIT_POLICY=PASSIVE) was slower than both (666 img/s, 8.3 ms).
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "GOMP_SPINCOUNT": "10000"}
INFERENCE = "http://127.0.0.1:8080"
# The bundled models and the example each printed curl sends. config.properties loads their archives
# by name (load_models); `make serve` builds both from the checkpoints git carries (han1000's only
# where its file is there: docs/models.md). han1000's example escalates (8 to 1024 dims, 半), the
# README's second answer; tests/unit/test_examples.py keeps it so.
EXAMPLES = {"mrl_resnet50": "ankle_boot.png", "han1000": "han1000/hard_1.png"}


def served_models(model_store: Path = ROOT / "model_store") -> list[str]:
    """The bundled models whose archive is in ``model_store``: what `make serve` will serve."""
    return [m for m in EXAMPLES if (model_store / f"{m}.mar").exists()]


GREEDY = "-Dmrl.batching=greedy"  # config.properties' vmargs: the agent's greedy batching
INLINE_SEND = "-Dmrl.send=inline"  # and its batches written by the thread that took them


def _vmargs(config: Path) -> str:
    """The ``vmargs`` line of a TorchServe config ('' without one)."""
    found = re.search(r"^vmargs=(.*)$", config.read_text(), flags=re.M)
    return found.group(1) if found else ""


def batching(config: Path = ROOT / "config.properties") -> str:
    """How the frontend of ``config`` forms batches: 'greedy' (its agent started with
    -Dmrl.batching=greedy: a worker never waits maxBatchDelay) or 'torchserve' (TorchServe's own)."""
    return "greedy" if GREEDY in _vmargs(config).split() else "torchserve"


def config_vmargs(agent: Path = oip_agent.JAR, drop: tuple[str, ...] = ()) -> str:
    """config.properties' vmargs for a frontend started elsewhere: the agent's jar (``agent``) by
    its absolute path, less the options in ``drop`` (e.g. ``GREEDY``, for TorchServe's batching)."""
    vmargs = _vmargs(ROOT / "config.properties").replace(f"-javaagent:{oip_agent.JAR.relative_to(ROOT)}",
                                                         f"-javaagent:{Path(agent).resolve()}")
    return " ".join(a for a in vmargs.split() if a not in drop)


def write_config(dest: Path, model_store: Path, ports: dict[str, int] | None = None, extra: str = "",
                 overrides: dict[str, str] | None = None, agent: Path = oip_agent.JAR) -> Path:
    """A copy of config.properties for a server started elsewhere: absolute paths, other ports,
    ``overrides`` replacing (or adding) settings, ``agent`` the OIP agent's jar (a copy of it, for
    a server that reads nothing of this checkout)."""
    text = (ROOT / "config.properties").read_text()
    settings = {f"{name}_address": f"http://127.0.0.1:{port}" for name, port in (ports or {}).items()}
    settings |= {"model_store": str(model_store), "metrics_config": str(ROOT / "monitoring" / "ts_metrics.yaml")}
    if re.search(r"^vmargs=", text, flags=re.M):  # the agent's jar by its absolute path: this server starts elsewhere
        settings["vmargs"] = config_vmargs(agent)
    for key, value in (settings | (overrides or {})).items():
        text, n = re.subn(rf"^{key}=.*$", lambda _: f"{key}={value}", text, flags=re.M)
        if not n:
            text += f"\n{key}={value}\n"
    dest.write_text(text + extra)
    return dest


def read_keys(root: Path = ROOT) -> dict[str, str]:
    """The tokens TorchServe wrote into key_file.json: {'inference': ..., 'management': ...}."""
    doc = json.loads((root / "key_file.json").read_text())
    return {k: doc[k]["key"] for k in ("inference", "management")}


def renew_key(kind: str = "inference", root: Path = ROOT, management: str = MANAGEMENT) -> str:
    """Ask TorchServe's token API for a new ``kind`` key (the old one stops working) and return it.

    TorchServe's keys expire (``token_expiration_min``, 60 minutes by default); after that every
    call with the old key answers 400 InvalidKeyException. The API key in key_file.json does not
    expire, and ``/token?type=...`` on the management port trades it for a new key, which
    TorchServe also writes back into key_file.json.
    """
    if kind not in ("inference", "management"):
        raise ValueError(f"kind must be 'inference' or 'management', got {kind!r}")
    path = root / "key_file.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: is TorchServe running from {root}? (make serve)")
    api_key = json.loads(path.read_text())["API"]["key"]
    req = urllib.request.Request(f"{management}/token?type={kind}", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
    return read_keys(root)[kind]


def describe(model: str, token: str | None, management: str = MANAGEMENT) -> dict:
    """The management API's description of ``model`` (workers with status and pid); ``token``
    None for a server with token authorization off (deploy/kserve's container)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{management}/models/{model}", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)[0]


def wait_ready(model: str, timeout: float, cwd: Path = ROOT, management: str = MANAGEMENT,
               token: bool = True) -> float:
    """Block until ``model`` has a READY worker; returns the seconds waited. ``token`` False: the
    server runs with token authorization off."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            workers = describe(model, read_keys(cwd)["management"] if token else None, management)["workers"]
            if any(w["status"] == "READY" for w in workers):
                return time.monotonic() - t0
        except (OSError, KeyError, ValueError, IndexError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"{model} was not READY after {timeout:.0f} s; see {cwd}/logs/model_log.log")


def start(model: str, timeout: float, root: Path = ROOT, config: Path | None = None,
          model_store: Path | None = None, management: str = MANAGEMENT, env: dict[str, str] | None = None,
          token: bool = True, log_config: Path | None = LOG_CONFIG, torchserve: str = TORCHSERVE) -> float:
    """Start TorchServe in the background (working directory ``root``: logs/ and key_file.json
    go there; ``env`` for the server and its workers, default ours) and block until ``model`` has a
    READY worker. Returns seconds from ``torchserve --start`` to READY. ``env`` None: this
    process's environment over ``SERVER_ENV``. ``log_config`` None: the log4j2 configuration inside
    TorchServe's jar. ``torchserve``: the launcher of another environment (its workers then run
    that environment's Python)."""
    t0 = time.monotonic()
    env = {**SERVER_ENV, **os.environ} if env is None else env
    oip_agent.build()  # config.properties starts the frontend with it (quick when it is current)
    (root / "key_file.json").unlink(missing_ok=True)  # a stale file would hold old tokens
    (root / "logs").mkdir(exist_ok=True)
    # The daemon inherits these handles: a file, so that no caller's pipe is held open by Java.
    with open(root / "logs" / "torchserve-start.log", "ab") as out:
        subprocess.run([torchserve, "--start", "--ncs", "--ts-config", str(config or ROOT / "config.properties"),
                        "--model-store", str(model_store or ROOT / "model_store"),
                        *(["--log-config", str(log_config)] if log_config else [])], cwd=root, env=env,
                       check=True, stdout=out, stderr=out)
    wait_ready(model, timeout, root, management, token)
    return time.monotonic() - t0


def processes(env: dict[str, str] | None = None) -> list:
    """The running TorchServe whose pid file lies in ``env``'s TMPDIR (TorchServe keeps one per
    temp dir): its frontend, then its workers, as psutil processes; [] when none runs."""
    import psutil

    tmp = Path((env or os.environ).get("TMPDIR") or tempfile.gettempdir())
    try:
        frontend = psutil.Process(int((tmp / ".model_server.pid").read_text().split()[0]))
        return [frontend] + frontend.children(recursive=True)
    except (OSError, ValueError, psutil.Error):
        return []


def stop(root: Path = ROOT, env: dict[str, str] | None = None) -> None:
    """Stop the TorchServe of ``env``'s TMPDIR and wait until its frontend and workers have exited."""
    import psutil

    procs = processes(env)
    subprocess.run([TORCHSERVE, "--stop"], cwd=root, env=env, check=False, stdout=subprocess.DEVNULL)
    psutil.wait_procs(procs, timeout=10)  # workers exit a few seconds after the frontend


def _management(method: str, path: str, token: str | None, management: str, timeout: float = 600) -> dict:
    req = urllib.request.Request(f"{management}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def swap(model: str, archive: str, root: Path = ROOT, management: str = MANAGEMENT, timeout: float = 600,
         grace_s: float = 3.0) -> str:
    """Hot swap: register ``archive`` (a file in the model store, built with the same model name
    and a new --version) beside the running version, wait until its worker is READY, make it the
    default, let the old versions drain, and unregister them. Requests keep being answered
    throughout: by the old version until the default moves, by the new one after. Needs TorchServe's model API, which
    config.properties turns off (enable_model_api=false); without it, rebuild and restart (or
    roll a cluster replica by replica). Returns the new default version."""
    token = read_keys(root)["management"]
    running = _management("GET", f"/models/{model}/all", token, management)
    old = [m["modelVersion"] for m in running]
    workers = max(1, max(len(m.get("workers", [])) for m in running))  # the new version gets as many
    try:
        _management("POST", f"/models?url={archive}&initial_workers={workers}&synchronous=true", token,
                    management, timeout)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        if exc.code == 405 or ("api" in body.lower() and "disabled" in body.lower()):
            raise SystemExit(f"TorchServe refused to register {archive}: the model API is off "
                             f"(enable_model_api=false). Rebuild the archive and restart, or roll the "
                             f"replicas; or serve with enable_model_api=true on a trusted management "
                             f"network. TorchServe said: {body.strip()}") from None
        raise SystemExit(f"TorchServe refused to register {archive} ({exc.code}): {body.strip()}") from None
    versions = [m["modelVersion"] for m in _management("GET", f"/models/{model}/all", token, management)]
    added = [v for v in versions if v not in old]
    if not added:
        raise SystemExit(f"{archive} added no new version of {model} (versions: {versions}); build it with "
                         f"--name {model} and a new --version. If it carried another model's name, that "
                         "model is now registered too: unregister it with DELETE /models/<name>")
    new = added[0]
    _management("PUT", f"/models/{model}/{new}/set-default", token, management)
    for v in old:
        if not _drain(model, v, token, management, grace_s, timeout):
            raise SystemExit(f"{model} {v} still had queued requests after {timeout:.0f} s; version {new} "
                             f"is the default now, {v} is left registered: unregister it with "
                             f"DELETE /models/{model}/{v} once its queue is empty")
        _management("DELETE", f"/models/{model}/{v}", token, management)
    return new


def _drain(model: str, version: str, token: str | None, management: str, grace_s: float, timeout: float) -> bool:
    """Wait until no request waits in ``version``'s queue, then ``grace_s`` (at least the longest
    batch) for the batch in its worker; False if the queue was not empty by ``timeout``. TorchServe
    drops a version's queued and in-flight requests unanswered when the version is unregistered
    (the clients hang until their own timeout): measured, tests/integration/test_swap.py."""
    deadline = time.monotonic() + timeout
    while True:
        status = _management("GET", f"/models/{model}/{version}", token, management)[0].get("jobQueueStatus", {})
        if not status.get("pendingRequests", 0):
            time.sleep(grace_s)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("start", "stop", "token", "swap"))
    p.add_argument("--model", action="append", default=None,
                   help="wait for this model to be READY (repeatable; default: the bundled models "
                        "whose archive is in model_store)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--archive", help="swap: the new version's .mar, in the model store")
    args = p.parse_args(argv)
    if args.action == "swap":
        if not (args.model and len(args.model) == 1 and args.archive):
            p.error("swap needs one --model and --archive")
        print(f"{args.model[0]}: version {swap(args.model[0], args.archive)} is now the default")
        return
    if args.action == "stop":
        stop()
        return
    if args.action == "token":
        print(renew_key("inference"))
        return
    models = args.model or served_models()
    if not models:
        raise SystemExit("model_store holds no archive of a bundled model: run `make serve` (it builds them)")
    t0 = time.monotonic()
    start(models[0], args.timeout)
    for other in models[1:]:
        wait_ready(other, args.timeout)
    took = time.monotonic() - t0
    token = read_keys()["inference"]
    lines = [f"TorchServe is up: {', '.join(models)} READY after {took:.1f} s. Classify an image with:", ""]
    for model in models:
        example = os.path.relpath(ROOT / "examples" / EXAMPLES.get(model, "ankle_boot.png"))
        lines.append(f"  curl -H 'Authorization: Bearer {token}' -T {example} {INFERENCE}/predictions/{model}")
    lines += ["", "Options go in X-MRL-* headers or JSON fields, e.g. -H 'X-MRL-Top-K: 3' -H 'X-MRL-Dim: 64'.",
              "The key expires after 60 minutes: `make token` prints a fresh one.",
              f"Metrics: curl {MANAGEMENT.replace('8081', '8082')}/metrics   Stop: make stop"]
    print("\n".join(lines), file=sys.stdout)


if __name__ == "__main__":
    main()
