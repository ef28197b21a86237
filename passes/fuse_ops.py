"""Operator fusion with TVM FuseOps semantics. After this pass main calls one primitive Function per kernel.

The partition is built on the post-dominator tree of the dataflow graph. A node may join the group of its
immediate post-dominator when every path between them passes only through ops of a permitted pattern:
out-elemwise-fusable ops (conv, dense) absorb the elementwise and broadcast ops after them (bias, scale, ReLU,
Clip, the residual Add); elementwise and broadcast ops fuse forward into injective ops and reductions; injective
chains fuse (second phase, so convs finish fusing first). Each group has one output, its post-dominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir import Call, Constant, Expr, Function, IRModule, TensorType, Tuple, TupleGetItem, Var
from kiln.ir.op import OpDef, OpPattern
from kiln.ir.visitor import children, post_order

MAX_FUSE_DEPTH = 256  # TVM's default: very long groups compile slowly and schedule badly


@dataclass(eq=False)
class _Node:
    expr: Expr
    index: int
    pattern: OpPattern
    outputs: list[tuple[_Node, OpPattern]] = field(default_factory=list)
    extern: bool = False  # the function's result: nothing may fuse past it


@dataclass(eq=False)
class _Group:
    pattern: OpPattern
    parent: _Group | None = None
    num_nodes: int = 1
    has_anchor: bool = False

    def root(self) -> _Group:
        g = self
        while g.parent is not None:
            g = g.parent
        # path compression
        node = self
        while node.parent is not None and node.parent is not g:
            node.parent, node = g, node.parent
        return g


@dataclass(eq=False)
class _DomNode:
    node: _Node
    parent: _DomNode | None
    depth: int
    pattern: OpPattern  # the strongest edge pattern on the way to the parent


def _is_node(e: Expr) -> bool:
    return isinstance(e, (Call, Tuple, TupleGetItem))


def _pattern_of(e: Expr) -> OpPattern:
    if isinstance(e, Call):
        return e.op.pattern if isinstance(e.op, OpDef) else OpPattern.OPAQUE
    if isinstance(e, Tuple):
        return OpPattern.TUPLE
    return OpPattern.INJECTIVE  # TupleGetItem


def _build_graph(body: Expr) -> list[_Node]:
    order = [e for e in post_order(body) if _is_node(e)]
    nodes = {id(e): _Node(e, i, _pattern_of(e)) for i, e in enumerate(order)}
    for e in order:
        consumer = nodes[id(e)]
        for a in children(e):
            if id(a) not in nodes:
                continue
            if isinstance(e, Call):
                edge = consumer.pattern
                if (edge == OpPattern.BROADCAST and isinstance(a.type, TensorType) and isinstance(e.type, TensorType)
                        and a.type.shape == e.type.shape):
                    edge = OpPattern.ELEMWISE  # the broadcast is trivial along this input (whatever the dtypes:
                    # qnn.requantize takes a conv's int32 sum to uint8 with per-channel constants)
            elif isinstance(e, Tuple):
                edge = OpPattern.OPAQUE if not isinstance(a.type, TensorType) else OpPattern.INJECTIVE
            else:
                edge = OpPattern.INJECTIVE
            nodes[id(a)].outputs.append((consumer, edge))
    if id(body) in nodes:
        nodes[id(body)].extern = True
    return [nodes[id(e)] for e in order]


def _post_dominators(graph: list[_Node]) -> list[_DomNode]:
    tree: list[_DomNode | None] = [None] * len(graph)

    def lca(a: _DomNode | None, b: _DomNode | None, pattern: OpPattern) -> tuple[_DomNode | None, OpPattern]:
        while a is not b:
            if a is None or b is None:
                return None, pattern
            if a.depth < b.depth:
                pattern, b = max(pattern, b.pattern), b.parent
            elif b.depth < a.depth:
                pattern, a = max(pattern, a.pattern), a.parent
            else:
                pattern = max(pattern, a.pattern, b.pattern)
                a, b = a.parent, b.parent
        return a, pattern

    for node in reversed(graph):
        if node.extern or not node.outputs:
            tree[node.index] = _DomNode(node, None, 1, OpPattern.OPAQUE)
            continue
        parent: _DomNode | None = None
        pattern = OpPattern.ELEMWISE
        for i, (out, edge) in enumerate(node.outputs):
            other = tree[out.index]
            if i == 0:
                parent = other
            else:
                parent, pattern = lca(parent, other, pattern)
            pattern = max(pattern, edge)
        tree[node.index] = _DomNode(node, parent, parent.depth + 1 if parent else 1, pattern)
    return tree  # type: ignore[return-value]


class _Fuser:
    def __init__(self, graph: list[_Node]):
        self.graph = graph
        self.groups = [_Group(n.pattern, has_anchor=n.pattern == OpPattern.OUT_ELEMWISE_FUSABLE) for n in graph]

    def check_path(self, src: _Node, sink: _Node, ok) -> bool:
        visited: set[int] = set()

        def walk(n: _Node) -> bool:
            if n.index in visited:
                return True
            visited.add(n.index)
            if not ok(self.groups[n.index].root().pattern, n is sink):
                return False
            if n is sink:
                return True
            return all(walk(out) for out, _ in n.outputs)

        return all(walk(out) for out, _ in src.outputs)

    def commit(self, src: _Node, sink: _Node) -> None:
        target = self.groups[sink.index]
        visited: set[int] = set()

        def walk(n: _Node) -> None:
            if n is sink or n.index in visited:
                return
            visited.add(n.index)
            self.merge(self.groups[n.index], target)
            for out, _ in n.outputs:
                walk(out)

        walk(src)

    @staticmethod
    def merge(child: _Group, parent: _Group) -> None:
        child, parent = child.root(), parent.root()
        if child is parent:
            return
        parent.num_nodes += child.num_nodes
        child.parent = parent
        if child.has_anchor:
            parent.has_anchor = True
            parent.pattern = max(child.pattern, parent.pattern)

    def run(self, tree: list[_DomNode]) -> list[_Group]:
        for phase in range(3):
            for node in self.graph:
                group = self.groups[node.index].root()
                dom = tree[node.index]
                if group.pattern == OpPattern.OPAQUE or dom.parent is None:
                    continue
                sink = dom.parent.node
                sink_group = self.groups[sink.index].root()
                if phase == 2:
                    # fuse injective ops into the tuple that gathers them, when that tuple is injective
                    if group.pattern <= OpPattern.INJECTIVE and self.groups[sink.index].pattern == OpPattern.TUPLE \
                            and sink_group.pattern <= OpPattern.INJECTIVE and sink_group is not group:
                        if self.check_path(node, sink, lambda k, s: k <= OpPattern.INJECTIVE):
                            self.commit(node, sink)
                    continue
                if group is sink_group or self.groups[sink.index].pattern == OpPattern.TUPLE:
                    continue
                if group.num_nodes + sink_group.num_nodes > MAX_FUSE_DEPTH:
                    continue
                if group.pattern == OpPattern.OUT_ELEMWISE_FUSABLE:
                    if phase == 0 and dom.pattern == OpPattern.ELEMWISE and self.check_path(
                            node, sink, lambda k, s: k <= OpPattern.BROADCAST):
                        self.commit(node, sink)
                elif group.pattern <= OpPattern.BROADCAST:
                    if dom.pattern <= OpPattern.INJECTIVE or dom.pattern == OpPattern.COMM_REDUCE:
                        def ok(k, is_sink):
                            if not is_sink:
                                return k <= OpPattern.INJECTIVE
                            return k <= OpPattern.INJECTIVE or k in (OpPattern.COMM_REDUCE,
                                                                     OpPattern.OUT_ELEMWISE_FUSABLE)
                        if self.check_path(node, sink, ok):
                            self.commit(node, sink)
                elif group.pattern in (OpPattern.INJECTIVE, OpPattern.TUPLE):
                    if phase == 1 and self.check_path(node, sink, lambda k, s: k <= OpPattern.INJECTIVE):
                        self.commit(node, sink)
        return [g.root() for g in self.groups]


def _group_name(exprs: list[Expr]) -> str:
    ops = [e.op.name.split(".")[-1] for e in exprs if isinstance(e, Call) and isinstance(e.op, OpDef)]
    return "fused_" + "_".join(ops[:6]) + ("_etc" if len(ops) > 6 else "")


# the fused kernel splits output rows across cores, so few rows balance badly; yet on 2 cores fusing MobileNetV2's
# 7-row stage too measured 2.65-2.73 ms against 2.80-2.84 ms with it unfused (interleaved runs, one process). A
# target can ask for more rows (`mod.attrs["fuse_depthwise_min_rows"]`, schedules/x86/depthwise_pointwise.py)
MIN_FUSED_ROWS = 7


def _is_depthwise(e: Expr) -> bool:
    if not (isinstance(e, Call) and e.op.name == "nn.conv2d_nchwc"):
        return False
    x = e.args[0].type
    return e.attrs.conv.groups == x.shape[1] * (x.shape[4] if x.ndim == 5 else 1) > 1


def _is_pointwise(e: Expr, min_rows: int = MIN_FUSED_ROWS) -> bool:
    """A plain 1x1 conv over NCHW[b]c: each output row needs exactly one input row, so a producer's rows can
    be computed just before they are used, with no halo."""
    if not (isinstance(e, Call) and e.op.name == "nn.conv2d_nchwc" and e.attrs.algorithm == "direct"):
        return False
    c, w = e.attrs.conv, e.args[1].type
    return (c.groups == 1 and tuple(w.shape[2:4]) == (1, 1) and tuple(c.strides) == (1, 1)
            and not any(c.padding) and e.args[0].type.ndim == 5 and e.type.shape[2] >= min_rows)


def _fuse_depthwise_into_pointwise(graph: list[_Node], roots: list[_Group], min_rows: int = MIN_FUSED_ROWS
                                   ) -> list[_Group]:
    """Merge a depthwise conv's group (the conv, its bias and activation) into the 1x1 conv that alone reads
    it, the inverted-residual pattern of MobileNets: the fused kernel computes the depthwise rows one output
    row at a time into a buffer that stays in L1, so the expanded tensor between the two is never written to
    memory and read back."""
    members: dict[int, list[_Node]] = {}
    for node, root in zip(graph, roots):
        members.setdefault(id(root), []).append(node)
    merged: set[int] = set()
    for node, root in zip(graph, roots):
        group = members[id(root)]
        out = group[-1]
        if node is not out or len(out.outputs) != 1 or out.extern or id(root) in merged:
            continue
        if sum(1 for n in group if _is_depthwise(n.expr)) != 1 or not all(
                n.pattern <= OpPattern.BROADCAST or _is_depthwise(n.expr) for n in group):
            continue
        consumer = out.outputs[0][0]
        sink = roots[consumer.index].root()
        if not _is_pointwise(consumer.expr, min_rows) or consumer.expr.args[0] is not out.expr or id(sink) in merged:
            continue
        if any(_is_depthwise(n.expr) for n in members[id(sink)]):
            continue
        _Fuser.merge(root, sink)
        merged.update({id(root), id(sink)})
    return [g.root() for g in roots]


def fuse_ops(mod: IRModule) -> IRModule:
    fn = mod.main
    graph = _build_graph(fn.body)
    if not graph:
        return mod
    roots = _Fuser(graph).run(_post_dominators(graph))
    if mod.attrs.get("fuse_depthwise"):
        roots = _fuse_depthwise_into_pointwise(graph, roots,
                                               int(mod.attrs.get("fuse_depthwise_min_rows") or MIN_FUSED_ROWS))
    members: dict[int, list[_Node]] = {}
    for node, root in zip(graph, roots):
        members.setdefault(id(root), []).append(node)
    group_of = {id(n.expr): id(root) for n, root in zip(graph, roots)}

    new: dict[int, Expr] = {id(p): p for p in fn.params}

    def mapped(e: Expr) -> Expr:
        return new.get(id(e), e)  # constants and params map to themselves

    for node, root in zip(graph, roots):
        group = members[id(root)]
        if node is not group[-1]:
            continue  # emitted with its group's output (post order puts the output last)
        exprs = [n.expr for n in group]
        if len(exprs) == 1 and not isinstance(exprs[0], Call):
            e = exprs[0]  # a lone tuple or tuple item stays in main
            new[id(e)] = _rebuild(e, [mapped(c) for c in children(e)])
            continue
        _check_single_output(group, group_of, id(root), fn.body)
        new[id(node.expr)] = _make_group_call(exprs, mapped)
    body = mapped(fn.body)
    return mod.with_main(Function(fn.params, body, fn.attrs))


def _check_single_output(group: list[_Node], group_of: dict[int, int], gid: int, body: Expr) -> None:
    out = group[-1]
    for n in group[:-1]:
        if n.expr is body or any(group_of[id(o.expr)] != gid for o, _ in n.outputs):
            raise AssertionError(f"fusion produced a group with two outputs ({n.expr!r} and {out.expr!r})")


def _make_group_call(exprs: list[Expr], mapped) -> Call:
    inside = {id(e) for e in exprs}
    params: list[Var] = []
    args: list[Expr] = []
    local: dict[int, Expr] = {}
    for e in exprs:
        for c in children(e):
            if id(c) in inside or id(c) in local:
                continue
            if isinstance(c, Constant) and c.value.ndim == 0:
                local[id(c)] = c  # scalars stay immediates inside the kernel
                continue
            p = Var(f"p{len(params)}", c.type)
            params.append(p)
            args.append(mapped(c))
            local[id(c)] = p
    for e in exprs:
        local[id(e)] = _rebuild(e, [local[id(c)] for c in children(e)])
    body = local[id(exprs[-1])]
    func = Function(tuple(params), body, {"primitive": True, "name": _group_name(exprs)})
    span = next((e.span for e in reversed(exprs) if isinstance(e, Call) and e.span), None)
    return Call(func, tuple(args), span=span)


def _rebuild(e: Expr, kids: list[Expr]) -> Expr:
    if isinstance(e, Call):
        return Call(e.op, tuple(kids), e.attrs, span=e.span)
    if isinstance(e, Tuple):
        return Tuple(tuple(kids))
    return TupleGetItem(kids[0], e.index)


def fused_groups(mod: IRModule) -> list[Function]:
    """The primitive functions main calls, in call order."""
    return [e.op for e in post_order(mod.main.body) if isinstance(e, Call) and isinstance(e.op, Function)]


def group_ops(mod: IRModule) -> list[list[str]]:
    return [[c.op.name for c in post_order(f.body) if isinstance(c, Call) and isinstance(c.op, OpDef)]
            for f in fused_groups(mod)]


def fusion_summary(mod: IRModule) -> str:
    groups = group_ops(mod)
    n_ops = sum(len(g) for g in groups)
    counts: dict[str, int] = {}
    for g in groups:
        key = " + ".join(g)
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{len(groups)} kernels from {n_ops} ops"]
    lines += [f"  {n:4d} × {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
