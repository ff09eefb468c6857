"""The serving pipeline without TorchServe: request items in, (status, JSON body) per item out.

    parse (per item)  ->  decode + crop (per batch, on threads: preprocess.BatchDecoder)
    ->  normalize + backbone + heads (per batch)
    ->  cascade (per batch, per-item thresholds)  ->  responses and metrics

A bad item fails alone with its own 4xx; the others in the batch are answered normally.
``handler/ts_handler.py`` is the thin TorchServe adapter around this class.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.capture import CaptureConfig, TrafficCapture
from handler.cascade import CascadeResult, fixed_dim_row, run_cascade, threshold_rows, top_classes
from handler.checkpoint import ModelCard, file_sha256, load_mrl_resnet50
from handler.engine import Engine
from handler.errors import InputError
from handler.metrics import MetricsSink, NullSink
from handler.numerics import OPENVINO_SET, bf16_supported, choose_numerics, choose_runtime, resolve_numerics
from handler.oip import V2Request, parse_v2, v2_body, v2_error, v2_response
from handler.preprocess import MAX_PIXELS, RELEASE_BYTES, BatchDecoder, Normalizer, decode_image, release_freed_memory
from handler.quantize import open_openvino, open_program
from handler.requests import Options, parse_item
from handler.thresholds import OperatingPoints, numerics_sets, parse_thresholds

log = logging.getLogger(__name__)
FIXED_DIM = "fixed_dim"  # operating_point reported (and used as metric label) for dim= requests
# funnel=exact scans every gallery item at 2048 dims (about 1.5 s a query at 100,000 items on 2
# cores): any client could ask for it, so above this many items a server must enable it.
EXACT_MAX_ITEMS = 10_000


class MRLService:
    """Loads a model, its card and its operating points; answers batches of requests."""

    def __init__(self, model, card: ModelCard, points: OperatingPoints, *, name: str = "mrl_resnet50",
                 device: str = "cpu", graph: str = "eager", batch_sizes: Sequence[int] = (1,),
                 sink: MetricsSink | None = None, max_pixels: int = MAX_PIXELS,
                 channels_last: bool = True, jpeg_draft: bool = True, onednn_fusion: bool = True,
                 capture: CaptureConfig | None = None, checkpoint_sha256: str | None = None,
                 gallery=None, graph_cache: str | Path | None = None, numerics: str | None = None,
                 int8_program=None, exact_max_items: int = EXACT_MAX_ITEMS,
                 openvino_threads: int | None = None, decode_threads: int = 1) -> None:
        """``decode_threads``: how many of a batch's small images are decoded at once (``BatchDecoder``)."""
        if not isinstance(exact_max_items, int) or exact_max_items < 0:
            raise ValueError(f"exact_max_items must be an integer >= 0, got {exact_max_items!r}")
        self.exact_max_items = exact_max_items
        self.card, self.points, self.name = card, points, name
        self.nesting = card.nesting
        self.sink = sink or NullSink()
        self.max_pixels, self.jpeg_draft = max_pixels, jpeg_draft
        self.decoder = BatchDecoder(card.preprocessing, draft=jpeg_draft, threads=decode_threads)
        numerics = numerics or resolve_numerics(card.numerics, device)
        self.numerics = numerics
        if numerics == "fp32" and card.numerics == "bf16" and not bf16_supported(torch.device(device)):
            # Measured on the demo model (docs/parity.json): bf16 and fp32 agree on 99.96 % of 2048-d
            # answers, and bf16-fit thresholds on fp32 outputs move the cascade's top-1 by 0.03 pt.
            log.warning("the card asks for %s but %s has no bf16 support: serving %s with the "
                        "thresholds fit in %s", card.numerics, device, numerics,
                        points.meta.get("numerics", "(none)"))
        self.engine = Engine(model, numerics=numerics, device=device, graph=graph,
                             input_size=card.preprocessing.crop, batch_sizes=batch_sizes,
                             channels_last=channels_last, onednn_fusion=onednn_fusion,
                             graph_cache=graph_cache, cache_key=checkpoint_sha256 or "", int8_program=int8_program,
                             openvino_threads=openvino_threads, preprocessing=card.preprocessing)
        self.normalize = Normalizer(card.preprocessing, device)
        # One threshold row per operating point and per fixed dim, built once, indexed per request.
        rows = {name: list(t) for name, t in points.points.items()}
        rows.update({m: fixed_dim_row(self.nesting, m) for m in self.nesting})
        self._rows = {k: threshold_rows(r, 1)[0] for k, r in rows.items()}
        self.gallery = gallery  # handler.gallery.Gallery: neighbors requests search it
        self.checkpoint_sha256 = checkpoint_sha256  # a rebuilt gallery must come from it too
        self._gallery_refused: tuple | None = None  # the rebuilt meta.json that failed to open
        self.capture = None
        if capture is not None:
            self.capture = TrafficCapture(capture, model=name, header={
                "checkpoint_sha256": checkpoint_sha256, "numerics": numerics,
                **({"int8_program_fingerprint": int8_program.fingerprint} if int8_program is not None else {}),
                "nesting": list(self.nesting), "graph": self.engine.graph})
            log.info("traffic capture on: %s (at most %.0f MiB)", capture.folder, capture.max_bytes / 2**20)
        if not points.fitted:
            log.warning("no fitted thresholds: every request is answered at %d dims "
                        "(operating_point=%s)", self.nesting[-1], points.default)
        # Gauges that do not change while this service lives: set once, at start (a worker flushes
        # what its start emitted), not with every batch. Each line costs the frontend a parse on
        # the cores the model needs (docs/benchmarks.md, "Server tuning").
        self.sink.emit("mrl_numerics_info", 1, (self.name, self.numerics))
        for point, ratio in self.points.alert_disagreement.items():  # the alert's line, beside its ratio
            self.sink.emit("mrl_disagreement_alert_ratio", ratio, (self.name, point))

    @classmethod
    def from_dir(cls, model_dir: str | Path, gallery_dir: str | Path | None = None, graph_cache: bool = True,
                 numerics: str = "card", runtime: str = "torch", **kwargs) -> MRLService:
        """Load ``checkpoint.pt`` and, if present, ``thresholds.json`` from a model folder, and the
        gallery in ``gallery_dir`` (refused if it was built from another checkpoint).

        ``graph_cache``: the first worker keeps its frozen graph in the model folder, so that a
        worker restarted after a crash loads it instead of tracing again (docs/reliability.md).

        ``numerics``: 'card', a mode, or 'auto' (``handler.numerics.choose_numerics``); int8 runs the
        quantized backbone ``int8.pt2`` of the folder (handler/quantize.py) and needs a thresholds
        set fit on exactly that program. ``runtime``: what runs int8 (``choose_runtime``): 'torch',
        'openvino' (the folder's ``openvino.xml``, with the thresholds set fit on its outputs) or
        'auto' (OpenVINO where its set passed parity and records it faster on this CPU class)."""
        model_dir = Path(model_dir)
        ckpt = model_dir / "checkpoint.pt"
        model, card = load_mrl_resnet50(ckpt)
        sha = file_sha256(ckpt)
        thresholds = model_dir / "thresholds.json"
        doc = json.loads(thresholds.read_text()) if thresholds.exists() else None
        sets = numerics_sets(doc) if doc else None
        program_file, ir_file = model_dir / "int8.pt2", model_dir / "openvino.xml"
        device = kwargs.get("device", "cpu")
        mode, why = choose_numerics(numerics, card.numerics, sets, program_file.exists(), device)
        log.info("numerics %s, requested %s: %s", mode, numerics, why)
        program, accepted = None, (mode,) if mode == "int8" else tuple(dict.fromkeys((card.numerics, mode)))
        if mode == "int8":
            engine, why = choose_runtime(runtime, mode, sets, ir_file.exists())
            log.info("int8 runtime %s, requested %s: %s", engine, runtime, why)
            if engine == "openvino":
                program, accepted = open_openvino(ir_file), (OPENVINO_SET,)
            else:
                program = open_program(program_file, model_dir / "int8_aoti.pt2")
        elif runtime == "openvino":
            raise ValueError(f"runtime 'openvino' runs int8 only, and this worker serves {mode} ({why})")
        if doc is not None:
            # A set fit in the mode (and runtime) that serves; a bf16 card served in fp32 on a CPU
            # without bf16 may also use a one-set file fit in bf16 (the files from before sets per mode).
            points = parse_thresholds(doc, nesting=card.nesting, checkpoint_sha256=sha, numerics=accepted)
            fit_on = points.meta.get("int8_program", {}).get("fingerprint")
            if program is not None and fit_on != program.fingerprint:
                what = "OpenVINO program" if accepted == (OPENVINO_SET,) else "quantized backbone"
                raise ValueError(f"the {accepted[0]} thresholds were fit on {what} {fit_on} but "
                                 f"{program.path.name} is {program.fingerprint}; refit with --numerics {accepted[0]}")
        else:
            points = OperatingPoints.fixed(card.nesting)
        gallery = None
        if gallery_dir:
            from handler.gallery import Gallery  # FAISS only where a gallery is served
            gallery = Gallery.open(gallery_dir, checkpoint_sha256=sha, hnsw=False)
            log.info("gallery %s: %d items from %s", gallery_dir, len(gallery), gallery.meta.get("spec"))
        return cls(model, card, points, checkpoint_sha256=sha, gallery=gallery,
                   graph_cache=model_dir / "graph_cache" if graph_cache else None, numerics=mode,
                   int8_program=program, **kwargs)

    def handle(self, items: Sequence[Mapping[str, Any]],
               headers: Sequence[Mapping[str, Any]] | None = None) -> list[tuple[int, dict]]:
        """Answer a batch: one (HTTP status, JSON-able body) per item, in order.

        ``headers`` are the items' HTTP headers (for ``X-MRL-*`` options and the Content-Type);
        they may hold credentials, so nothing here logs them.
        """
        if self.gallery is not None:  # between batches: a batch sees one gallery, old or new, whole
            self._refresh_gallery()
        self.sink.emit("mrl_batches_total", 1, (self.name,))
        self.sink.emit("mrl_batch_items_total", len(items), (self.name,))
        out: list[tuple[int, dict] | None] = [None] * len(items)
        crops, opts, index = [], [], []
        v2: dict[int, V2Request] = {}  # items that came as Open Inference Protocol requests

        kw = dict(nesting=self.nesting, operating_points=tuple(self.points.points),
                  default_point=self.points.default, num_classes=len(self.card.classes),
                  gallery_size=len(self.gallery) if self.gallery is not None else None)
        t0 = time.perf_counter()
        opened: list[tuple[int, Any, Options]] = []  # (item, its image with only the header read, options)
        for i, item in enumerate(items):
            try:
                body = v2_body(item)  # parsed once: raw JSON bytes arrive from clients without a Content-Type
                if body is not None:
                    v2[i] = V2Request(None, None)  # until parsed: errors still answer in v2 form
                    data, opt, v2[i] = parse_v2(body, **kw)
                else:
                    data, opt = parse_item(item, **kw, headers=headers[i] if headers else None,
                                           model_name=self.name)
                self._check_search(opt)
                opened.append((i, decode_image(data, max_pixels=self.max_pixels), opt))
            except InputError as exc:
                out[i] = self._error(exc, v2=i in v2)
            except Exception:  # a fault of ours while reading this item: it alone gets a 500
                log.exception("reading item %d of a batch of %d failed", i, len(items))
                out[i] = self._internal_error("reading the request", v2=i in v2)
        largest = 0  # bytes of the largest decoded image (after a JPEG draft)
        for (i, _, opt), (crop, size, exc) in zip(opened, self.decoder([img for _, img, _ in opened])):
            largest = max(largest, size)
            if isinstance(exc, InputError):
                out[i] = self._error(exc, v2=i in v2)
            elif exc is not None:
                log.error("decoding item %d of a batch of %d failed", i, len(items), exc_info=exc)
                out[i] = self._internal_error("reading the request", v2=i in v2)
            else:
                crops.append(crop)
                opts.append(opt)
                index.append(i)
        opened.clear()  # nothing decoded is left: the decoder closed each image
        if largest > RELEASE_BYTES:  # one-off buffers back to the OS, not kept by SERVER_ENV's malloc
            release_freed_memory()
        t1 = time.perf_counter()
        self.sink.emit("mrl_stage_seconds", t1 - t0, (self.name, "decode"))

        if crops:
            try:
                probs, emb = self.engine(self.engine.model_input(crops, self.normalize))
                t2 = time.perf_counter()
                answers, result = self._answer(probs, emb, opts)
                t3 = time.perf_counter()
                self.sink.emit("mrl_stage_seconds", t2 - t1, (self.name, "forward"))
                self.sink.emit("mrl_stage_seconds", t3 - t2, (self.name, "cascade"))
                failed = self._neighbors(emb, opts, answers) if self.gallery is not None else set()
                for j, (i, answer) in enumerate(zip(index, answers)):
                    if j in failed:  # its search failed: this request alone gets a 500
                        out[i] = self._internal_error("the neighbors search", v2=i in v2)
                    else:
                        out[i] = (200, v2_response(answer, v2[i], self.name) if i in v2 else answer)
                if self.capture is not None:  # answered: a copy into a queue, a writer thread does the rest
                    self.capture.record(result.size_conf, result.size_label)
            except Exception:  # the batch's fault, not a request's: 500 for these items only
                log.exception("inference failed for a batch of %d", len(crops))
                for i in index:
                    out[i] = self._internal_error("inference", v2=i in v2)
        if self.capture is not None:  # the writer's outcomes since the last batch, as counters
            for outcome, n in self.capture.take_counts().items():
                self.sink.emit("mrl_capture_records_total", n, (self.name, outcome))
        return out  # type: ignore[return-value]

    def _refresh_gallery(self) -> None:
        """Serve a gallery rebuilt in place (retrieval/gallery.py builds a new version and switches atomically) from
        this batch on. One that cannot be opened (another checkpoint, parts that disagree) is
        logged once and the one being served is kept."""
        old = self.gallery
        if not old.changed():  # a stat of meta.json: a few microseconds a batch
            return
        stamp = old.disk_stamp()
        if stamp == self._gallery_refused:
            return
        try:
            new = type(old).open(old.folder, checkpoint_sha256=self.checkpoint_sha256, hnsw=old.hnsw is not None)
        except Exception:
            self._gallery_refused = stamp
            log.exception("gallery %s was rebuilt but cannot be served; still serving version %s",
                          old.folder, old.meta.get("version"))
            return
        self.gallery = new
        log.info("gallery %s rebuilt: now version %s, %d items from %s (was %s, %d items)", new.folder,
                 new.meta.get("version"), len(new), new.meta.get("spec"), old.meta.get("version"), len(old))

    def _check_search(self, opt: Options) -> None:
        """Refuse a full scan of a gallery larger than the server allows (EXACT_MAX_ITEMS)."""
        if opt.neighbors is not None and opt.funnel == "exact" and len(self.gallery) > self.exact_max_items:
            raise InputError(f"funnel=exact scans all {len(self.gallery)} gallery items; this server allows "
                             f"it up to {self.exact_max_items} (handler setting exact_max_items); use "
                             "funnel=rerank, the default", reason="bad_option")

    def _neighbors(self, emb: torch.Tensor, opts: list[Options], answers: list[dict]) -> set[int]:
        """Answer neighbors requests from the gallery: one search per funnel and k in the batch, so
        that each answer's neighbours, stages and MFLOPs are those of its own request. Returns the
        positions whose search failed (each one answered 500 alone)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for j, o in enumerate(opts):
            if o.neighbors is not None:
                groups.setdefault((o.funnel, o.neighbors), []).append(j)
        failed: set[int] = set()
        for (funnel, k), rows in groups.items():
            try:
                self._search(emb, rows, funnel, k, answers)
            except Exception:
                log.exception("a neighbors search (funnel %s, k %d) for %d queries failed", funnel, k, len(rows))
                if len(rows) == 1:
                    failed.add(rows[0])
                    continue
                for j in rows:  # find the query at fault: the others are answered
                    try:
                        self._search(emb, [j], funnel, k, answers)
                    except Exception:
                        log.exception("the neighbors search of item %d failed alone", j)
                        failed.add(j)
        return failed

    def _search(self, emb: torch.Tensor, rows: list[int], funnel: str, k: int, answers: list[dict]) -> None:
        """One search for the queries ``rows``, all asking for k neighbours in one funnel."""
        from handler.search import search  # only reached with a gallery (parse_options checks)

        t0 = time.perf_counter()
        r = search(self.gallery, emb[rows].float().cpu().numpy(), k, funnel)
        classes, ids, labels = self.card.classes, self.gallery.ids, self.gallery.labels
        found = [[{"id": int(ids[g]), "label": classes[int(labels[g])], "score": float(sc)}
                  for g, sc in zip(r.index[i], r.score[i])] for i in range(len(rows))]
        self.sink.emit("mrl_retrieval_seconds", time.perf_counter() - t0, (self.name, funnel))
        self.sink.emit("mrl_retrieval_queries_total", len(rows), (self.name, funnel))
        for stage in r.stages:
            self.sink.emit("mrl_retrieval_candidates_total", stage["candidates"] * len(rows),
                           (self.name, funnel, str(stage["dim"])))
        for j, neighbors in zip(rows, found):
            answers[j]["neighbors"] = neighbors
            answers[j]["retrieval"] = {"funnel": funnel, "stages": r.stages, "mflops": r.flops / 1e6}

    def _error(self, exc: InputError, v2: bool = False) -> tuple[int, dict]:
        self.sink.emit("mrl_request_errors_total", 1, (self.name, exc.reason))
        return exc.status, v2_error(exc) if v2 else exc.to_json()

    def _internal_error(self, what: str, v2: bool = False) -> tuple[int, dict]:
        self.sink.emit("mrl_request_errors_total", 1, (self.name, "internal"))
        message = f"{what} failed; the error is in the server log"
        return 500, {"error": message} if v2 else {"code": 500, "type": "InternalServerError", "message": message}

    def _answer(self, probs: torch.Tensor, emb: torch.Tensor,
                opts: list[Options]) -> tuple[list[dict], CascadeResult]:
        thresholds = np.stack([self._rows[o.dim if o.dim is not None else o.operating_point] for o in opts])
        result = run_cascade(probs.float().cpu().numpy(), thresholds, self.nesting)
        top_i, top_p = top_classes(result.probs, max(o.top_k for o in opts))
        classes = self.card.classes
        answers, exits, escalations, disagree = [], Counter(), Counter(), Counter()
        full_label = result.size_label[:, -1]  # the 2048-d head's answer, computed anyway
        for j, (o, tried) in enumerate(zip(opts, result.sizes_tried(self.nesting))):
            dim, point = int(result.exit_dim[j]), (FIXED_DIM if o.dim is not None else o.operating_point)
            answer = {
                "label": classes[int(result.label[j])],
                "class_index": int(result.label[j]),
                "confidence": float(result.confidence[j]),
                "embedding_dim": dim,
                "sizes_tried": tried,
                "operating_point": point,
                "top_k": [{"label": classes[c], "probability": p}
                          for c, p in zip(top_i[j, : o.top_k].tolist(), top_p[j, : o.top_k].tolist())],
            }
            if o.return_embedding:
                answer["embedding"] = emb[j, :dim].tolist()
            answers.append(answer)
            exits[(str(dim), point)] += 1
            disagree[point] += int(result.label[j] != full_label[j])
            escalations.update(str(m) for m in tried[:-1])
            self.sink.emit("mrl_exit_confidence", answer["confidence"], (self.name,))
        # Counters are emitted once per label set per batch, not once per request.
        for (dim, point), n in exits.items():
            self.sink.emit("mrl_cascade_exits_total", n, (self.name, dim, point))
        for point, n in disagree.items():  # zeros too: the ratio's numerator exists from the start
            self.sink.emit("mrl_cascade_disagreements_total", n, (self.name, point))
        self.sink.emit("mrl_embedding_dims_total", int(result.exit_dim.sum()), (self.name,))
        for m, n in escalations.items():
            self.sink.emit("mrl_cascade_escalations_total", n, (self.name, m))
        return answers, result
