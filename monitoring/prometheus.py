"""Start or stop a local Prometheus that scrapes TorchServe and evaluates monitoring/alerts.yml.

    python -m monitoring.prometheus start   # background; returns once /-/ready answers
    python -m monitoring.prometheus stop

Uses the `prometheus` binary on PATH (Debian package `prometheus`). Data, the pid file and the log
go to monitoring/prometheus-data/ (git-ignored). Tests call start()/stop() with their own port,
config and data directory.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

MONITORING = Path(__file__).resolve().parent
CONFIG = MONITORING / "prometheus.yml"
DATA_DIR = MONITORING / "prometheus-data"
PORT = 9090
PID_FILE = "prometheus.pid"
LOG_FILE = "prometheus.log"


def is_ready(port: int = PORT) -> bool:
    """True when a Prometheus on 127.0.0.1:``port`` answers /-/ready with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start(config_path: str | Path = CONFIG, data_dir: str | Path = DATA_DIR, port: int = PORT,
          timeout: float = 30.0, binary: str | None = None) -> subprocess.Popen:
    """Start Prometheus in the background and block until it is ready; returns its process.

    Writes the pid to ``data_dir/prometheus.pid`` (for :func:`stop`) and its output to
    ``data_dir/prometheus.log``. Raises RuntimeError if something already answers on ``port`` or
    Prometheus exits early, TimeoutError (after stopping it) if it is not ready within ``timeout``.
    """
    binary = binary or shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("no `prometheus` binary on PATH; install it, e.g. apt-get install prometheus")
    config_path, data_dir = Path(config_path).resolve(), Path(data_dir).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"Prometheus config {config_path} does not exist")
    # Checked first: our process would fail to bind, and a readiness poll would find the other one.
    if is_ready(port):
        raise RuntimeError(f"a Prometheus already answers on 127.0.0.1:{port}; stop it or pass another port")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / LOG_FILE
    with open(log_path, "ab") as log:
        # A new session, so Ctrl-C in the shell that ran `make monitor` does not stop it.
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (data_dir / PID_FILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (data_dir / PID_FILE).unlink(missing_ok=True)
            raise RuntimeError(f"prometheus exited with status {proc.returncode}; see {log_path}")
        if is_ready(port):
            return proc
        time.sleep(0.2)
    stop(data_dir)
    raise TimeoutError(f"prometheus was not ready on port {port} after {timeout:.0f} s; see {log_path}")


def _is_running_prometheus(pid: int) -> bool:
    """Alive (not a zombie) and still a prometheus: a stale pid file may name a reused pid."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child (tests), so it cannot linger as a zombie
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"prometheus" in cmdline.split(b"\0")[0]


def stop(data_dir: str | Path = DATA_DIR, timeout: float = 10.0) -> bool:
    """Stop the Prometheus whose pid :func:`start` wrote in ``data_dir``; False if none was running.

    Sends SIGTERM (Prometheus flushes its head block), then SIGKILL after ``timeout`` seconds.
    """
    pid_file = Path(data_dir) / PID_FILE
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        if not _is_running_prometheus(pid):
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_running_prometheus(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.1)
        return True
    except ProcessLookupError:
        return True
    finally:
        pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.action == "stop":
        print("Prometheus stopped." if stop(args.data_dir) else "No Prometheus of ours was running.")
        return
    proc = start(args.config, args.data_dir, args.port, args.timeout)
    url = f"http://127.0.0.1:{args.port}"
    print(f"Prometheus is up at {url} (pid {proc.pid}), scraping the targets of {os.path.relpath(args.config)}.\n"
          f"Targets: {url}/targets   Alerts: {url}/alerts   Log: {args.data_dir / LOG_FILE}\n"
          f"Dashboard for Grafana: monitoring/grafana/ (see the comments in its provisioning files).\n"
          f"Stop: python -m monitoring.prometheus stop")


if __name__ == "__main__":
    main()
