"""Train an MRL ResNet50 on a data spec, on the CPU (channels_last; bf16 autocast or fp32).

    python training/train_mrl.py --out runs/demo            # the Fashion-MNIST demo recipe (docs/models.md)
    python training/train_mrl.py --out runs/demo --resume   # continue after an interruption
    python training/train_mrl.py --init runs/a/final.pt --out runs/b ...   # warm start: more epochs
    python training/train_mrl.py --data han1000:train --out runs/han ...   # model_store/han1000/

A run with the same arguments, seed and thread count on the same machine gives the same weights
bit for bit, whether it runs straight through or is stopped (``--stop-after N``, or killed) and
continued with ``--resume``: the state saved each epoch holds the model, optimizer, scheduler and
the data-order RNG.

The loss is the MRL loss: sum over nesting sizes m of c_m * CE(logits_m, y), with optional label
smoothing. Inputs go through the server's own preprocessing (``handler.preprocess``) once, up
front; augmentation (random crop with zero padding, horizontal flip where the data set allows it)
then runs on the batch. Classes, normalisation and augmentation come from the data set
(``imagedata.specs.dataset_info``). Each epoch logs per-size top-1 on the spec's holdout split;
a resumable state is saved after every epoch.
At the end the model is written in this project's checkpoint format with its model card.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handler.checkpoint import ModelCard, file_sha256, read_checkpoint, save_checkpoint
from handler.model import DEFAULT_NESTING, MRLResNet50
from handler.preprocess import Normalizer, Preprocessing, crop_image
from imagedata.specs import ArrayImages, DatasetInfo, dataset_info, load_spec

# Defaults: the demo recipe, 145 minutes on 2 cores here (docs/models.md has the epochs/accuracy trade).
# 32x32 trains at about 200 img/s here; 64x64 at 70 and 40x40 at 116 (bf16, batch 128).
DEFAULTS = dict(
    input_size=32,        # 28x28 upsampled to 32: the ImageNet stem leaves an 8x8 map for layer1
    epochs=25,
    batch_size=128,
    lr=0.2,               # one-cycle peak, SGD + Nesterov momentum 0.9
    weight_decay=5e-4,    # on conv/linear weights only, not on BN or biases
    label_smoothing=0.1,
    seed=0,
    precision="bf16",     # autocast dtype for the forward pass; "fp32" turns autocast off
)


class MRLLoss(torch.nn.Module):
    """sum_m c_m * CrossEntropy(logits[:, m], y), over the nesting sizes."""

    def __init__(self, weights: list[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weights = weights
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits (B, S, C), target (B,)
        b, s, c = logits.shape
        per_size = F.cross_entropy(logits.float().reshape(b * s, c), target.repeat_interleave(s),
                                   label_smoothing=self.label_smoothing, reduction="none")
        per_size = per_size.view(b, s).mean(0)  # (S,)
        w = torch.ones(s) if self.weights is None else torch.as_tensor(self.weights, dtype=torch.float32)
        if w.shape != (s,):
            raise ValueError(f"need one loss weight per size ({s}), got {len(w)}")
        return (per_size * w.to(per_size.device)).sum()


def dataset_preprocessing(info: DatasetInfo, input_size: int) -> Preprocessing:
    """Grayscale replicated to 3 channels, resized to ``input_size``, the data set's mean/std."""
    return Preprocessing(color_mode="L", resize=input_size, crop=input_size,
                         mean=(info.mean,) * 3, std=(info.std,) * 3)


def demo_preprocessing(input_size: int) -> Preprocessing:
    """The Fashion-MNIST demo's preprocessing."""
    return dataset_preprocessing(dataset_info("fashion-mnist:train"), input_size)


def prepare(data: ArrayImages, spec: Preprocessing) -> torch.Tensor:
    """All images through the server's preprocessing, as one uint8 (N, H, W) tensor."""
    return torch.from_numpy(np.stack([crop_image(data[i][0], spec) for i in range(len(data))]))


def augment(batch: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and (if ``flip``) random horizontal flip, on uint8 (B, H, W).

    One gather for the whole batch: row and column indices per image, flipped columns reversed.
    With ``pad=0`` and ``flip=False`` the batch is returned as it is, drawing nothing.
    """
    if pad == 0 and not flip:
        return batch
    b, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    cols = torch.arange(w).expand(b, w)
    if flip:
        flipped = torch.rand(b, generator=gen) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(-1), cols)
    cols = cols + dx[:, None]
    rows = torch.arange(h)[None, :] + dy[:, None]
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@torch.no_grad()
def per_size_top1(model: MRLResNet50, images: torch.Tensor, labels: torch.Tensor,
                  norm: Normalizer, batch_size: int = 500, bf16: bool = True) -> list[float]:
    model.eval()
    correct = torch.zeros(len(model.nesting))
    for i in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(norm(images[i: i + batch_size].numpy()))
        correct += (logits.argmax(-1) == labels[i: i + batch_size, None]).sum(0)
    return (correct / len(images)).tolist()


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)


def recorded_command(argv: list[str]) -> str:
    """The command that retrains this run: argv without the flags that only slice it in time."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stop-after":
            skip = True
        elif a != "--resume" and not a.startswith("--stop-after="):
            kept.append(a)
    return " ".join(["python", "training/train_mrl.py", *map(shlex.quote, kept)])


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = dataset_info(args.data)
    pad = info.pad if args.pad is None else args.pad
    spec = dataset_preprocessing(info, args.input_size)
    norm = Normalizer(spec)

    init, init_state = None, None
    if args.init:  # checked before the data loads: a wrong checkpoint fails at once
        init_card, state = read_checkpoint(args.init)
        if (list(init_card.classes) != list(info.classes) or tuple(init_card.nesting) != DEFAULT_NESTING
                or init_card.head != args.head or init_card.blurpool):
            raise ValueError(f"--init {args.init}: its classes/nesting/head ({len(init_card.classes)} classes, "
                             f"{init_card.nesting}, {init_card.head}{', BlurPool' if init_card.blurpool else ''}) "
                             f"differ from this run's ({len(info.classes)} classes of {args.data}, "
                             f"{DEFAULT_NESTING}, {args.head})")
        init_state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        init = {"checkpoint": str(args.init), "sha256": file_sha256(args.init), "training": init_card.training}

    t0 = time.time()
    holdout_spec = args.holdout or args.data.rsplit(":", 1)[0] + ":holdout"
    train_set = load_spec(args.data, info.classes, limit=args.limit or None)
    holdout = load_spec(holdout_spec, info.classes, limit=args.limit // 5 or None)
    if not isinstance(train_set, ArrayImages) or not isinstance(holdout, ArrayImages):
        raise ValueError(f"training needs an in-memory data set, got {args.data} / {holdout_spec}")
    x_train, y_train = prepare(train_set, spec), torch.from_numpy(train_set.labels)
    x_hold, y_hold = prepare(holdout, spec), torch.from_numpy(holdout.labels)
    print(f"data: {len(x_train)} train, {len(x_hold)} holdout at {args.input_size}x{args.input_size} "
          f"({time.time() - t0:.1f}s)", flush=True)

    model = MRLResNet50(num_classes=len(info.classes), nesting=DEFAULT_NESTING, head=args.head)
    if init_state is not None:
        model.load_state_dict(init_state)
        print(f"warm start from {args.init} (fresh optimizer and schedule)", flush=True)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, args.lr, args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged last batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch)
    loss_fn = MRLLoss(args.loss_weights, args.label_smoothing)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, history, elapsed, resumed = 0, [], 0.0, False

    state_path = out / "last.pt"
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed_s"]
        resumed = True
        print(f"resumed from {state_path} after epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10,
                   file=sys.stdout)
        running = 0.0
        for step in bar:
            idx = perm[step * args.batch_size: (step + 1) * args.batch_size]
            x = norm(augment(x_train[idx], pad, gen, flip=info.flip).numpy())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits = model(x)
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.3f}", refresh=False)
        top1 = per_size_top1(model, x_hold, y_hold, norm, bf16=args.precision == "bf16")
        elapsed += time.time() - t_epoch
        history.append({"epoch": epoch + 1, "loss": round(running, 4),
                        "holdout_top1": {str(m): round(a, 4) for m, a in zip(model.nesting, top1)}})
        print(f"epoch {epoch + 1}: loss {running:.3f}  holdout top-1 "
              + "  ".join(f"{m}:{a:.4f}" for m, a in zip(model.nesting, top1))
              + f"  ({elapsed / 60:.1f} min)", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch + 1,
                    "history": history, "elapsed_s": elapsed}, state_path)
        if args.stop_after and epoch + 1 == args.stop_after and epoch + 1 < args.epochs:
            print(f"stopped after epoch {epoch + 1} as asked; continue with --resume", flush=True)
            return state_path

    recipe = {**{k: getattr(args, k) for k in (*DEFAULTS, "head", "loss_weights", "limit")},
              "pad": pad, "flip": info.flip}
    card = ModelCard(
        name=f"mrl_resnet50_{info.name}", classes=list(info.classes), preprocessing=spec,
        nesting=model.nesting, head=args.head, blurpool=False, numerics=args.precision,
        training={"command": recorded_command(args.argv),
                  "resumed": resumed,
                  **({"init": init} if init else {}),
                  "recipe": recipe, "data": f"{args.data} ({len(x_train):,} images)",
                  "holdout": f"{holdout_spec} ({len(x_hold):,} images)",
                  "wall_time_s": round(elapsed), "machine": platform.processor() or platform.machine(),
                  "threads": args.threads, "torch": str(torch.__version__), "history": history})
    final = out / "final.pt"
    save_checkpoint(final, model.to(memory_format=torch.contiguous_format), card)
    print(f"wrote {final} ({elapsed / 60:.1f} min of training)", flush=True)
    return final


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder: last.pt (resumable) and final.pt")
    p.add_argument("--data", default="fashion-mnist:train", help="training data spec")
    p.add_argument("--holdout", default=None, help="holdout spec (default: the data spec's :holdout)")
    p.add_argument("--pad", type=int, default=None, help="random-crop padding (default: the data set's)")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v,
                       choices=("bf16", "fp32") if k == "precision" else None)
    p.add_argument("--head", choices=("mrl", "mrl_e"), default="mrl")
    p.add_argument("--loss-weights", type=lambda s: [float(v) for v in s.split(",")], default=None,
                   help="comma-separated c_m, one per size (default: all 1)")
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke runs)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (one of this project's, with the data set's "
                        "classes and the same head) with a fresh optimizer and schedule; the card records it "
                        "and its own training")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop after epoch N, leaving OUT/last.pt to --resume (training in time slices)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the card records as the command
    return args


if __name__ == "__main__":
    train(parse_args())
