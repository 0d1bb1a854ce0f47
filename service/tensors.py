"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data; the header's length
is in the Inference-Header-Content-Length header. Each input with parameters.binary_data_size
takes that many bytes of the binary part, in order. BYTES elements are a 4-byte little-endian
length followed by the bytes.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BodyTooLarge, InvalidImage, InvalidRequest

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


def split_body(
    body: bytes, header_length: str | None, max_values: int | None = None
) -> tuple[dict[str, Any], memoryview]:
    """The request's JSON and the binary data after it. With `max_values`, JSON with more commas than that is
    refused unparsed: Python holds each JSON value as an object, and 16 MB of numbers took 147 MB and 0.23 s."""
    n = len(body)
    if header_length is not None:
        # ASCII digits only: isdigit() also admits "²", which int() refuses
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > n:
            raise InvalidRequest(f"Inference-Header-Content-Length {header_length[:20]!r} does not fit a {n}-byte body")
        n = int(header_length)
    if max_values is not None and (values := body.count(b",", 0, n)) > max_values:
        raise BodyTooLarge(
            f"the request's JSON holds more than {max_values:,} values ({values:,} commas), more than its tensors "
            "may: send fewer images per request, or their data as binary tensors"
        )
    try:
        header = json.loads(body[:n])
    except RecursionError:
        raise InvalidRequest("inference request JSON is nested too deeply") from None
    except ValueError as e:
        raise InvalidRequest(f"inference request is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidRequest("inference request must be a JSON object")
    return header, memoryview(body)[n:]


def _bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """The `count` length-prefixed elements of a BYTES tensor's binary data, read no further: 16 MB of
    empty elements would otherwise be 4 million turns of this loop."""
    items, i = [], 0
    while i < len(raw):
        if len(items) == count:
            raise InvalidRequest(f"BYTES tensor data holds more than the {count} elements of its shape")
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


def _parameters(spec: dict[str, Any], where: str) -> dict[str, Any]:
    params = spec.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}: 'parameters' must be a JSON object")
    return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def element_limit(datatype: Any, max_elements: int, max_strings: int) -> int:
    """The most elements an input of `datatype` may hold: a BYTES element is a whole encoded image."""
    return max_strings if datatype == "BYTES" else max_elements


def check_spec(name: Any, datatype: Any, shape: Any, max_elements: int) -> int:
    """The element count of a well-formed input declaration; the errors name what is wrong."""
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise InvalidRequest("each input needs a string 'name' and 'datatype' and a list 'shape'")
    if not all(_is_int(d) for d in shape) or len(shape) > 8:
        raise InvalidRequest(f"input {name[:64]!r}: shape must be at most 8 integers, got {str(shape)[:80]}")
    if datatype not in DTYPES:
        raise InvalidRequest(f"input {name[:64]!r}: unknown datatype {datatype[:20]!r}")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {name[:64]!r}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise BodyTooLarge(
            f"input {name[:64]!r}: shape {shape} has {count} elements, more than the limit of {max_elements}"
        )
    return count


def from_raw(name: str, datatype: str, shape: list[int], raw: memoryview | bytes) -> np.ndarray:
    """A tensor's elements from its binary form (BYTES: each element length-prefixed), unshaped."""
    if datatype == "BYTES":
        elements = _bytes_elements(memoryview(raw), math.prod(shape))
        data = np.empty(len(elements), dtype=object)
        data[:] = elements
        return data
    itemsize = np.dtype(DTYPES[datatype]).itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise InvalidRequest(f"input {name[:64]!r}: {len(raw)} bytes do not hold shape {shape} of {datatype}")
    return np.frombuffer(raw, dtype=DTYPES[datatype])


def shaped(name: str, shape: list[int], data: np.ndarray) -> np.ndarray:
    if data.size != math.prod(shape):
        raise InvalidRequest(f"input {name[:64]!r}: {data.size} elements do not fill shape {shape}")
    return data.reshape(shape)


def read_inputs(header: dict[str, Any], binary: memoryview, max_elements: int, max_strings: int) -> list[Tensor]:
    """The request's input tensors; none may hold more than `max_elements` elements, nor a BYTES one more
    than `max_strings`."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("inference request needs a non-empty 'inputs' list")
    _parameters(header, "request")
    tensors, offset = [], 0
    for spec in inputs:
        if not isinstance(spec, dict):
            raise InvalidRequest("each input must be a JSON object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        check_spec(name, datatype, shape, element_limit(datatype, max_elements, max_strings))
        size = _parameters(spec, f"input {name[:64]!r}").get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise InvalidRequest(f"input {name[:64]!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidRequest(f"input {name!r}: binary_data_size {size} runs past the end of the body")
            data = from_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in spec:
            if datatype == "BYTES":
                if not isinstance(spec["data"], list):
                    raise InvalidRequest(f"input {name[:64]!r}: data must be a list")
                try:
                    flat = np.asarray(spec["data"], dtype=object).reshape(-1)
                except ValueError:
                    raise InvalidRequest(f"input {name[:64]!r}: data is not a regular array") from None
                shaped(name, shape, flat)  # before any element is decoded
                data = np.empty(len(flat), dtype=object)
                data[:] = [_json_bytes(v) for v in flat]
            else:
                try:
                    data = np.asarray(spec["data"], dtype=DTYPES[datatype]).reshape(-1)
                except (TypeError, ValueError, OverflowError) as e:
                    raise InvalidRequest(f"input {name[:64]!r}: data is not {datatype}: {str(e)[:200]}") from None
        else:
            raise InvalidRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        tensors.append(Tensor(name, datatype, shape, shaped(name, shape, data)))
    return tensors


def select_outputs(wanted: list[str], available: list[str]) -> list[str]:
    """The outputs to return, in the order asked; all of them when none are named."""
    for name in wanted:
        if name not in available:
            raise InvalidRequest(f"unknown output {name[:64]!r}; this model has {', '.join(available)}")
    return wanted or list(available)


def requested_outputs(header: dict[str, Any], available: list[str]) -> list[tuple[str, bool]]:
    """(name, as binary) for each output to return; all of them when none are named."""
    binary_default = bool(_parameters(header, "request").get("binary_data_output", False))
    wanted = header.get("outputs")
    if wanted is None or wanted == []:
        return [(name, binary_default) for name in available]
    if not isinstance(wanted, list):
        raise InvalidRequest("'outputs' must be a list of {\"name\": ...} objects")
    out = []
    for spec in wanted:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(f"each output needs a string 'name', got {str(name)[:64]!r}")
        select_outputs([name], available)
        out.append((name, bool(_parameters(spec, f"output {name!r}").get("binary_data", binary_default))))
    return out


def finite(x: np.ndarray) -> np.ndarray:
    """`x`, or a 422 when it holds NaN or infinity (whose outputs JSON cannot carry)."""
    if not np.isfinite(x).all():
        raise InvalidImage("input holds NaN or infinite values; pixels must be finite (RGB in [0, 1])")
    return x


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
