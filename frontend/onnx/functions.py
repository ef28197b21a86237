"""ONNX functions inlined before import: a model's own functions (exporters such as PyTorch's dynamo exporter
emit them), and standard ops that Kiln has no converter for but that ONNX defines as a function of other ops
(DynamicQuantizeLinear, the window functions, CenterCropPad, AffineGrid, ...), as ONNX Runtime expands them
when it has no kernel. A converter, where there is one, wins over the function body: it is usually a fused op.

The expansion works on the proto, so everything after it (the supported-op scan, the converters, the error
messages naming nodes) sees an ordinary graph. A node whose function cannot be built (a context-dependent
body whose input types shape inference cannot tell) stays as it is and is reported unsupported as before.
"""

from __future__ import annotations

import logging

import onnx
import onnx.inliner
from onnx import defs

from . import contrib_quant
from .registry import CONVERTERS, DEFAULT_DOMAIN

log = logging.getLogger(__name__)

PRIVATE_DOMAIN = "kiln.expanded"  # the domain the expanded nodes' stand-in functions live in until inlined
_ROUNDS = 4  # a function body may use ops that are functions themselves


def expand_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its local functions and Kiln's missing function-ops inlined; `model` itself is unchanged
    (returned as is when there is nothing to expand)."""
    if not model.functions and not _expandable(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for _ in range(_ROUNDS):  # until no function is left (an inlined body may hold more function ops)
        _stand_in_functions(out)
        if not out.functions:
            break
        _give_default_attributes(out)
        try:
            out = _inline(out)
        except Exception as err:  # onnx's C++ inliner reports a malformed function as a bare error
            from kiln.errors import ModelError

            raise ModelError(f"the model's functions cannot be inlined: {str(err).splitlines()[0]}") from None
    return out


def _inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's inliner; a function written for another opset than the model's is version-converted, which needs
    every value's type, so shape inference runs first then."""
    mine = _opsets(model).get(DEFAULT_DOMAIN)
    other = any(o.domain in ("", "ai.onnx") and o.version != mine for f in model.functions for o in f.opset_import)
    if not other:
        return onnx.inliner.inline_local_functions(model)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference stops short: the inliner says which value it missed
        pass
    return onnx.inliner.inline_local_functions(model, convert_version=True)


def _give_default_attributes(model: onnx.ModelProto) -> None:
    """Calls of a local function get its declared attribute defaults (`attribute_proto`) where they omit them:
    onnx's inliner drops a reference to an attribute the call does not give."""
    defaults = {(f.domain, f.name): list(f.attribute_proto) for f in model.functions if f.attribute_proto}
    if not defaults:
        return
    calls = [n for _, n in _all_nodes(model.graph)]
    for f in model.functions:
        for n in f.node:
            calls.append(n)
            calls.extend(m for _, m in _all_subgraph_nodes(n))
    for n in calls:
        given = {a.name for a in n.attribute}
        for a in defaults.get((n.domain, n.op_type), ()):
            if a.name not in given:
                n.attribute.append(a)


def _all_subgraph_nodes(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield from _all_nodes(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                yield from _all_nodes(g)


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {(DEFAULT_DOMAIN if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield graph, n
        yield from _all_subgraph_nodes(n)


def _domain(node: onnx.NodeProto) -> str:
    return node.domain if node.domain != "ai.onnx" else DEFAULT_DOMAIN


def _schema(op_type: str, opset: int, domain: str):
    try:
        return defs.get_schema(op_type, opset, domain)
    except Exception:  # not an op ONNX defines at this opset
        return None


def _wants_expansion(node: onnx.NodeProto, opsets: dict[str, int]):
    """The schema to expand `node` by (or contrib_quant for ONNX Runtime's quantized contrib ops), or None when
    Kiln converts it (or nobody can)."""
    domain = _domain(node)
    if (domain, node.op_type) in CONVERTERS or domain == PRIVATE_DOMAIN or domain not in opsets:
        return None
    if domain == contrib_quant.DOMAIN:
        return contrib_quant if node.op_type in contrib_quant.BODIES else None
    s = _schema(node.op_type, opsets[domain], domain)
    if s is None or not (s.has_function or s.has_context_dependent_function):
        return None
    return s


def _expandable(model: onnx.ModelProto) -> bool:
    opsets = _opsets(model)
    return any(_wants_expansion(n, opsets) is not None for _, n in _all_nodes(model.graph))


def _function_of(schema, node: onnx.NodeProto, opset: int, types: dict) -> onnx.FunctionProto | None:
    """The schema's function body for this node at the model's opset (the newest version not after it)."""
    if schema is contrib_quant:
        return contrib_quant.body(node, opset)
    if schema.has_function:
        versions = [v for v in schema.function_opset_versions if v <= opset]
        if versions:
            f = onnx.FunctionProto()
            f.ParseFromString(schema.get_function_with_opset_version(max(versions)))
            return f
    if schema.has_context_dependent_function:
        versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
        tps = [types.get(x) for x in node.input]
        if not versions or any(x and t is None for x, t in zip(node.input, tps)):
            return None
        empty = onnx.TypeProto()
        try:
            raw = schema.get_context_dependent_function_with_opset_version(
                max(versions), node.SerializeToString(), [(t or empty).SerializeToString() for t in tps])
        except Exception:  # the schema refuses these types
            return None
        f = onnx.FunctionProto()
        f.ParseFromString(raw)
        return f if f.node else None
    return None


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot follow: context-dependent bodies are skipped
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type for vi in (*g.input, *g.value_info, *g.output)}
    for t in g.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def _stand_in_functions(model: onnx.ModelProto) -> None:
    """Point every node that wants expansion at a local function holding its body (one per node: a
    context-dependent body depends on the node's input types)."""
    opsets = _opsets(model)
    pending = [(n, s) for _, n in _all_nodes(model.graph) if (s := _wants_expansion(n, opsets)) is not None]
    if not pending:
        return
    types = _value_types(model) if any(s is not contrib_quant and not s.has_function for _, s in pending) else {}
    added = 0
    for node, schema in pending:
        opset = opsets.get(DEFAULT_DOMAIN, 0) if schema is contrib_quant else opsets[_domain(node)]
        body = _function_of(schema, node, opset, types)
        if body is None:
            continue
        name = f"{node.op_type}_{len(model.functions)}"
        f = onnx.FunctionProto()
        f.CopyFrom(body)
        f.name, f.domain = name, PRIVATE_DOMAIN
        if not any(o.domain == DEFAULT_DOMAIN for o in f.opset_import):
            f.opset_import.append(onnx.helper.make_opsetid(DEFAULT_DOMAIN, opsets.get(DEFAULT_DOMAIN, opset)))
        model.functions.append(f)
        given = {a.name for a in node.attribute}
        # the body refers to the schema's attributes, and the inliner knows no defaults (contrib bodies carry
        # theirs as attribute_proto, which _give_default_attributes reads)
        for attr in (schema.attributes.values() if schema is not contrib_quant else ()):
            if attr.name not in given and attr.default_value.type != onnx.AttributeProto.UNDEFINED:
                node.attribute.append(attr.default_value)
        log.info("expanding %s '%s' by its ONNX function body", node.op_type, node.name)
        node.op_type, node.domain = name, PRIVATE_DOMAIN
        added += 1
    if added and not any(o.domain == PRIVATE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(PRIVATE_DOMAIN, 1))


def expandable_op_types() -> set[str]:
    """ONNX op types (any domain, newest opset) that Kiln imports through their function body alone."""
    out = set()
    for s in defs.get_all_schemas():
        if (s.has_function or s.has_context_dependent_function) and (s.domain or DEFAULT_DOMAIN,
                                                                       s.name) not in CONVERTERS:
            out.add(s.name)
    return out
