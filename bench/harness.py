"""What every benchmark in bench/ shares: the report's header and its saving, the request inputs and
checkpoints, timing helpers, and a TorchServe started for a run and stopped after it.

A benchmark is a sibling module with a ``main(argv)`` that builds its report as
``{**header("bench.<name>", argv), ...}``, measures, and ends with ``save_report``. Servers come
from ``server``: one context manager for the archive, its config.properties, the environment and
the start, and the stop however the run ends. All traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from client.http import Client, run_load
from handler.checkpoint import ModelCard, imagenet_classes, load_mrl_resnet50, official_card, save_checkpoint
from handler.cpus import machine
from handler.model import mrl_resnet50
from handler.thresholds import numerics_sets
from model_store.build_archive import archive
from model_store.serve import SERVER_ENV, read_keys, start, stop, wait_ready, write_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "model_store" / "fashion_mnist"
# Bundled models: folder (checkpoint, thresholds) and the data spec their requests come from.
BUNDLED = {name: (folder, spec) for name, folder, spec in (
    ("demo", DEMO, "fashion-mnist:test"), ("han1000", ROOT / "model_store" / "han1000", "han1000:test"))
    if (folder / "mrl_resnet50_fp16.pt").exists()}  # han1000 once its checkpoint is trained (git has none)
MODES = {
    "baseline": dict(numerics="fp32", graph="eager", channels_last=False, jpeg_draft=False, server_env=False),
    "fp32": dict(numerics="fp32", graph="jit", channels_last=True, jpeg_draft=True, server_env=True),
    "bf16": dict(numerics="bf16", graph="jit", channels_last=True, jpeg_draft=True, server_env=True),
    # int8: the PT2E-quantized backbone as an AOTInductor package (handler/quantize.py), fp32 heads.
    "int8": dict(numerics="int8", graph="jit", channels_last=True, jpeg_draft=True, server_env=True),
    # openvino: the same int8 served by OpenVINO's NNCF program (calibration/openvino_int8.py; runtime openvino)
    "openvino": dict(numerics="int8", runtime="openvino", graph="jit", channels_last=True, jpeg_draft=True,
                     server_env=True),
}  # bench/run.py's modes; "auto" there serves one of these per model


# -- the report ------------------------------------------------------------------------------------

def cpu_busy(seconds: float = 3.0) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat), taken before a run starts: a
    quiet machine reads near 0; the report states it."""
    def sample():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


def header(module: str, argv: list[str] | None, *, busy: bool = False, **machine_extra) -> dict:
    """A report's first keys: the machine (``handler.cpus.machine``, then ``machine_extra``, then
    with ``busy`` the cores' load before the run), the date, and the command that wrote it
    (``argv`` None: this process's own arguments)."""
    m = {**machine(), **machine_extra}
    if busy:
        m["busy_before"] = cpu_busy()
    return {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)}


def write_report(report: dict, out: str | Path) -> None:
    """Write ``report`` as JSON to ``out`` (its folder made if need be), without a word."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def save_report(report: dict, out: str | Path, headline: dict | str | None = None) -> dict:
    """Print a benchmark's headline (a dict as JSON, a text as it is), write its whole report as
    JSON to ``out`` and say so."""
    if headline is not None:
        print(headline if isinstance(headline, str) else json.dumps(headline, indent=2))
    write_report(report, out)
    print(f"wrote {out}")
    return report


# -- timing ------------------------------------------------------------------------------------------

def times_of(fn, repeat: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn``, ``repeat`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeat: int, warmup: int = 2) -> float:
    return statistics.median(times_of(fn, repeat, warmup))


def serve_phase(tmp: Path, bodies: list[bytes], concurrency: int, duration: float, headers=None,
                model: str = "mrl_resnet50") -> dict:
    """Closed-loop load on the server of ``tmp`` (port 8080) for ``duration`` seconds: throughput
    of its answers and their p50/p99."""
    client = Client("http://127.0.0.1:8080", read_keys(tmp)["inference"], model, timeout=120)
    t0 = time.perf_counter()
    results = run_load(client, bodies, concurrency=concurrency, duration=duration, headers=headers)
    wall = time.perf_counter() - t0
    ok = [r.seconds for r in results if r.status == 200]
    bad = len(results) - len(ok)
    lat = np.array(ok) * 1000
    return {"concurrency": concurrency, "requests": len(results), "errors": bad, "img_s": len(ok) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


# -- inputs ------------------------------------------------------------------------------------------

def imagenet_inputs(count: int = 32) -> list[bytes]:
    """Smooth random 224x224 photos-like images, JPEG quality 90."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((224, 224), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def demo_inputs(count: int = 64, spec: str = "fashion-mnist:test") -> list[bytes]:
    """The first ``count`` images of a data spec, as PNG request bodies."""
    from imagedata.specs import dataset_info, load_spec
    data = load_spec(spec, dataset_info(spec).classes, limit=count)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        data[i][0].save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def make_checkpoints(tmp: Path) -> dict[str, dict[str, Path]]:
    """Per model and numerics, a checkpoint whose card carries that numerics."""
    torch.manual_seed(0)
    official = mrl_resnet50(num_classes=1000, head="mrl", blurpool=True)
    card = official_card(official.state_dict(), imagenet_classes())
    models = [("imagenet", official, card, None)]
    for name, (folder, _) in BUNDLED.items():
        m, c = load_mrl_resnet50(folder / "mrl_resnet50_fp16.pt")
        models.append((name, m, c, folder))
    paths: dict[str, dict[str, Path]] = {name: {} for name, *_ in models}
    for numerics in ("fp32", "bf16"):
        for name, model, c, folder in models:
            if folder is not None and numerics == c.numerics:
                paths[name][numerics] = folder / "mrl_resnet50_fp16.pt"  # the shipped file: thresholds match it
                continue
            c2 = ModelCard.from_dict({**c.to_dict(), "numerics": numerics})
            path = tmp / f"{name}-{numerics}.pt"
            save_checkpoint(path, model, c2, dtype=torch.float32 if folder is None else torch.float16)
            paths[name][numerics] = path
    return paths


def calibration_folder(tmp: Path, model: str, bodies: list[bytes]) -> str:
    """The benchmark's own request images as a one-class folder: calibration for a model that has
    no int8 thresholds set (the ImageNet-size one, random weights: only its speed is measured)."""
    folder = tmp / f"calib-{model}" / "0"
    folder.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(bodies):
        (folder / f"{i}.img").write_bytes(body)
    return str(folder.parent)


def int8_set_runs_here(thresholds: Path) -> bool:
    """Whether the thresholds hold an int8 set this CPU can serve (8-bit activations need VNNI)."""
    from handler import cpus

    fit = numerics_sets(json.loads(thresholds.read_text())).get("int8", {}).get("meta", {}).get("int8_program")
    return bool(fit) and (fit["reduce_range"] or cpus.cpu_has_vnni())


def int8_for(ckpt: Path, calibration: str | None, thresholds: Path | None, batch_size: int = 8):
    """The int8 program (with its package) a server of ``ckpt`` runs: the one its thresholds' int8
    set was fit on, else one calibrated on ``calibration``."""
    from calibration import int8
    from handler import quantize

    program = int8.for_thresholds(ckpt, thresholds) if thresholds is not None else None
    return int8.compile_package(program or int8.build(ckpt, calibration), quantize.package_batches(batch_size))


def openvino_for(ckpt: Path, calibration: str | None, thresholds: Path | None):
    """OpenVINO's int8 program a server of ``ckpt`` runs with runtime openvino: the one its
    thresholds' openvino-int8 set was fit on, else one calibrated on ``calibration`` (as
    build_archive.py builds it from --int8-data)."""
    from calibration import openvino_int8

    program = openvino_int8.for_thresholds(ckpt, thresholds) if thresholds is not None else None
    return program or openvino_int8.build_openvino(ckpt, calibration)


def openvino_set_runs_here(ckpt: Path, thresholds: Path) -> bool:
    """Whether the thresholds hold an openvino-int8 set whose program this machine rebuilds."""
    from calibration import openvino_int8

    try:
        return openvino_int8.for_thresholds(ckpt, thresholds) is not None
    except ValueError:
        return False


# -- the server --------------------------------------------------------------------------------------

@dataclass
class Served:
    """A TorchServe that ``server`` started: its folder (logs/, key_file.json), store, environment
    and addresses; when it was started and how long it took to be READY."""
    root: Path
    store: Path
    env: dict[str, str]
    inference: str
    management: str
    started: float  # time.perf_counter() just before `torchserve --start`
    ready_s: float  # from `torchserve --start` to the first model's READY worker

    def keys(self) -> dict[str, str]:
        return read_keys(self.root)

    def client(self, model: str = "mrl_resnet50", timeout: float = 120) -> Client:
        return Client(self.inference, self.keys()["inference"], model, timeout=timeout)


@contextmanager
def server(tmp: Path, checkpoint: Path | None = None, archives: Mapping[str, Mapping] | None = None, *,
           models: Sequence[str] | None = None, store: Path | None = None, load_models: bool = False,
           timeout: float = 300, server_env: bool = True, env: Mapping[str, str] | None = None,
           own_tmpdir: bool = False, port: int = 8080, overrides: Mapping[str, str] | None = None,
           config_name: str = "config.properties", **start_kw) -> Iterator[Served]:
    """A TorchServe working in ``tmp`` for the ``with`` block, stopped however the block ends.

    Archives: with ``checkpoint``, each entry of ``archives`` (model name -> ``archive()``
    settings; default one ``mrl_resnet50`` with build_archive.py's defaults) is built into
    ``store`` (default tmp/store); without, the store already holds them. ``models`` (default the
    names in ``archives``) must all have a READY worker before the block runs; ``load_models``
    writes them into the config's ``load_models`` line. The config is config.properties as
    committed (model_store.serve.write_config) with ``port`` for inference (management +1,
    metrics +2) and ``overrides``. The environment is this process's with SERVER_ENV
    (``server_env`` False: without it, TorchServe's and the libraries' defaults), then ``env``,
    then with ``own_tmpdir`` TMPDIR and TEMP set to ``tmp``: TorchServe keeps its pid file there,
    so a server of its own runs beside another. ``start_kw`` go to model_store.serve.start
    (``log_config``)."""
    archives = {"mrl_resnet50": {}} if archives is None else archives
    models = list(archives) if models is None else list(models)
    store = tmp / "store" if store is None else store
    if checkpoint is None and not store.is_dir():
        raise ValueError(f"no model store at {store}: give the checkpoint to archive into it")
    if checkpoint is not None:
        store.mkdir(parents=True, exist_ok=True)
        for name, settings in archives.items():
            archive(checkpoint, store, name=name, **settings)
    environ = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    if server_env:
        environ.update(SERVER_ENV)
    environ.update(env or {})
    if own_tmpdir:
        environ.update(TMPDIR=str(tmp), TEMP=str(tmp))
    ports = {"inference": port, "management": port + 1, "metrics": port + 2}
    extra = "\nload_models=" + ",".join(f"{m}.mar" for m in models) + "\n" if load_models else ""
    config = write_config(tmp / config_name, store, ports, extra=extra, overrides=dict(overrides or {}))
    management = f"http://127.0.0.1:{port + 1}"
    stop(tmp, environ)  # one left over from a run that did not end well
    try:
        started = time.perf_counter()
        ready = start(models[0], timeout, root=tmp, config=config, model_store=store, env=environ,
                      management=management, **start_kw)
        for name in models[1:]:
            wait_ready(name, timeout, tmp, management)
        yield Served(tmp, store, environ, f"http://127.0.0.1:{port}", management, started, ready)
    finally:
        stop(tmp, environ)
