"""Load an ONNX model and convert it node by node into a Kiln IRModule.

Before converting anything it checks the graph as a whole: every input produced somewhere, no cycles, and
every op type known — an unsupported model gets one error listing all its unsupported ops. After it, the
module's types are fully inferred and every constant subgraph is folded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from kiln.errors import KilnError, ModelError, UnsupportedError
from kiln.ir import Constant, Expr, Function, IRModule, TensorType, Tuple, TupleType, Var
from kiln.ir.types import normalize_dtype

from . import converters  # noqa: F401  (registers every converter)
from .converters.sequence import SeqValue
from .functions import expand_functions
from .registry import CONVERTERS, DEFAULT_DOMAIN, Node

log = logging.getLogger(__name__)

_ONNX_DTYPE = {v: k for k, v in onnx.TensorProto.DataType.items()}


def load_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model from a path, bytes or a proto, with its external data, as a ModelError if it is broken."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, (bytes, bytearray)):
            return onnx.load_from_string(bytes(model))
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file {str(path)!r} does not exist")
        return onnx.load(str(path), load_external_data=True)
    except onnx.checker.ValidationError as err:  # external data missing or outside the model's folder
        raise ModelError(f"external data of {model} cannot be read: {str(err).splitlines()[0]}") from None
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelError(f"cannot parse {model if not isinstance(model, bytes) else 'the model bytes'} as "
                         f"ONNX: {err or type(err).__name__} (truncated or not an ONNX file?)") from None
    except FileNotFoundError as err:
        raise ModelError(f"external data of {model} is missing: {err}") from None


def supported_op_types() -> set[str]:
    return {t for (d, t) in CONVERTERS if d == DEFAULT_DOMAIN}


def from_onnx(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    bind: Mapping[str, np.ndarray] | None = None,
) -> IRModule:
    """Convert an ONNX model to Kiln IR.

    `input_shapes` fixes the shapes of named inputs (symbolic dims bound at import); `bind` turns named
    graph inputs into constants with the given values (shape tensors that must be known at compile time).
    """
    proto = expand_functions(load_onnx(model))
    return _Importer(proto, dict(input_shapes or {}), dict(bind or {})).run()


class _Importer:
    def __init__(self, model: onnx.ModelProto, input_shapes: dict, bind: dict):
        self.model = model
        self.graph = model.graph
        self.input_shapes = input_shapes
        self.bind = bind
        self.opsets = {(o.domain or DEFAULT_DOMAIN): o.version for o in model.opset_import}
        if "ai.onnx" in self.opsets:
            self.opsets.setdefault(DEFAULT_DOMAIN, self.opsets.pop("ai.onnx"))
        self.values: dict[str, Expr] = {}

    def run(self) -> IRModule:
        self._check_opset()
        initializers = self._initializers()
        params = self._inputs(initializers)
        order = self._topological_order(set(self.values))
        self._check_supported(order)
        for index, proto in order:
            self._convert(proto, index)
        outputs = []
        for o in self.graph.output:
            if o.name not in self.values:
                raise ModelError(f"graph output '{o.name}' is not produced by any node, input or initializer")
            outputs.append(self.values[o.name])
        if not outputs:
            raise ModelError("the graph has no outputs")
        for o, e in zip(self.graph.output, outputs):
            if isinstance(e, SeqValue) or isinstance(e.type, TupleType):
                raise UnsupportedError(f"graph output '{o.name}' is a sequence; Kiln outputs tensors only")
        body = outputs[0] if len(outputs) == 1 else Tuple(tuple(outputs))
        fn = Function(tuple(params), body)
        return IRModule({"main": fn}, {
            "output_names": tuple(o.name for o in self.graph.output),
            "name": self.graph.name or "model",
            "opset": self.opsets.get(DEFAULT_DOMAIN, 0),
            "producer": self.model.producer_name,
        })

    # --- checks -----------------------------------------------------------------------------------------
    def _check_opset(self) -> None:
        newest = onnx.defs.onnx_opset_version()
        v = self.opsets.get(DEFAULT_DOMAIN)
        if v is None:
            return  # e.g. ai.onnx.ml or training-only models: the op scan reports what is unsupported
        if v > newest:
            raise UnsupportedError(f"the model uses opset {v}, newer than the installed onnx knows ({newest})")
        if v < 7:
            log.warning("opset %d predates opset 7, the oldest Kiln is tested with", v)

    def _initializers(self) -> dict[str, Constant]:
        out = {}
        for t in self.graph.initializer:
            try:
                value = numpy_helper.to_array(t)
            except Exception as err:  # onnx raises bare Exceptions for malformed raw data
                raise ModelError(f"initializer '{t.name}' cannot be read: {err}") from None
            out[t.name] = Constant(value, name=t.name)
        for t in self.graph.sparse_initializer:
            raise UnsupportedError(f"sparse initializer '{t.values.name}' is not supported")
        self.values.update(out)
        return out

    def _inputs(self, initializers: dict[str, Constant]) -> list[Var]:
        params = []
        for vi in self.graph.input:
            if vi.name in initializers:
                continue  # old models list initializers as inputs too; the initializer is the value
            if vi.name in self.bind:
                self.values[vi.name] = Constant(np.asarray(self.bind[vi.name]), name=vi.name)
                continue
            ty = self._input_type(vi)
            v = Var(vi.name, ty)
            self.values[vi.name] = v
            params.append(v)
        unknown = set(self.input_shapes) - {vi.name for vi in self.graph.input}
        if unknown:
            names = [vi.name for vi in self.graph.input if vi.name not in initializers]
            raise KilnError(f"--input-shape names {sorted(unknown)}, but the model's inputs are {names}")
        return params

    def _input_type(self, vi: onnx.ValueInfoProto) -> TensorType:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedError(f"graph input '{vi.name}' is not a tensor ({vi.type.WhichOneof('value')})")
        onnx_dtype = _ONNX_DTYPE.get(tt.elem_type, str(tt.elem_type))
        try:
            dtype = normalize_dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, KilnError, TypeError):
            raise UnsupportedError(f"graph input '{vi.name}' has dtype {onnx_dtype}, which Kiln does not support")
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or f"{vi.name}_dim{i}")
        if vi.name in self.input_shapes:
            given = tuple(self.input_shapes[vi.name])
            if tt.HasField("shape") and len(given) != len(dims):
                raise KilnError(f"--input-shape {vi.name}={','.join(map(str, given))} has {len(given)} dims, "
                                f"the model's input has {len(dims)} ({dims})")
            for have, want in zip(dims, given):
                if isinstance(have, int) and isinstance(want, int) and have != want:
                    raise KilnError(f"--input-shape {vi.name}: dim {have} is fixed by the model, got {want}")
            dims = list(given)
        return TensorType(tuple(dims), dtype)

    def _topological_order(self, available: set[str],
                           graph: onnx.GraphProto | None = None) -> list[tuple[int, onnx.NodeProto]]:
        """Kahn's algorithm over tensor names: ONNX asks for sorted nodes, but not every exporter obliges."""
        graph = self.graph if graph is None else graph
        nodes = list(enumerate(graph.node))
        producers: dict[str, int] = {}
        for i, n in nodes:
            for o in n.output:
                if o:
                    if o in producers or o in available:
                        raise ModelError(f"tensor '{o}' is produced twice (second time by node "
                                         f"'{n.name or n.op_type}')")
                    producers[o] = i
        for i, n in nodes:
            for name in n.input:
                if name and name not in producers and name not in available:
                    raise ModelError(f"node '{n.name or f'{n.op_type}_{i}'}' ({n.op_type}) reads '{name}', "
                                     f"which no node, graph input or initializer produces")
        # a node with subgraphs (If, Loop, Scan) also waits for the outer values its subgraphs read
        waiting = {i: {producers[x] for x in (*n.input, *_subgraph_reads(n)) if x in producers and producers[x] != i}
                   for i, n in nodes}
        users: dict[int, list[int]] = {i: [] for i, _ in nodes}
        for i, deps in waiting.items():
            for d in deps:
                users[d].append(i)
        ready = sorted(i for i, d in waiting.items() if not d)
        order = []
        while ready:
            i = ready.pop(0)
            order.append(i)
            for u in users[i]:
                waiting[u].discard(i)
                if not waiting[u]:
                    ready.append(u)
        if len(order) != len(nodes):
            stuck = [graph.node[i].name or f"{graph.node[i].op_type}_{i}" for i in waiting if waiting[i]]
            raise ModelError(f"the graph has a cycle through nodes {stuck[:8]}")
        return [(i, graph.node[i]) for i in order]

    def _check_supported(self, order: list[tuple[int, onnx.NodeProto]]) -> None:
        missing: dict[tuple[str, str], str] = {}

        def scan(nodes) -> None:  # subgraphs (If branches, Loop and Scan bodies) are checked too
            for i, n in nodes:
                key = (n.domain if n.domain not in ("ai.onnx",) else DEFAULT_DOMAIN, n.op_type)
                if key not in CONVERTERS and key not in missing:
                    missing[key] = n.name or f"{n.op_type}_{i}"
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        scan(enumerate(a.g.node))

        scan(order)
        if missing:
            rows = [f"  {d + '.' if d else ''}{t} (first at node '{name}', opset "
                    f"{self.opsets.get(d, '?')})" for (d, t), name in missing.items()]
            raise UnsupportedError(f"{len(missing)} unsupported op type(s):\n" + "\n".join(rows))

    # --- conversion -------------------------------------------------------------------------------------
    def _convert(self, proto: onnx.NodeProto, index: int) -> None:
        domain = proto.domain if proto.domain != "ai.onnx" else DEFAULT_DOMAIN
        inputs = [self.values[x] if x else None for x in proto.input]
        node = _ScopedNode(self, proto, inputs, self.opsets.get(domain, 0), index)
        out = CONVERTERS[(domain, proto.op_type)](node)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        for k, name in enumerate(proto.output):
            if not name:
                continue
            if k >= len(outs) or outs[k] is None:
                raise UnsupportedError(f"{node}: output {k} ('{name}') is not supported")
            self.values[name] = outs[k]

    def run_graph(self, graph: onnx.GraphProto, inputs: Sequence[Expr | SeqValue], node: Node) -> list:
        """Convert a subgraph (an If branch, a Loop or Scan body) with its formal inputs bound to `inputs` and
        the enclosing scopes' values visible; its outputs, as values of this graph."""
        if len(inputs) != len(graph.input):
            raise ModelError(f"{node}: subgraph '{graph.name}' takes {len(graph.input)} inputs, given {len(inputs)}")
        outer = self.values
        self.values = dict(outer)
        try:
            for t in graph.initializer:
                self.values[t.name] = Constant(numpy_helper.to_array(t), name=t.name)
            for vi, value in zip(graph.input, inputs):
                self.values[vi.name] = value
            for index, proto in self._topological_order(set(self.values), graph):
                self._convert(proto, index)
            missing = [o.name for o in graph.output if o.name not in self.values]
            if missing:
                raise ModelError(f"{node}: subgraph '{graph.name}' outputs {missing}, which nothing produces")
            return [self.values[o.name] for o in graph.output]
        finally:
            self.values = outer


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside the node's subgraphs, at any depth (a superset of the outer values they use)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_reads(n))
    return names


class _ScopedNode(Node):
    """A node that can convert its subgraph attributes in the importer's current scope."""

    def __init__(self, importer: _Importer, proto: onnx.NodeProto, inputs: list, opset: int, index: int):
        super().__init__(proto, inputs, opset, index)
        self._importer = importer

    def attr_graph(self, name: str) -> onnx.GraphProto:
        graph = self._attr(name, "graph", None)
        if graph is None:
            raise self.invalid(f"attribute '{name}' is required")
        return graph

    def run_graph(self, name: str, inputs: Sequence) -> list:
        return self._importer.run_graph(self.attr_graph(name), inputs, self)
