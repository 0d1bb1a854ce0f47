"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data; the header's length
is in the Inference-Header-Content-Length header. Each input with parameters.binary_data_size
takes that many bytes of the binary part, in order. BYTES elements are a 4-byte little-endian
length followed by the bytes.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BodyTooLarge, InvalidRequest

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
HEADER_LENGTH = "inference-header-content-length"


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # object array of bytes for BYTES


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidRequest(f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"decompressed body is larger than the limit of {limit} bytes")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    n = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > n:
            raise InvalidRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {n}-byte body")
        n = int(header_length)
    try:
        header = json.loads(body[:n])
    except ValueError as e:
        raise InvalidRequest(f"inference request is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidRequest("inference request must be a JSON object")
    return header, memoryview(body)[n:]


def _bytes_elements(raw: memoryview) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidRequest("BYTES tensor data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, i)
        if i + 4 + size > len(raw):
            raise InvalidRequest("BYTES tensor data is shorter than an element's stated length")
        items.append(bytes(raw[i + 4 : i + 4 + size]))
        i += 4 + size
    return items


def _json_bytes(value: Any) -> bytes:
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if not isinstance(value, str):
        raise InvalidRequest('BYTES elements in JSON must be base64 strings or {"b64": ...}')
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidRequest("BYTES elements in JSON must be base64-encoded") from None


def read_inputs(header: dict[str, Any], binary: memoryview) -> list[Tensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("inference request needs a non-empty 'inputs' list")
    tensors, offset = [], 0
    for spec in inputs:
        try:
            name, datatype, shape = spec["name"], spec["datatype"], [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise InvalidRequest("each input needs 'name', 'datatype' and an integer 'shape'") from None
        if datatype not in DTYPES:
            raise InvalidRequest(f"input {name!r}: unknown datatype {datatype!r}")
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {name!r}: shape {shape} has a negative dimension")
        count = int(np.prod(shape)) if shape else 1
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            size = int(size)
            if offset + size > len(binary):
                raise InvalidRequest(f"input {name!r}: binary_data_size {size} runs past the end of the body")
            raw = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                elements = _bytes_elements(raw)
                data = np.empty(len(elements), dtype=object)
                data[:] = elements
            else:
                itemsize = np.dtype(DTYPES[datatype]).itemsize
                if size != count * itemsize:
                    raise InvalidRequest(f"input {name!r}: {size} bytes do not hold shape {shape} of {datatype}")
                data = np.frombuffer(raw, dtype=DTYPES[datatype])
        elif "data" in spec:
            if datatype == "BYTES":
                flat = np.asarray(spec["data"], dtype=object).reshape(-1)
                data = np.empty(len(flat), dtype=object)
                data[:] = [_json_bytes(v) for v in flat]
            else:
                try:
                    data = np.asarray(spec["data"], dtype=DTYPES[datatype]).reshape(-1)
                except (TypeError, ValueError) as e:
                    raise InvalidRequest(f"input {name!r}: data is not {datatype}: {e}") from None
        else:
            raise InvalidRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        if data.size != count:
            raise InvalidRequest(f"input {name!r}: {data.size} elements do not fill shape {shape}")
        tensors.append(Tensor(name, datatype, shape, data.reshape(shape)))
    return tensors


def requested_outputs(header: dict[str, Any], available: list[str]) -> list[tuple[str, bool]]:
    """(name, as binary) for each output to return; all of them when none are named."""
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = header.get("outputs")
    if not wanted:
        return [(name, binary_default) for name in available]
    out = []
    for spec in wanted:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in available:
            raise InvalidRequest(f"unknown output {name!r}; this model has {', '.join(available)}")
        out.append((name, bool((spec.get("parameters") or {}).get("binary_data", binary_default))))
    return out


def encode_response(header: dict[str, Any], outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """Body and, when any output is binary, the JSON header's length."""
    blobs, entries = [], []
    for name, array, binary in outputs:
        array = np.ascontiguousarray(array, dtype=np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    head = json.dumps({**header, "outputs": entries}, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
