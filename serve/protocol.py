"""The Open Inference Protocol (KServe v2) wire format: JSON tensors and the binary-tensor extension
(`Inference-Header-Content-Length`: a JSON header, then raw little-endian tensor bytes in input order).
Everything here is pure: bytes in, arrays out (and back); a malformed request raises BadRequest naming the field.
"""

from __future__ import annotations

import json
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


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise BadRequest(f"{where}.shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"header {HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise BadRequest(f"header {HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
        header, blob = body[:n], memoryview(body)[n:]
    else:
        header, blob = body, memoryview(b"")
    req = _json(header, "request body")
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
            raise BadRequest(f"{where}.name must be a non-empty string, got {name!r}")
        where = f"input '{name}'"
        if name in inputs:
            raise BadRequest(f"{where} appears twice")
        shape = _shape(t.get("shape"), where)
        datatype = t.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}.datatype {datatype!r} is not supported; use one of {sorted(DATATYPES)}")
        dtype = np.dtype(DATATYPES[datatype])
        count = int(np.prod(shape, dtype=np.int64))
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"{where}.parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"{where}.parameters.binary_data_size must be a byte count, got {size!r}")
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
            try:
                array = np.asarray(t["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as err:
                raise BadRequest(f"{where}.data does not hold {datatype} values: {err}") from None
            if array.size != count:
                raise BadRequest(f"{where}.data has {array.size} values, shape {list(shape)} needs {count}")
        inputs[name] = array.reshape(shape)
        datatypes[name] = datatype
    if at != len(blob):
        raise BadRequest(f"the body has {len(blob) - at} bytes of binary data that no input claims")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("request field 'parameters' must be an object")
    binary_default = bool(params.get("binary_data_output", False))
    outputs, binary = None, {}
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise BadRequest("request field 'outputs' must be a list")
        outputs = []
        for i, o in enumerate(req["outputs"]):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest(f"outputs[{i}] must be an object with a string 'name'")
            outputs.append(o["name"])
            op = o.get("parameters") or {}
            if "binary_data" in op:
                binary[o["name"]] = bool(op["binary_data"])
    rid = req.get("id")
    return InferRequest(str(rid) if rid is not None else None, inputs, datatypes, outputs, binary, binary_default)


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
