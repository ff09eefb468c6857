"""Build a TorchServe archive (.mar) from a checkpoint, its optional thresholds and the handler.

    python model_store/build_archive.py --checkpoint CKPT [--thresholds FILE] [--name NAME]

The checkpoint is packed byte for byte (thresholds name its sha256), in this project's format or
an official RAIVNLab/MRL one. Without thresholds the archive still serves, at fixed 2048 dims.
Settings for dynamic batching and the graph mode go into the archive's model-config.yaml.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from calibration import int8
from handler import oip, quantize
from handler.capture import CaptureConfig
from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.gallery import read_meta
from handler.numerics import OPENVINO_SET, RUNTIMES, threshold_numerics
from handler.service import EXACT_MAX_ITEMS
from handler.thresholds import load_thresholds, numerics_sets

ROOT = Path(__file__).resolve().parent.parent
# maxBatchDelay: how long the first request of a batch waits for company. Requests that queue while
# a batch runs join the next one without waiting, so under load batches fill either way; a lone
# request pays the whole delay. `python -m bench.server_tuning --variants delay5,delay1` (AMD EPYC
# Zen 5, int8, docs/results/server_tuning_demo_delay_zen5.json, medians of two ABBA rounds): 1 ms against 5 ms
# took one client from 9.8 to 5.0 ms and c=4 from 311 to 390 img/s on the demo model, and cost 8 % at
# c=16 (811 against 883 img/s). A server mostly runs below saturation, so 1 ms. 0 is no option:
# TorchServe 0.12 reads 0 in an archive as unset and waits 100 ms. Under config.properties' greedy
# batching (model_store/java/mrl/oip/GreedyBatching.java) no request waits it at all; 1 ms is what a
# TorchServe without our agent waits.
BATCH_DELAY_MS = 1
MODEL_CONFIG = """\
# Written by model_store/build_archive.py. TorchServe reads the top block; the handler block is ours.
minWorkers: {workers}
maxWorkers: {workers}
batchSize: {batch_size}        # dynamic batching: up to this many requests per forward pass
maxBatchDelay: {batch_delay}     # ms a partial batch waits for company under TorchServe's batching; none under greedy (config.properties)
responseTimeout: {timeout}    # s before TorchServe answers 500 and restarts a stuck worker
{queue}handler:
  graph: {graph}           # eager | jit (traced + frozen) | compile (inductor + freezing)
  threads: {threads}            # intra-op threads per worker; 0 = the cores it may use / workers (OpenVINO: all)
  channels_last: {channels_last}   # NHWC activations (oneDNN's fast layout on CPU)
  jpeg_draft: {jpeg_draft}      # let libjpeg decode at a reduced scale before resizing
  onednn_fusion: {onednn_fusion}   # jit on CPU: oneDNN Graph fuses conv/add/relu partitions
  graph_cache: {graph_cache}     # jit: a restarted worker loads the frozen graph instead of tracing
  numerics: {numerics}          # card | fp32 | bf16 | int8 | auto (the fastest this CPU runs that has a thresholds set)
  runtime: {runtime}          # what runs int8: torch | openvino | auto (OpenVINO where its set passed parity and ran faster)
"""
GALLERY_CONFIG = """\
  gallery_dir: {gallery_dir}   # neighbors requests search this gallery (retrieval/build_index.py)
  exact_max_items: {exact_max_items}   # funnel=exact (a full scan) is refused above this gallery size
"""
CAPTURE_CONFIG = """\
  capture_dir: {capture_dir}   # traffic capture for recalibration (handler/capture.py)
  capture_max_mb: {capture_max_mb}   # this model's capture files, all workers together
  capture_file_mb: {capture_file_mb}   # a file rotates past this size
"""


def build(args: argparse.Namespace) -> Path:
    if args.batch_delay < 1:  # TorchServe 0.12 takes 0 for "unset" and waits 100 ms (ModelManager)
        raise ValueError(f"--batch-delay must be at least 1 ms, got {args.batch_delay}: "
                         "TorchServe reads 0 as unset and waits 100 ms")
    if args.runtime != "torch" and args.numerics not in ("int8", "auto"):
        raise ValueError(f"--runtime {args.runtime} chooses what runs int8: add --numerics int8 or auto")
    if args.exact_max_items < 0:
        raise ValueError(f"--exact-max-items must be at least 0, got {args.exact_max_items}")
    if args.queue_size is not None and args.queue_size < 1:
        raise ValueError(f"--queue-size must be at least 1, got {args.queue_size}")
    ckpt = Path(args.checkpoint).resolve()
    model, card = load_mrl_resnet50(ckpt)  # fail here, not at serve time, if it does not load
    if args.capture_dir:
        CaptureConfig.from_settings({"capture_dir": args.capture_dir, "capture_max_mb": args.capture_max_mb,
                                     "capture_file_mb": args.capture_file_mb})  # fail here, not in the worker
    if args.gallery_dir:
        read_meta(args.gallery_dir, checkpoint_sha256=file_sha256(ckpt))  # refuse a mismatch now, not in the worker
    if args.thresholds:
        load_thresholds(args.thresholds, nesting=card.nesting, checkpoint_sha256=file_sha256(ckpt),
                        numerics=threshold_numerics(card.numerics))  # what a worker here checks
        modes = sorted(numerics_sets(json.loads(Path(args.thresholds).read_text())))
        if card.numerics not in modes:
            print(f"warning: {args.thresholds} holds thresholds fit in {' and '.join(modes)} (what this CPU "
                  f"serves the card's {card.numerics} in); a worker on a CPU that serves {card.numerics} will "
                  f"refuse it: add a {card.numerics} set (fit_thresholds.py --numerics {card.numerics} --add)",
                  file=sys.stderr)
    else:
        print(f"warning: no thresholds given; {args.name} will answer every request at "
              f"{card.nesting[-1]} dims (operating_point fixed_2048)", file=sys.stderr)
    program = int8_program(args, ckpt)
    if program is not None and args.int8_package:
        program = int8.compile_package(program, quantize.package_batches(args.batch_size))
    ir = openvino_program(args, ckpt) if program is not None else None
    out = Path(args.export_path).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "checkpoint.pt").symlink_to(ckpt)
        settings = {**vars(args), "channels_last": str(args.channels_last).lower(),
                    "jpeg_draft": str(args.jpeg_draft).lower(), "onednn_fusion": str(args.onednn_fusion).lower(),
                    "graph_cache": str(args.graph_cache).lower(),
                    "queue": "" if args.queue_size is None else
                    f"jobQueueSize: {args.queue_size}    # requests waiting beyond this get 503 at once\n"}
        config = MODEL_CONFIG.format(**settings)
        if args.gallery_dir:
            config += GALLERY_CONFIG.format(gallery_dir=json.dumps(str(Path(args.gallery_dir).resolve())),
                                            exact_max_items=args.exact_max_items)
        if args.capture_dir:
            config += CAPTURE_CONFIG.format(**{**settings, "capture_dir": json.dumps(str(Path(args.capture_dir).resolve()))})
        (stage / "model-config.yaml").write_text(config)
        # Everything beside the checkpoint and the entry point travels in one folder, whose
        # contents the archiver copies to the archive's root as they are: handler/ stays a package
        # there (a folder given on its own would be copied flat), so a worker imports the code of
        # its archive, not whatever a checkout or an install next to it holds. handler/ imports
        # nothing above it (make lint), so it is all the code a worker needs, gallery search included.
        payload = stage / "payload"
        payload.mkdir()
        shutil.copytree(ROOT / "handler", payload / "handler", ignore=_not_code)
        (payload / "oip_metadata.json").write_text(json.dumps(oip.model_metadata(gallery=bool(args.gallery_dir)), indent=1))
        if args.thresholds:
            shutil.copy(args.thresholds, payload / "thresholds.json")
        if program is not None:  # the quantized backbone, and the meta the worker checks it against
            shutil.copy(program.path, payload / "int8.pt2")
            shutil.copy(program.path.with_suffix(".json"), payload / "int8.json")
            if program.package is not None:  # compiled for this kind of CPU: workers load, not compile
                meta = program.package.with_suffix(".json")
                shutil.copy(meta, payload / "int8_aoti.json")
                batches = json.loads(meta.read_text())["batches"]
                for src, dst in zip(quantize.package_files(program.package, batches).values(),
                                    quantize.package_files(payload / "int8_aoti.pt2", batches).values()):
                    shutil.copy(src, dst)
        if ir is not None:  # OpenVINO's int8 program, for runtime openvino or auto
            for suffix in (".xml", ".bin", ".json"):
                shutil.copy(ir.path.with_suffix(suffix), (payload / "openvino").with_suffix(suffix))
        cmd = [str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", args.name, "--version", args.version,
               "--serialized-file", str(stage / "checkpoint.pt"),
               "--handler", str(ROOT / "handler" / "ts_handler.py"),
               "--extra-files", str(payload), "--config-file", str(stage / "model-config.yaml"),
               "--export-path", str(out), "--force"]
        subprocess.run(cmd, check=True, cwd=stage)
    mar = out / f"{args.name}.mar"
    print(f"built {mar} ({mar.stat().st_size / 2**20:.1f} MiB): {card.name}, {len(card.classes)} classes, "
          f"card {card.numerics}, numerics={args.numerics}{' (int8 backbone included' + (', compiled' if program.package else '') + ')' if program else ''}, "
          f"runtime={args.runtime}{' (OpenVINO program included)' if ir else ''}, "
          f"graph={args.graph}, batch {args.batch_size} / {args.batch_delay} ms")
    return mar


def _not_code(_folder: str, names: list[str]) -> list[str]:
    """What an archive's handler package leaves out: caches, and the entry point, which the
    archiver puts at the archive's root itself (--handler)."""
    return [n for n in names if n == "__pycache__" or n == "ts_handler.py" or n.endswith(".pyc")]


def int8_program(args: argparse.Namespace, ckpt: Path):
    """The quantized backbone the archive carries for --numerics int8 or auto: the one the
    thresholds' int8 set was fit on (rebuilt from its record if not cached here), else one
    calibrated on --int8-data; None when the archive serves float numerics only."""
    if args.numerics not in ("int8", "auto"):
        return None
    try:
        program = int8.for_thresholds(ckpt, args.thresholds) if args.thresholds else None
    except ValueError as exc:
        if args.numerics == "int8":
            raise SystemExit(str(exc)) from exc
        print(f"warning: {exc}; auto leaves int8 out of this archive", file=sys.stderr)
        return None
    if program is not None or args.numerics == "auto":
        return program  # auto without an int8 set chooses among the float modes
    if args.thresholds:
        raise SystemExit(f"--numerics int8: {args.thresholds} has no int8 set; fit one with "
                         "calibration/fit_thresholds.py --numerics int8 --add")
    if not args.int8_data:
        raise SystemExit("--numerics int8 without thresholds needs --int8-data (calibration images)")
    return int8.build(ckpt, args.int8_data)


def openvino_program(args: argparse.Namespace, ckpt: Path):
    """OpenVINO's int8 program for --runtime openvino or auto: the one the thresholds'
    openvino-int8 set was fit on (without thresholds, one calibrated on --int8-data). openvino
    refuses to build without it; auto leaves it out, saying why."""
    if args.runtime == "torch":
        return None
    from calibration import openvino_int8

    try:
        if not args.thresholds and args.int8_data:  # no thresholds: calibrated as the int8 program was
            return openvino_int8.build_openvino(ckpt, args.int8_data)
        ir = openvino_int8.for_thresholds(ckpt, args.thresholds) if args.thresholds else None
        if ir is None:
            raise ValueError(f"no {OPENVINO_SET} thresholds set (calibration/fit_thresholds.py --numerics "
                             f"{OPENVINO_SET} --add)")
    except ValueError as exc:
        if args.runtime == "openvino":
            raise SystemExit(f"--runtime openvino: {exc}") from exc
        print(f"warning: {exc}; runtime auto leaves OpenVINO out of this archive", file=sys.stderr)
        return None
    return ir


def archive(checkpoint: str | Path, export_path: str | Path, **options) -> Path:
    """``build`` with the command line's options as keywords (``thresholds=..., batch_size=8,
    channels_last=False``; None leaves an option at its default): one way to build an archive for
    the benchmarks and the tests."""
    argv = ["--checkpoint", str(checkpoint), "--export-path", str(export_path)]
    negated = {"channels_last", "jpeg_draft", "onednn_fusion", "graph_cache", "int8_package"}  # flags that only turn a default off
    for key, value in options.items():
        if value is None or (key in negated and value):
            continue
        if key in negated:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return build(parse_args(argv))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--thresholds", default=None, help="thresholds JSON from calibration/fit_thresholds.py")
    p.add_argument("--name", default="mrl_resnet50")
    p.add_argument("--version", default="1.0")
    p.add_argument("--export-path", default=str(ROOT / "model_store"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-delay", type=int, default=BATCH_DELAY_MS,
                   help="maxBatchDelay in ms, at least 1: what a lone request waits under TorchServe's own "
                        "batching; config.properties' greedy batching never waits it")
    p.add_argument("--timeout", type=int, default=30, help="responseTimeout in s")
    p.add_argument("--numerics", default="card", choices=("card", "fp32", "bf16", "int8", "auto"),
                   help="what the workers serve: the card's, a mode, or auto (the fastest mode this CPU runs "
                        "natively that has a thresholds set; int8 only if that set passed parity)")
    p.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="what runs int8: torch (our PT2E program), openvino (needs the openvino-int8 thresholds set "
                        "and the peers extra), auto (OpenVINO where its set passed parity and ran faster here)")
    p.add_argument("--int8-data", default=None, help="int8 without an int8 thresholds set: calibration images")
    p.add_argument("--no-int8-package", dest="int8_package", action="store_false",
                   help="int8: leave out the ahead-of-time compiled backbone (workers then torch.compile it "
                        "at every start); the package is compiled for this kind of CPU")
    p.add_argument("--workers", type=int, default=2,
                   help="workers for this model, sharing the cores (default 2: measured against 1 in "
                        "docs/reliability.md, a killed worker then costs its in-flight batch, not 8 s)")
    p.add_argument("--queue-size", type=int, default=None,
                   help="jobQueueSize: requests that may wait for this model before TorchServe answers "
                        "503 at once; size it to the wait you accept times the model's throughput "
                        "(default: config.properties' job_queue_size)")
    p.add_argument("--graph", choices=("eager", "jit", "compile"), default="jit")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="NCHW activations (the benchmark's baseline)")
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                   help="full-size JPEG decode before resizing (the benchmark's baseline)")
    p.add_argument("--no-onednn-fusion", dest="onednn_fusion", action="store_false",
                   help="traced graph without oneDNN Graph fusion")
    p.add_argument("--no-graph-cache", dest="graph_cache", action="store_false",
                   help="every worker traces its own graph (default: restarts load the first one's)")
    p.add_argument("--gallery-dir", default=None,
                   help="serve neighbors requests from this gallery (retrieval/build_index.py), built "
                        "from the same checkpoint; the archive names the folder, it does not copy it")
    p.add_argument("--exact-max-items", type=int, default=EXACT_MAX_ITEMS,
                   help="with a gallery: the largest gallery on which funnel=exact (a full scan at 2048 dims) "
                        f"is served; above it such requests get 400 (default {EXACT_MAX_ITEMS})")
    p.add_argument("--capture-dir", default=None,
                   help="turn traffic capture on, into this folder (per-size max softmax and argmax "
                        "per request, for fit_thresholds.py --unlabeled --data capture:DIR)")
    p.add_argument("--capture-max-mb", type=float, default=256)
    p.add_argument("--capture-file-mb", type=float, default=16)
    return p.parse_args(argv)


if __name__ == "__main__":
    build(parse_args())
