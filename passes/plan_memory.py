"""Static memory planning over the fused main: every intermediate tensor gets a storage block, and blocks are
reused once the tensors in them are dead. After this pass `mod.attrs["memory_plan"]` holds the plan.

Liveness follows the call order of main. Assignment is greedy best fit: a new tensor takes the smallest free
block that holds it, or grows the largest free one, or opens a new block. Inputs, constants and the model's
outputs are not planned (the caller owns them).

A kernel may write its output over an input that dies there when it reads that input only elementwise, at the
output's own index, on the way out (the residual of a conv + add + relu): each tile reads its residual values
before it writes the same places. Besides the memory, this saves the write-allocate misses of a buffer last
touched long ago, with its lines already in the core's cache instead (ONNX Runtime sums into the residual the
same way).

A channel concat of batch 1 costs no kernel: the tensors it joins are each a contiguous stretch of its output
(NCHW or NCHW[b]c alike), so each producer writes its output at its offset in the concat's block and the
concat is planned as a view (`MemoryPlan.views`). Its block lives from the first producer to the concat's
last reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir import Call, Expr, Function, IRModule, TensorType, Tuple, TupleGetItem, TupleType
from kiln.ir.op import OpDef, OpPattern
from kiln.ir.visitor import children, post_order

ALIGN = 64  # bytes; vectorized kernels assume 64-byte aligned buffers


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class MemoryPlan:
    block_bytes: tuple[int, ...]  # size of each storage block
    # (tensor index, block, byte offset in the block), in call order
    assignment: tuple[tuple[int, int, int], ...] = field(default=())
    naive_bytes: int = 0  # one buffer per intermediate tensor
    views: tuple[int, ...] = ()  # calls (positions in call order) computed by no kernel: their inputs wrote them

    @property
    def planned_bytes(self) -> int:
        return sum(self.block_bytes)

    @property
    def ratio(self) -> float:
        return self.planned_bytes / self.naive_bytes if self.naive_bytes else 1.0


def _tensors(e: Expr) -> list[TensorType]:
    """The tensors a call produces: one, or one per tuple field."""
    ty = e.type
    if isinstance(ty, TupleType):
        return [t for t in ty.fields if isinstance(t, TensorType)]
    return [ty] if isinstance(ty, TensorType) else []


def inplace_params(fn: Function) -> set[int]:
    """Params of a fused group that it reads only at the output's index, through elementwise ops alone, on the
    path to its output: the output may overwrite them."""
    out_type = fn.body.type
    users: dict[int, list[Call]] = {}
    for e in post_order(fn.body):
        if isinstance(e, Call):
            for a in e.args:
                users.setdefault(id(a), []).append(e)

    def pointwise(e: Expr) -> bool:
        return (isinstance(e, Call) and isinstance(e.op, OpDef) and e.op.pattern <= OpPattern.BROADCAST
                and e.type == out_type)

    def to_output(e: Call) -> bool:
        while e is not fn.body:
            nxt = users.get(id(e), [])
            if len(nxt) != 1 or not pointwise(nxt[0]):
                return False
            e = nxt[0]
        return True

    return {k for k, p in enumerate(fn.params)
            if p.type == out_type and users.get(id(p))
            and all(pointwise(u) and to_output(u) for u in users[id(p)])}


def plan_memory(mod: IRModule) -> IRModule:
    body = mod.main.body
    order = [e for e in post_order(body) if isinstance(e, Call)]
    position = {id(e): i for i, e in enumerate(order)}
    outputs = {id(body)} | ({id(f) for f in body.fields} if isinstance(body, Tuple) else set())

    def producer(e: Expr) -> Expr:
        while isinstance(e, TupleGetItem):  # an item lives in its tuple's storage
            e = e.tuple_value
        return e

    last_use = {id(e): i for i, e in enumerate(order)}
    for e in post_order(body):
        # a tuple or tuple item is no kernel: its readers count from the end of main, conservatively
        at = position.get(id(e), len(order))
        for c in children(e):
            p = producer(c)
            if id(p) in position:
                last_use[id(p)] = max(last_use[id(p)], at)

    free: list[tuple[int, int]] = []  # (size, block)
    blocks: list[int] = []
    assignment: list[tuple[int, int]] = []
    expiring: dict[int, list[int]] = {}
    naive = 0
    index = 0
    block_of: dict[int, int] = {}  # a single-tensor call → its block
    part_of = _concat_parts(order, outputs)  # a concat's input → (the concat, byte offset in it)
    concat_block: dict[int, int] = {}
    views: list[int] = []

    def allocate(need: int) -> int:
        fits = sorted((s, b) for s, b in free if s >= need)
        if fits:
            free.remove(fits[0])
            return fits[0][1]
        if free:
            chosen = max(free)
            free.remove(chosen)
            blocks[chosen[1]] = need
            return chosen[1]
        blocks.append(need)
        return len(blocks) - 1

    for i, e in enumerate(order):
        for block in expiring.pop(i, []):
            free.append((blocks[block], block))
        if id(e) in outputs:
            continue
        if id(e) in concat_block:  # a view: its inputs are already in place
            naive += _aligned(e.type.nbytes)
            assignment.append((index, concat_block[id(e)], 0))
            index += 1
            views.append(i)
            continue
        if id(e) in part_of:
            concat, offset = part_of[id(e)]
            if id(concat) not in concat_block:
                concat_block[id(concat)] = allocate(_aligned(concat.type.nbytes))
                expiring.setdefault(last_use[id(concat)] + 1, []).append(concat_block[id(concat)])
            naive += _aligned(e.type.nbytes)
            assignment.append((index, concat_block[id(concat)], offset))
            index += 1
            continue
        over = _overwritable(e, i, last_use, block_of) if isinstance(e.op, Function) else None
        for t in _tensors(e):
            if not t.is_static:
                raise ValueError(f"cannot plan memory for {t}: bind symbolic dims first")
            need = _aligned(t.nbytes)
            naive += need
            if over is not None and blocks[over] >= need:
                block = over
                expiring[i + 1].remove(over)  # the input's block lives on as this output's
            else:
                block = allocate(need)
            assignment.append((index, block, 0))
            index += 1
            expiring.setdefault(last_use[id(e)] + 1, []).append(block)
            if not isinstance(e.type, TupleType):
                block_of[id(e)] = block
    plan = MemoryPlan(tuple(blocks), tuple(assignment), naive, tuple(views))
    return mod.with_attrs(memory_plan=plan)


def _concat_parts(order: list[Call], outputs: set[int]) -> dict[int, tuple[Call, int]]:
    """Inputs of the concats that can be views: a group that is one concatenate of its params in order, along
    an axis with only unit dims before it (so each input is one contiguous stretch of the output), not a model
    output, joining distinct kernel outputs that nothing else reads, each at a 64-byte aligned offset."""
    readers: dict[int, int] = {}
    for e in order:
        for a in e.args:
            readers[id(a)] = readers.get(id(a), 0) + 1
    parts: dict[int, tuple[Call, int]] = {}
    for e in order:
        fn = e.op
        if id(e) in outputs or not isinstance(fn, Function) or not isinstance(fn.body, Call):
            continue
        body = fn.body
        if body.op_name != "concatenate" or list(body.args) != list(fn.params) or not isinstance(e.type, TensorType):
            continue
        axis = body.attrs.axis % len(e.type.shape)
        if any(d != 1 for d in e.type.shape[:axis]):
            continue
        args = list(e.args)
        if len({id(a) for a in args}) != len(args) or any(
                not isinstance(a, Call) or not isinstance(a.op, Function) or id(a) in outputs or id(a) in parts
                or readers.get(id(a)) != 1 or not isinstance(a.type, TensorType)
                or (isinstance(a.op.body, Call) and a.op.body.op_name == "concatenate") for a in args):
            continue
        offsets, at = [], 0
        for a in args:
            offsets.append(at)
            at += a.type.nbytes
        if any(o % ALIGN for o in offsets):
            continue
        for a, o in zip(args, offsets):
            parts[id(a)] = (e, o)
    return parts



def _overwritable(call: Call, at: int, last_use: dict[int, int], block_of: dict[int, int]) -> int | None:
    """The block of an input `call` may write its output over: one that dies here, is read by the group only
    pointwise on the way to its output (every argument position it fills), and is a planned tensor."""
    safe = inplace_params(call.op)
    for k in sorted(safe):
        a = call.args[k]
        if id(a) not in block_of or last_use[id(a)] != at:
            continue
        if all(j in safe for j, b in enumerate(call.args) if b is a):
            return block_of[id(a)]
    return None
