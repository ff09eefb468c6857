"""Classify a folder of images through a running server, with a progress bar and a summary.

    python -m client.classify DIR|FILE... [--model NAME] [--concurrency 4] [--out answers.jsonl|.csv] [--json]
    python -m imagedata.glyphs export han1000:test /tmp/han-test --limit 2000   # a folder to try

DIR holds image files, directly or one subfolder per class (files may also be named one by one).
``--out`` writes one row per file (path, expected, status, label, confidence, embedding_dim,
sizes_tried, error), as JSON lines or, for a .csv name, CSV. A subfolder named by a class label
(``永``, ``Sneaker``) or a class index (``7``) is the expected answer, and the summary then reports
top-1; otherwise it reports what the server answered. The summary gives, per embedding size, the
share of answers it gave, mean dims, errors by status and latency percentiles: the same figures
the server's ``mrl_cascade_exits_total`` counters hold for these requests.

The inference key comes from ``--token`` or from ``key_file.json`` (``--key-file``, default: the
one ``make serve`` wrote). Keys expire after 60 minutes: ``make token`` prints a fresh one.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from client.http import Client, Result

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def image_files(root: Path) -> list[tuple[Path, str | None]]:
    """(file, expected answer or None) for every image under ``root``, sorted; a file is itself."""
    if root.is_file():
        return [(root, None)]
    if not root.is_dir():
        raise SystemExit(f"{root} is neither a folder nor a file")
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            expected = path.parent.name if path.parent != root else None
            out.append((path, expected))
    if not out:
        raise SystemExit(f"no image files ({', '.join(sorted(SUFFIXES))}) under {root}")
    return out


def summarize(results: list[Result], expected: list[str | None]) -> dict:
    """Share per size, mean dims, top-1 (where the folder names the answer), errors, latency."""
    ok = [(r, e) for r, e in zip(results, expected) if r.status == 200]
    by_dim: dict[str, int] = {}
    for r, _ in ok:
        key = str(r.body["embedding_dim"])
        by_dim[key] = by_dim.get(key, 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    labelled = [(r, e) for r, e in ok if e is not None]
    hits = sum(e in (r.body["label"], str(r.body["class_index"])) for r, e in labelled)
    ms = sorted(1000 * r.seconds for r in results)
    return {
        "requests": len(results), "answered": len(ok), "errors_by_status": errors,
        "exits": dict(sorted(by_dim.items(), key=lambda kv: int(kv[0]))),
        "share": {k: v / len(ok) for k, v in sorted(by_dim.items(), key=lambda kv: int(kv[0]))} if ok else {},
        "mean_dims": sum(r.body["embedding_dim"] for r, _ in ok) / len(ok) if ok else None,
        "top1": hits / len(labelled) if labelled else None, "labelled": len(labelled),
        "latency_ms": {"p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}
        if ms else {},
    }


def write_rows(path: Path, files: list[tuple[Path, str | None]], results: list[Result]) -> None:
    """One row per file: JSON lines, or CSV when ``path`` ends in .csv."""
    import csv

    rows = []
    for (f, expected), r in zip(files, results):
        ok = r.status == 200
        rows.append({"path": str(f), "expected": expected, "status": r.status,
                     "label": r.body["label"] if ok else None, "confidence": r.body["confidence"] if ok else None,
                     "embedding_dim": r.body["embedding_dim"] if ok else None,
                     "sizes_tried": r.body["sizes_tried"] if ok else None,
                     "error": None if ok else (r.body or {}).get("message", (r.body or {}).get("error"))})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**row, "sizes_tried": " ".join(map(str, row["sizes_tried"] or []))} for row in rows)
        else:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def classify(client: Client, files: list[tuple[Path, str | None]], *, concurrency: int = 4,
             headers: dict | None = None, progress: bool = True) -> list[Result]:
    """POST every file (bounded: each once), ``concurrency`` at a time; results in file order."""
    bar = tqdm(total=len(files), unit="img", desc="classifying", disable=not progress, file=sys.stderr)
    lock = threading.Lock()

    def one(item: tuple[Path, str | None]) -> Result:
        path, _ = item
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            r = client.predict(path.read_bytes(), {"Content-Type": kind, **(headers or {})})
        except OSError as exc:
            r = Result(0, {"error": type(exc).__name__}, client.timeout)
        with lock:
            bar.update(1)
        return r

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, files))
    bar.close()
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", type=Path, nargs="+", metavar="DIR_OR_FILE")
    p.add_argument("--model", default="mrl_resnet50")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--token", default=None, help="inference key (default: from --key-file)")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("-H", "--header", action="append", default=[], metavar="NAME: VALUE",
                   help="extra header, e.g. 'X-MRL-Operating-Point: fast'")
    p.add_argument("--out", type=Path, default=None, help="per-file answers: .jsonl (default) or .csv")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency must be >= 1, got {args.concurrency}")
    token = args.token
    if token is None and args.key_file.exists():
        token = json.loads(args.key_file.read_text())["inference"]["key"]
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise SystemExit(f"--header needs 'Name: value', got {h!r}")
        headers[name.strip()] = value.strip()
    files = [f for path in args.paths for f in image_files(path)]
    results = classify(Client(args.url, token, args.model), files, concurrency=args.concurrency, headers=headers)
    summary = summarize(results, [e for _, e in files])
    if args.out:
        write_rows(args.out, files, results)
    if any(r.status == 400 and "InvalidKey" in json.dumps(r.body) for r in results):
        print("the server refused the inference key (expired after 60 minutes?): run `make token`",
              file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['answered']} of {summary['requests']} answered"
              + (f", top-1 {summary['top1']:.4f} on {summary['labelled']} labelled" if summary["top1"] is not None else "")
              + (f", mean dims {summary['mean_dims']:.1f}" if summary["mean_dims"] is not None else ""))
        for dim, share in summary["share"].items():
            print(f"  {dim:>5} dims: {share:7.2%}  ({summary['exits'][dim]})")
        if summary["errors_by_status"]:
            print(f"  errors by status: {summary['errors_by_status']}")
        if summary["latency_ms"]:
            print(f"  latency p50 {summary['latency_ms']['p50']:.1f} ms, p99 {summary['latency_ms']['p99']:.1f} ms")
    return summary


if __name__ == "__main__":
    main()
