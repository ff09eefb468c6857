"""Publish a trained run: fp16 checkpoint with its model card, test accuracy measured and recorded.

    python training/export.py --run runs/demo/final.pt --out model_store/fashion_mnist

Writes OUT/mrl_resnet50_fp16.pt (weights in half precision, card inside) and OUT/model_card.json
(the same card, for people). Per-size top-1 on the training data set's :test and :holdout splits
(fashion-mnist or han1000, from the card) is measured on the fp16 weights with the serving
numerics and recorded in the card.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from calibration.outputs import collect
from handler.checkpoint import load_mrl_resnet50, save_checkpoint

CHECKPOINT_NAME = "mrl_resnet50_fp16.pt"


def export(run: Path, out: Path, graph: str = "jit", numerics: str = "fp32") -> Path:
    model, card = load_mrl_resnet50(run, numerics=numerics)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / CHECKPOINT_NAME
        save_checkpoint(draft, model, card, dtype=torch.float16)  # the weights that will serve
        metrics = {}
        family = str(card.training.get("data", "fashion-mnist:train")).split(":", 1)[0]
        for split in ("test", "holdout"):
            res = collect(draft, f"{family}:{split}", graph=graph, cache_dir=None)
            metrics[f"{split}_top1"] = res.top1()
            metrics[f"{split}_n"] = int(len(res.labels))
        metrics["measured_with"] = {"weights": "fp16", "numerics": card.numerics, "graph": graph}
    card.metrics = metrics
    dest = out / CHECKPOINT_NAME
    save_checkpoint(dest, model.half().float(), card, dtype=torch.float16)
    (out / "model_card.json").write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB) and model_card.json")
    print("test top-1: " + "  ".join(f"{m}:{a:.4f}" for m, a in metrics["test_top1"].items()))
    return dest


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="final.pt written by training/train_mrl.py")
    p.add_argument("--out", required=True)
    p.add_argument("--graph", default="jit", choices=("eager", "jit", "compile"))
    p.add_argument("--numerics", default="fp32", choices=("fp32", "bf16"),
                   help="serving numerics recorded in the card (docs/benchmarks.md compares them)")
    a = p.parse_args()
    export(Path(a.run), Path(a.out), a.graph, a.numerics)
