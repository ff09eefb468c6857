"""Turning one TorchServe request item into (image bytes, options), or a typed InputError.

An item is the dict TorchServe builds per request: one entry per input parameter (``body`` for a
raw body, the field name for multipart fields). The image comes as
* the raw body (``curl -T img.jpg``, or ``--data-binary @img.jpg`` with an image Content-Type),
* one multipart file field (``curl -F data=@img.jpg``), or
* JSON ``{"data": "<base64>", ...options}`` (TorchServe may hand it over already parsed).

Options come as JSON fields, multipart fields, ``X-MRL-<Option>`` headers (``X-MRL-Top-K: 3``), or
the query string where TorchServe 0.12 passes it on: ``/models/{m}/invoke?top_k=2`` and
``/invocations?model_name={m}&top_k=2`` hand every query parameter over as an item key, while
``/predictions/{m}?...`` drops the query string before the handler (pytorch/serve#989). On
/invocations ``model_name`` is TorchServe's routing key, not an option: it is dropped when it
names the model being served. An option given twice is refused rather than silently picked.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handler.errors import InputError

OPTIONS = ("dim", "operating_point", "top_k", "return_embedding", "neighbors", "funnel")
# Served search methods (handler/search.py; HNSW is evaluated there, not served: its index holds
# a float32 copy of the whole gallery). Named here so that parsing needs no FAISS.
FUNNELS = ("rerank", "rerank16", "funnel", "exact")
MAX_NEIGHBORS = 100
IMAGE_FIELDS = ("body", "data", "file", "image")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Options:
    """Validated per-request options; ``dim`` None means: run the cascade."""

    operating_point: str
    dim: int | None = None
    top_k: int = 5
    return_embedding: bool = False
    neighbors: int | None = None   # k nearest gallery items, when the model has a gallery
    funnel: str = "rerank"


HEADER_PREFIX = "x-mrl-"


def parse_item(item: Mapping[str, Any], *, nesting: Sequence[int], operating_points: Sequence[str],
               default_point: str, num_classes: int, gallery_size: int | None = None,
               headers: Mapping[str, Any] | None = None,
               model_name: str | None = None) -> tuple[bytes, Options]:
    """Split a request item (and its HTTP headers) into the encoded image and validated options.

    ``model_name``: the served model's name; an item key ``model_name`` equal to it is the
    /invocations routing key and is not an option.
    """
    if model_name is not None and _text_or_none(item.get("model_name")) == model_name:
        item = {k: v for k, v in item.items() if k != "model_name"}
    fields: dict[str, Any] = {}
    content_type = ""
    for name, value in (headers or {}).items():
        if not isinstance(value, (str, bytes, bytearray)):
            continue  # TorchServe also files per-parameter content types here, as dicts
        name = str(name).lower()
        if name == "content-type":
            content_type = _text(value) if len(value) <= 64 else str(value[:64])
        elif name.startswith(HEADER_PREFIX):
            _merge(fields, {name[len(HEADER_PREFIX):].replace("-", "_"): value})
    if content_type.startswith("application/x-www-form-urlencoded"):
        raise InputError("the body was sent as a URL-encoded form, which mangles binary data; send the "
                         "image with curl -T img.jpg, or --data-binary @img.jpg -H 'Content-Type: "
                         "image/jpeg', or as a multipart field (-F data=@img.jpg)", status=415)
    image: bytes | None = None
    for name, value in item.items():
        if name in IMAGE_FIELDS:
            if isinstance(value, (bytes, bytearray)) and _looks_like_json(value):
                value = _parse_json(value)
            if isinstance(value, Mapping):
                payload = dict(value)
                if "data" not in payload:
                    raise InputError("JSON body needs a 'data' field holding the base64-encoded image")
                value = _b64decode(payload.pop("data"))
                _merge(fields, payload)
            if isinstance(value, str):
                value = value.encode("latin-1", errors="replace")
            if not isinstance(value, (bytes, bytearray)):
                raise InputError(f"a JSON body must be an object with a 'data' field, got "
                                 f"{type(value).__name__}")
            if image is not None:
                raise InputError(f"the request carries more than one image (second one in {name!r}); "
                                 "send one image per request")
            image = bytes(value)
        else:
            _merge(fields, {name: value})
    if image is None:
        received = ", ".join(repr(k) for k in list(item)[:8] if k.isidentifier() and len(k) <= 32) or "none"
        raise InputError("the request has no image: send it as the body, a multipart field "
                         f"({', '.join(IMAGE_FIELDS[1:])}) or JSON {{\"data\": <base64>}}; "
                         f"fields received: {received}", reason="empty")
    return image, parse_options(fields, nesting=nesting, operating_points=operating_points,
                                default_point=default_point, num_classes=num_classes, gallery_size=gallery_size)


def parse_options(fields: Mapping[str, Any], *, nesting: Sequence[int], operating_points: Sequence[str],
                  default_point: str, num_classes: int, gallery_size: int | None = None) -> Options:
    unknown = sorted(set(fields) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r}; allowed options: {', '.join(OPTIONS)}",
                         reason="bad_option")
    values = {k: _text(v) for k, v in fields.items()}
    if "dim" in values and "operating_point" in values:
        raise InputError("give either dim (a fixed size) or operating_point (a cascade), not both",
                         reason="bad_option")
    dim = None
    if "dim" in values:
        dim = _int(values["dim"], "dim")
        if dim not in nesting:
            raise InputError(f"dim={values['dim']} is not a nesting size; allowed: "
                             f"{', '.join(map(str, nesting))}", reason="bad_option")
    point = values.get("operating_point", default_point)
    if point not in operating_points:
        raise InputError(f"operating_point={point!r} is unknown; allowed: {', '.join(operating_points)}",
                         reason="bad_option")
    top_k = min(5, num_classes)
    if "top_k" in values:
        top_k = _int(values["top_k"], "top_k")
        if not 1 <= top_k <= num_classes:
            raise InputError(f"top_k={values['top_k']} is out of range; allowed: 1 to {num_classes}",
                             reason="bad_option")
    ret = values.get("return_embedding", "false").lower()
    if ret not in _TRUE + _FALSE:
        raise InputError(f"return_embedding={values['return_embedding']!r} is not a boolean; "
                         "allowed: true, false, 1, 0", reason="bad_option")
    neighbors = None
    if "neighbors" in values:
        if gallery_size is None:
            raise InputError("neighbors needs a gallery, and this model has none (build the archive with "
                             "--gallery-dir)", reason="bad_option")
        neighbors = _int(values["neighbors"], "neighbors")
        most = min(MAX_NEIGHBORS, gallery_size)
        if not 1 <= neighbors <= most:
            raise InputError(f"neighbors={values['neighbors']} is out of range; allowed: 1 to {most} "
                             f"(the gallery holds {gallery_size} items)", reason="bad_option")
    funnel = values.get("funnel", "rerank")
    if "funnel" in values and neighbors is None:
        raise InputError("funnel applies to a neighbors request; add neighbors=k", reason="bad_option")
    if funnel not in FUNNELS:
        raise InputError(f"funnel={funnel!r} is unknown; allowed: {', '.join(FUNNELS)}", reason="bad_option")
    return Options(operating_point=point, dim=dim, top_k=top_k, return_embedding=ret in _TRUE,
                   neighbors=neighbors, funnel=funnel)


def _merge(fields: dict[str, Any], new: Mapping[str, Any]) -> None:
    for name, value in new.items():
        if name in fields:
            raise InputError(f"option {name!r} is given twice (e.g. as a header and a field); give it once",
                             reason="bad_option")
        fields[name] = value


def _looks_like_json(value: bytes | bytearray) -> bool:
    return value[:1] in (b"{", b"[")


def _parse_json(value: bytes | bytearray) -> Any:
    try:
        doc = json.loads(bytes(value).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError, as is int overflow
        raise InputError(f"body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InputError("body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InputError(f"JSON body must be an object with a 'data' field, got a {type(doc).__name__}")
    return doc


def _b64decode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"JSON 'data' must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"JSON 'data' is not valid base64: {exc}", reason="decode") from None


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, str)) and len(value) > 64:
        raise InputError(f"an option value is {len(value)} characters long; options are short words "
                         "or numbers", reason="bad_option")
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value).strip()
    raise InputError(f"option value {value!r} must be a string, number or boolean", reason="bad_option")


def _text_or_none(value: Any) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name}={text!r} is not an integer", reason="bad_option") from None
