"""The Open Inference Protocol (KServe v2) wire format: JSON tensors and the binary-tensor extension
(`Inference-Header-Content-Length`: a JSON header, then raw little-endian tensor bytes in input order).
Everything here is pure: bytes in, arrays out (and back); a malformed request raises BadRequest naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


class ServeError(Exception):
    """An answer other than 200; `status` is the HTTP code, the message goes to the client as {"error": ...}."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}


class BadRequest(ServeError):
    status = 400


class NotFound(ServeError):
    status = 404


class Unauthorized(ServeError):
    status = 401


class Forbidden(ServeError):
    status = 403


class RequestTimeout(ServeError):
    status = 408


class PayloadTooLarge(ServeError):
    status = 413


class Unavailable(ServeError):
    status = 503


class LoadFailed(ServeError):
    """A load request whose versions could not load (the serving ones, if any, stay)."""

    status = 400


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[str] | None  # None: all outputs
    binary_outputs: dict[str, bool]  # per requested output; missing → binary_default
    binary_default: bool


MAX_RANK = 32  # numpy allows 64 dims; no served model comes near either
MAX_ELEMENTS = 1 << 40  # product of the non-zero dims: numpy refuses shapes whose size overflows its index type
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts '²', which int() refuses


def show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, so a hostile value cannot flood an error message or a log line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as err:  # ValueError covers JSONDecodeError and 4,300+ digit ints
        raise BadRequest(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None


def _object(value: Any, where: str) -> dict:
    """An optional JSON object: missing or null is {}; anything else must be an object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object, got {show(value)}")
    return value


def _flag(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}.{key} must be true or false, got {show(value)}")
    return value


def _shape(value: Any, where: str) -> tuple[tuple[int, ...], int]:
    """The shape and its element count; every dim a non-negative integer, the count small enough to be real."""
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise BadRequest(f"{where}.shape must be a list of non-negative integers, got {show(value)}")
    if len(value) > MAX_RANK:
        raise BadRequest(f"{where}.shape has {len(value)} dims; at most {MAX_RANK} are supported")
    count, extent = 1, 1
    for d in value:  # Python ints: exact, so no product wraps around as an int64 would
        count *= d
        extent *= max(d, 1)
        if extent > MAX_ELEMENTS:
            raise BadRequest(f"{where}.shape {show(value)} is too large (more than {MAX_ELEMENTS} elements)")
    return tuple(value), count  # nothing is allocated from it: the data must match it, and the body is bounded


def version_label(version: str) -> str:
    """A URL's version segment: ASCII digits, at most 18 of them (an int64 with room to spare)."""
    if not _DIGITS.fullmatch(version):
        raise BadRequest(f"version in the URL must be a positive integer of at most 18 digits, got "
                         f"{show(version)}")
    return version


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        if not _DIGITS.fullmatch(header_length.strip()):
            raise BadRequest(f"header {HEADER_LENGTH} must be a byte count, got {show(header_length)}")
        n = int(header_length)
        if n > len(body):
            raise BadRequest(f"header {HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
        header, blob = memoryview(body)[:n], memoryview(body)[n:]
    else:
        header, blob = body, memoryview(b"")
    req = parse_json(header, "request body")
    if not isinstance(req, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(req).__name__}")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request field 'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    at = 0
    for i, t in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise BadRequest(f"{where} must be an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{where}.name must be a non-empty string, got {show(name)}")
        where = f"input {show(name)}"
        if name in inputs:
            raise BadRequest(f"{where} appears twice")
        shape, count = _shape(t.get("shape"), where)
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise BadRequest(f"{where}.datatype {show(datatype)} is not supported; use one of {sorted(DATATYPES)}")
        dtype = np.dtype(DATATYPES[datatype])
        params = _object(t.get("parameters"), f"{where}.parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"{where}.parameters.binary_data_size must be a byte count, got {show(size)}")
            if size != count * dtype.itemsize:
                raise BadRequest(f"{where}: binary_data_size {size} does not match {datatype}{list(shape)} "
                                 f"({count * dtype.itemsize} bytes)")
            if at + size > len(blob):
                raise BadRequest(f"{where}: binary data ends at byte {at + size}, the body has {len(blob)} after "
                                 f"the header")
            array = np.frombuffer(blob[at:at + size], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
            at += size
        else:
            if "data" not in t:
                raise BadRequest(f"{where} has neither 'data' nor parameters.binary_data_size")
            data = t["data"]
            if not isinstance(data, (list, int, float, bool)) or isinstance(data, str):
                raise BadRequest(f"{where}.data must be a list of numbers, got {type(data).__name__}")
            try:
                array = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as err:
                raise BadRequest(f"{where}.data does not hold {datatype} values: {err}") from None
            except RecursionError:
                raise BadRequest(f"{where}.data is nested too deeply") from None
            if array.size != count:
                raise BadRequest(f"{where}.data has {array.size} values, shape {list(shape)} needs {count}")
        inputs[name] = array.reshape(shape)
        datatypes[name] = datatype
    if at != len(blob):
        raise BadRequest(f"the body has {len(blob) - at} bytes of binary data that no input claims")
    params = _object(req.get("parameters"), "request field 'parameters'")
    binary_default = bool(_flag(params, "binary_data_output", "request field 'parameters'"))
    outputs, binary = None, {}
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise BadRequest(f"request field 'outputs' must be a list, got {show(req['outputs'])}")
        outputs = []
        for i, o in enumerate(req["outputs"]):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
                raise BadRequest(f"outputs[{i}] must be an object with a non-empty string 'name', got {show(o)}")
            if o["name"] in outputs:
                raise BadRequest(f"outputs[{i}]: output {show(o['name'])} is requested twice")
            outputs.append(o["name"])
            flag = _flag(_object(o.get("parameters"), f"outputs[{i}].parameters"), "binary_data",
                         f"outputs[{i}].parameters")
            if flag is not None:
                binary[o["name"]] = flag
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"request field 'id' must be a string, got {show(rid)}")
    return InferRequest(rid, inputs, datatypes, outputs, binary, binary_default)


def encode_infer_response(model: str, version: str, request: InferRequest,
                          outputs: list[tuple[str, np.ndarray]]) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers; binary outputs follow the JSON header in output order."""
    tensors, blobs = [], []
    for name, value in outputs:
        t: dict[str, Any] = {"name": name, "datatype": TO_DATATYPE[value.dtype.name], "shape": list(value.shape)}
        if request.binary_outputs.get(name, request.binary_default):
            raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = value.reshape(-1).tolist()
        tensors.append(t)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
