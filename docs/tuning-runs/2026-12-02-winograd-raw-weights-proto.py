import os, sys, time
os.environ.setdefault("TVM_NUM_THREADS", "2")
import numpy as np
import tvm
from tvm import te, s_tir
from kiln.ir.ops import winograd as W
from kiln.ir.ops.conv import ConvAttrs
from kiln.schedules.x86 import winograd as S

C, K, H, m, tp, tk = [int(v) for v in sys.argv[1:7]]
variant = sys.argv[7]
ib = ob = 16
target = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
x = te.placeholder((1, C // ib, H, H, ib), name="x")
alpha = m + 2
ca = ConvAttrs(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
attrs = W.WinogradAttrs(ca, m, ob)
_, G, _ = W.matrices(m)
if variant == "packed":
    u = te.placeholder((alpha, alpha, K // ob, C, ob), name="u")
    args = [x, u]
else:
    g = te.placeholder((K // ob, C, 3, 3, ob), name="g")
    from tvm.topi.nn.winograd_util import const_matrix
    Gm = const_matrix(G.astype(np.float32), "G")
    ra, rb = te.reduce_axis((0, 3), "ra"), te.reduce_axis((0, 3), "rb")
    coef = te.placeholder((alpha, alpha, 3, 3), name="coef")
    u = te.compute((alpha, alpha, K // ob, C, ob),
                   lambda e1, e2, k, c, ko: te.sum(coef[e1, e2, ra, rb] * g[k, c, ra, rb, ko], axis=[ra, rb]),
                   name="wino_U")
    args = [x, g, coef]

import kiln.ir.ops.winograd as mod
out = mod._compute(x, u, attrs)
prim = te.create_prim_func([*args, out])
sch = s_tir.Schedule(prim)
if variant == "packed":
    S.schedule(sch, S.Config(tile_p=tp, m=m, tile_k=tk))
else:
    # schedule everything as today, then put U's slab under the GEMM's parallel loop
    orig = S.STAGES
    S.STAGES = orig + ("wino_U",)
    S.schedule(sch, S.Config(tile_p=tp, m=m, tile_k=tk))
    S.STAGES = orig
    ub = sch.get_sblock("wino_U")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    mm = sch.get_sblock("wino_M_update") if "wino_M_update" in str(sch.mod) else sch.get_sblock("wino_M")
    par = sch.get_loops(mm)[0]
    sch.compute_at(ub, par)
    loops = sch.get_loops(ub)
    # loops: par, e1?, e2?, k, c, ko, ra, rb
    *outer, k_, c_, ko_, ra_, rb_ = loops
    sch.reorder(k_, c_, ra_, rb_, ko_)
    sch.unroll(ra_); sch.unroll(rb_)
    sch.vectorize(ko_)
    init = sch.decompose_reduction(ub, ra_)
    sch.vectorize(sch.get_loops(init)[-1])
mod_ = tvm.compile(sch.mod, target=target)
dev = tvm.cpu()
rng = np.random.default_rng(0)
xa = rng.standard_normal((1, C // ib, H, H, ib)).astype(np.float32)
w = (rng.standard_normal((K, C, 3, 3)) * 0.1).astype(np.float32)
if variant == "packed":
    wa = W.transform_weight(w, m, ob)
else:
    wa = np.ascontiguousarray(w.reshape(K // ob, ob, C, 3, 3).transpose(0, 2, 3, 4, 1))
oh = H
o = tvm.runtime.empty((1, K // ob, oh, oh, ob), "float32", dev)
xt, wt = tvm.runtime.tensor(xa, dev), tvm.runtime.tensor(wa, dev)
f = mod_["main"]
extra = []
if variant != "packed":
    extra = [tvm.runtime.tensor(np.einsum("ea,fb->efab", G, G).astype(np.float32), dev)]
f(xt, wt, *extra, o)
from kiln.ir.ops.blocked import block_array, unblock_array
from kiln.ir.ops.conv import conv_reference
want = block_array(conv_reference(unblock_array(xa).astype(np.float64), w.astype(np.float64), ca), ob)
err = np.abs(o.numpy() - want).max()
flush = np.ones(64 << 20 >> 2, np.float32)
cold, warm = [], []
for r in range(60):
    flush += 1.0
    t0 = time.perf_counter(); f(xt, wt, *extra, o); cold.append(time.perf_counter() - t0)
for r in range(60):
    t0 = time.perf_counter(); f(xt, wt, *extra, o); warm.append(time.perf_counter() - t0)
print(f"{variant:7s} C{C} K{K} H{H} F{m} tp{tp} tk{tk}: err {err:.2e} weights {wa.nbytes/1e6:.1f} MB  cold {np.median(cold)*1e3:.3f} ms  warm {np.median(warm)*1e3:.3f} ms")
