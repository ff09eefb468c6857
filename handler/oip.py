"""The Open Inference Protocol (KServe "v2"), per request, beside the v1 API.

TorchServe 0.12 routes ``POST /v2/models/{m}/infer`` to the handler with the JSON body already
parsed into a dict; its own ``kservev2`` envelope reads only the first request of a batch
(pytorch/serve#2158), so this module parses and answers each request itself, and v1 and v2
requests share a dynamic batch.

Request: one input of datatype ``BYTES`` and shape ``[1]`` whose single element is the encoded
image, base64 (what a JSON client such as ``tritonclient.http`` with ``binary_data=False`` sends
once the caller base64-encodes the file) or, where the JSON carries it as text, the raw bytes
Latin-1 mapped. Our options (``dim``, ``operating_point``, ``top_k``, ``return_embedding``,
``neighbors``, ``funnel``) go in the request's ``parameters``. Response: named, typed outputs
(``OUTPUTS``), with ``sizes_tried``, ``operating_point`` and, for a neighbors request, the
funnel's ``retrieval`` stages in the response's ``parameters``. Errors: ``{"error": "..."}`` with a 4xx.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from handler.errors import InputError
from handler.requests import OPTIONS, Options, parse_options

# name -> datatype of every output; "embedding" only when return_embedding is true.
OUTPUTS = {"label": "BYTES", "class_index": "INT64", "confidence": "FP32", "embedding_dim": "INT32",
           "top_k_labels": "BYTES", "top_k_probabilities": "FP32", "embedding": "FP32",
           "neighbor_ids": "INT64", "neighbor_labels": "BYTES", "neighbor_scores": "FP32"}
# Outputs with one element per request; the others' length varies (top_k, dim, neighbors).
_SCALAR_OUTPUTS = ("label", "class_index", "confidence", "embedding_dim")
PLATFORM = "pytorch_torchserve"
_PARAM_TYPES = {"dim": (int,), "operating_point": (str,), "top_k": (int,), "return_embedding": (bool,),
                "neighbors": (int,), "funnel": (str,)}


@dataclass(frozen=True)
class V2Request:
    """What the response needs to echo: the request id and the requested output names."""

    id: str | None
    outputs: tuple[str, ...] | None


def v2_body(item: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The body of a v2 inference request (a JSON object with ``inputs``), else None.

    TorchServe parses the JSON itself when the request says Content-Type: application/json; a
    client that sends none (tritonclient does not) arrives as raw bytes, parsed here."""
    body = item.get("body")
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{" and b'"inputs"' in body:
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None  # not JSON after all: the v1 path says what is wrong with it
    return body if isinstance(body, Mapping) and "inputs" in body else None


def parse_v2(body: Mapping[str, Any], *, nesting: Sequence[int], operating_points: Sequence[str],
             default_point: str, num_classes: int, gallery_size: int | None = None
             ) -> tuple[bytes, Options, V2Request]:
    """(image bytes, validated options, what to echo) from one v2 body (``v2_body``), or an InputError."""
    unknown = sorted(set(body) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise InputError(f"unknown request field {unknown[0]!r}; a v2 request has id, inputs, outputs, "
                         "parameters")
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"'id' must be a string, got {type(rid).__name__}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        n = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise InputError(f"the request needs exactly one input (the encoded image), got {n}", reason="empty"
                         if isinstance(inputs, list) and not inputs else "bad_request")
    image = _image(inputs[0])
    params = body.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise InputError(f"'parameters' must be an object, got {type(params).__name__}")
    fields = {}
    for name, value in params.items():
        if name not in OPTIONS:
            raise InputError(f"unknown parameter {name!r}; allowed parameters: {', '.join(OPTIONS)}",
                             reason="bad_option")
        wrong_bool = isinstance(value, bool) and name != "return_embedding"  # bool is an int in Python
        if wrong_bool or not isinstance(value, _PARAM_TYPES[name]):
            raise InputError(f"parameter {name!r} must be of type {_PARAM_TYPES[name][0].__name__}, "
                             f"got {type(value).__name__} {value!r}"[:300], reason="bad_option")
        fields[name] = value
    opts = parse_options(fields, nesting=nesting, operating_points=operating_points,
                         default_point=default_point, num_classes=num_classes, gallery_size=gallery_size)
    wanted = _requested_outputs(body.get("outputs"))
    if wanted and "embedding" in wanted:  # asking for the output is asking for the embedding
        opts = replace(opts, return_embedding=True)
    return image, opts, V2Request(rid, wanted)


def _image(inp: Any) -> bytes:
    if not isinstance(inp, Mapping):
        raise InputError(f"an input must be an object, got {type(inp).__name__}")
    name = inp.get("name", "?")
    if inp.get("datatype") != "BYTES":
        raise InputError(f"input {name!r} has datatype {inp.get('datatype')!r}; the image goes in a "
                         "BYTES input")
    shape = inp.get("shape")
    if shape != [1]:
        raise InputError(f"input {name!r} has shape {shape!r}; send one image per request, shape [1]")
    data = inp.get("data")
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
        raise InputError(f"input {name!r} must carry its one element as a string in 'data'", reason="empty")
    text = data[0]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise InputError(f"input {name!r} is neither base64 nor raw bytes", reason="decode") from None


def _requested_outputs(outputs: Any) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InputError("'outputs' must be a list of objects with a 'name'")
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InputError(f"unknown output {unknown[0]!r}; outputs: {', '.join(OUTPUTS)}")
    return names


def model_metadata(*, gallery: bool) -> dict:
    """What ``GET /v2/models/{m}`` lists beside the model's name and versions: the one input and
    every output a request can get (the neighbors only where a gallery is served). The archive
    carries it as oip_metadata.json, which the frontend's OIP route reads (model_store/java/)."""
    outputs = [n for n in OUTPUTS if gallery or not n.startswith("neighbor_")]
    return {"platform": PLATFORM,
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [1] if n in _SCALAR_OUTPUTS else [-1]}
                        for n in outputs]}


def v2_response(answer: dict, req: V2Request, model_name: str, model_version: str = "1") -> dict:
    """A v1 answer (handler.service) as a v2 inference response."""
    values = {
        "label": [answer["label"]], "class_index": [answer["class_index"]],
        "confidence": [answer["confidence"]], "embedding_dim": [answer["embedding_dim"]],
        "top_k_labels": [t["label"] for t in answer["top_k"]],
        "top_k_probabilities": [t["probability"] for t in answer["top_k"]],
    }
    if "embedding" in answer:
        values["embedding"] = answer["embedding"]
    if "neighbors" in answer:
        values["neighbor_ids"] = [n["id"] for n in answer["neighbors"]]
        values["neighbor_labels"] = [n["label"] for n in answer["neighbors"]]
        values["neighbor_scores"] = [n["score"] for n in answer["neighbors"]]
    names = [n for n in (req.outputs or values) if n in values]
    params = {"sizes_tried": answer["sizes_tried"], "operating_point": answer["operating_point"]}
    if "retrieval" in answer:
        params["retrieval"] = answer["retrieval"]
    out = {"model_name": model_name, "model_version": model_version, "parameters": params,
           "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [len(values[n])], "data": values[n]}
                       for n in names]}
    if req.id is not None:
        out["id"] = req.id
    return out


def v2_error(exc: InputError) -> dict:
    return {"error": str(exc)}
