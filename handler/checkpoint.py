"""Model cards and the one public loader, ``load_mrl_resnet50``.

Two checkpoint formats load:

* this project's: ``{"format": "mrl-serve/1", "card": {...}, "state_dict": {...}}``, where the
  card says everything needed to serve the weights (see ``ModelCard``);
* the official RAIVNLab/MRL ResNet50 checkpoints: a bare state dict saved from
  DistributedDataParallel (``module.`` prefix), BlurPool-wrapped strided convs, and either nine
  MRL heads ``fc.nesting_classifier_{i}``, one MRL-E head ``fc.nesting_classifier_0``, or the
  older ``fc.weight``/``fc.bias`` notation. They get an ImageNet card built from the keys.

Everything loads with ``torch.load(weights_only=True)``: a checkpoint carrying code is refused.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handler.model import DEFAULT_NESTING, EMBED_DIM, HEAD_KINDS, MRLResNet50
from handler.preprocess import Preprocessing

FORMAT = "mrl-serve/1"
NUMERICS = ("fp32", "bf16")
IMAGENET_CLASS_INDEX = Path(__file__).with_name("imagenet_class_index.json")
IMAGENET_PREPROCESSING = Preprocessing(color_mode="RGB", resize=256, crop=224,
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass
class ModelCard:
    """What a checkpoint is and how to serve it; travels inside our checkpoints and archives."""

    name: str
    classes: list[str]
    preprocessing: Preprocessing
    nesting: tuple[int, ...] = DEFAULT_NESTING
    head: str = "mrl"
    blurpool: bool = False
    numerics: str = "bf16"
    architecture: str = "resnet50"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture != "resnet50":
            raise ValueError(f"architecture must be 'resnet50', got {self.architecture!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        self.nesting = tuple(int(m) for m in self.nesting)
        if list(self.nesting) != sorted(set(self.nesting)) or self.nesting[-1] != EMBED_DIM:
            raise ValueError(f"nesting must increase strictly and end at {EMBED_DIM}, got {self.nesting}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least 2 distinct names, got {len(self.classes)} "
                             f"({len(set(self.classes))} distinct)")

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {"name", "classes", "preprocessing", "nesting", "head", "blurpool", "numerics",
                 "architecture", "training", "metrics"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model card has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        missing = {"name", "classes", "preprocessing"} - set(d)
        if missing:
            raise ValueError(f"model card lacks required fields {sorted(missing)}")
        return cls(**{**d, "preprocessing": Preprocessing.from_dict(d["preprocessing"]),
                      "classes": list(d["classes"])})

    def to_dict(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "nesting": list(self.nesting),
                "head": self.head, "blurpool": self.blurpool, "numerics": self.numerics,
                "classes": list(self.classes), "preprocessing": self.preprocessing.to_dict(),
                "training": self.training, "metrics": self.metrics}

    def build_model(self) -> MRLResNet50:
        return MRLResNet50(num_classes=len(self.classes), nesting=self.nesting, head=self.head,
                           blurpool=self.blurpool)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1K class names, in the order of the official checkpoints' heads."""
    index = json.loads(IMAGENET_CLASS_INDEX.read_text())
    pairs = [index[str(i)] for i in range(len(index))]
    names = [name for _, name in pairs]
    # Two names occur twice (crane: bird and machine; maillot): qualify those by WordNet id.
    return [f"{name} ({wnid})" if names.count(name) > 1 else name for wnid, name in pairs]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: MRLResNet50, card: ModelCard, *,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write our format. Floating tensors are stored as ``dtype`` (fp16 halves the file)."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "card": card.to_dict(), "state_dict": state}, path)


def load_mrl_resnet50(path: str | Path, *, numerics: str | None = None,
                      classes: list[str] | None = None) -> tuple[MRLResNet50, ModelCard]:
    """Load an MRL ResNet50 from our checkpoint format or an official RAIVNLab/MRL checkpoint.

    Returns the model in eval mode (fp32 weights) and its card. ``numerics`` overrides the card's;
    ``classes`` names the classes of an official checkpoint (default: ImageNet-1K).
    """
    card, state = read_checkpoint(path, numerics=numerics, classes=classes)
    model = card.build_model()
    _load_strict(model, state, path)
    return model.eval(), card


def read_checkpoint(path: str | Path, *, numerics: str | None = None,
                    classes: list[str] | None = None) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """The card and the state dict (our key names) of a checkpoint, without building the model."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"refusing to load {path}: it is not a plain-tensor checkpoint that "
                         f"loads with weights_only=True ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        card = ModelCard.from_dict(obj["card"])
        state = obj["state_dict"]
    else:
        state = obj.get("state_dict", obj.get("model", obj))
        state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
        card = official_card(state, classes if classes is not None else imagenet_classes())
        state = _rename_old_head(state)
    if numerics is not None:
        card.numerics = numerics
        card.__post_init__()
    return card, state


def official_card(state: dict[str, torch.Tensor], classes: list[str]) -> ModelCard:
    """Infer head kind, nesting and BlurPool from an official checkpoint's (unprefixed) keys."""
    heads = sorted(int(m.group(1)) for k in state
                   if (m := re.fullmatch(r"fc\.nesting_classifier_(\d+)\.weight", k)))
    if "fc.weight" in state and not heads:
        head, width = "mrl_e", state["fc.weight"]
    elif heads == [0] and state["fc.nesting_classifier_0.weight"].shape[1] == EMBED_DIM:
        head, width = "mrl_e", state["fc.nesting_classifier_0.weight"]
    elif heads:
        head = "mrl"
        width = state[f"fc.nesting_classifier_{heads[0]}.weight"]
        nesting = tuple(state[f"fc.nesting_classifier_{i}.weight"].shape[1] for i in heads)
    else:
        raise ValueError("checkpoint has no classification head: expected fc.nesting_classifier_{i}.* "
                         f"or fc.weight; fc keys found: {[k for k in state if k.startswith('fc')]}")
    if width.shape[0] != len(classes):
        raise ValueError(f"checkpoint head has {width.shape[0]} classes but {len(classes)} class "
                         "names were given")
    if head == "mrl_e":
        nesting = DEFAULT_NESTING
    blurpool = any(k.endswith(".blur_filter") for k in state)
    return ModelCard(name="mrl_resnet50_imagenet", classes=classes, nesting=nesting, head=head,
                     blurpool=blurpool, numerics="bf16", preprocessing=IMAGENET_PREPROCESSING,
                     training={"source": "official RAIVNLab/MRL checkpoint"})


def _rename_old_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "fc.weight" in state:
        state = dict(state)
        state["fc.nesting_classifier_0.weight"] = state.pop("fc.weight")
        state["fc.nesting_classifier_0.bias"] = state.pop("fc.bias")
    return state


def _load_strict(model: MRLResNet50, state: dict[str, torch.Tensor], path: str | Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit MRLResNet50(head={model.head_kind}, nesting="
                         f"{list(model.nesting)}, blurpool={model.blurpool}): "
                         f"missing keys {_brief(missing)}; unexpected keys {_brief(unexpected)}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not fit the model: {_brief(bad)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def _brief(items: list[str], n: int = 8) -> str:
    return "[]" if not items else str(items[:n])[:-1] + (f", ... {len(items) - n} more]" if len(items) > n else "]")
