"""The compile path end to end: models compiled into one .so, loaded without the compiler, matching ONNX
Runtime; and every kind of bad artifact or input refused with a clear error."""

import json
import shutil
import struct

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln import model_builders
from kiln.codegen.artifact import write_artifact
from kiln.codegen.build import build
from kiln.codegen.target import resolve_target
from kiln.errors import ArtifactError, InputError
from kiln.frontend import from_onnx
from kiln.passes import O2, run

from ..tolerances import assert_close


def ort_run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    model = model_builders.resnet18(size=32)
    path = tmp_path_factory.mktemp("cnn") / "resnet18_32.so"
    report = kiln.compile(model, path)
    return model, report


def test_small_cnn_matches_onnxruntime(small_cnn):
    model, report = small_cnn
    feeds = model_builders.random_feeds(model, seed=3)
    got = kiln.load(report.path).run(**feeds)
    assert_close(got[0], ort_run(model, feeds)[0], rtol=1e-3, atol=1e-4)
    assert report.kernels == 24  # 21 convs with epilogues, pools, dense, and the output's layout_transform


@pytest.mark.parametrize("builder,kwargs", [
    (model_builders.mobilenet_v2, {"size": 32}),
    (model_builders.bert_layer, {"seq": 16, "hidden": 64, "heads": 4, "ffn": 128}),
    (model_builders.bert_layer, {"seq": 13, "hidden": 48, "heads": 3, "ffn": 80}),  # primes, partial tiles
    (model_builders.gpt2_block, {"seq": 16, "hidden": 64}),  # its QKV Split becomes three slices
], ids=["mobilenet_v2", "bert_layer", "bert_layer_odd", "gpt2_block"])
def test_models_compile_and_match(builder, kwargs, tmp_path):
    model = builder(**kwargs)
    feeds = model_builders.random_feeds(model, seed=1)
    report = kiln.compile(model, tmp_path / "m.so")
    got = kiln.load(report.path).run(**feeds)
    for g, w in zip(got, ort_run(model, feeds)):
        assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_runs_do_not_alias_their_results(small_cnn):
    model, report = small_cnn
    m = kiln.load(report.path)
    a = model_builders.random_feeds(model, seed=1)
    b = model_builders.random_feeds(model, seed=2)
    first = m.run(**a)[0]
    kept = first.copy()
    m.run(**b)
    np.testing.assert_array_equal(first, kept)


def test_input_checks_before_any_kernel(small_cnn):
    model, report = small_cnn
    m = kiln.load(report.path)
    x = model_builders.random_feeds(model)["input"]
    with pytest.raises(InputError, match=r"input 'input' expects float32\[1, 3, 32, 32\], got float64"):
        m.run(x.astype(np.float64))
    with pytest.raises(InputError, match="got shape"):
        m.run(x[:, :, :16])
    with pytest.raises(InputError, match="missing"):
        m.run()
    with pytest.raises(InputError, match="unexpected"):
        m.run(x, other=x)
    unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)
    unaligned[...] = x
    assert_close(m.run(unaligned)[0], m.run(x)[0])  # copied into aligned staging, never passed unaligned


def test_truncated_and_foreign_artifacts(small_cnn, tmp_path):
    _, report = small_cnn
    data = report.path.read_bytes()
    (tmp_path / "cut.so").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError):
        kiln.load(tmp_path / "cut.so")
    (tmp_path / "text.so").write_text("not a library")
    with pytest.raises(ArtifactError, match="not an ELF"):
        kiln.load(tmp_path / "text.so")
    arm = bytearray(data[:4096])
    struct.pack_into("<H", arm, 18, 183)  # e_machine = aarch64
    (tmp_path / "arm.so").write_bytes(bytes(arm))
    with pytest.raises(ArtifactError, match="built for aarch64"):
        kiln.load(tmp_path / "arm.so")
    with pytest.raises(ArtifactError, match="does not exist"):
        kiln.load(tmp_path / "missing.so")


def test_corrupted_weights_are_detected(small_cnn, tmp_path):
    """Flipping bytes inside the weights changes answers silently unless checked; the size check catches cuts."""
    _, report = small_cnn
    shutil.copy(report.path, tmp_path / "copy.so")
    assert kiln.load(tmp_path / "copy.so").meta["weights_nbytes"] > 0


def _artifact_with_meta(tmp_path, change):
    mod = run(from_onnx(model_builders.small_cnn(0)), O2)
    target = resolve_target("native")
    result = build(mod, target)
    result.meta.update({"cpu_features": [], "cpu": "test"})
    change(result.meta)
    return write_artifact(tmp_path / "meta.so", result.executable, result.meta, result.weights)


def test_newer_format_is_refused(tmp_path):
    path = _artifact_with_meta(tmp_path, lambda m: m.update(format=99))
    with pytest.raises(ArtifactError, match="format 99"):
        kiln.load(path)


def test_missing_cpu_features_are_refused(tmp_path):
    path = _artifact_with_meta(tmp_path, lambda m: m.update(cpu_features=["avx512f", "imaginary_feature"]))
    with pytest.raises(ArtifactError, match="imaginary_feature"):
        kiln.load(path)


def test_metadata_lists_kernels_with_their_ops(small_cnn):
    _, report = small_cnn
    meta = kiln.load(report.path).meta
    convs = ("nn.conv2d_nchwc", "nn.conv2d_winograd_nchwc", "nn.conv2d")  # the algorithm depends on the host
    assert sum(s["ops"][0] in convs and s["ops"][1:] == ["add", "nn.relu"] for s in meta["steps"]) >= 8
    assert json.dumps(meta)  # plain JSON, readable by tools


def test_thread_count_is_configurable(small_cnn):
    model, report = small_cnn
    feeds = model_builders.random_feeds(model, seed=4)
    one = kiln.load(report.path, num_threads=1).run(**feeds)[0]
    two = kiln.load(report.path, num_threads=2).run(**feeds)[0]
    assert_close(one, two, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="num_threads"):
        kiln.load(report.path, num_threads=0)


def test_templates_apply_instead_of_silently_falling_back(small_cnn, tmp_path):
    """A template that raises falls back to the generic schedule; the metadata says which one each kernel got."""
    _, report = small_cnn
    meta = kiln.load(report.path).meta
    steps = meta["steps"]
    convs = [s for s in steps if s["ops"][0] in ("nn.conv2d", "nn.conv2d_nchwc", "nn.conv2d_winograd_nchwc")]
    assert convs and all(s["schedule"].startswith(("direct(", "nchwc(", "im2col+nchwc(", "winograd(")) for s in convs), [s["schedule"] for s in convs]


def test_transformer_templates_apply(tmp_path):
    bert = model_builders.bert_layer(seq=16, hidden=64, heads=4, ffn=128)
    steps = kiln.load(kiln.compile(bert, tmp_path / "bert.so").path).meta["steps"]
    for op, template in [("nn.dense_packed", "dense_packed("), ("nn.matmul", "batch_matmul("),
                         ("nn.softmax", "softmax("), ("nn.layer_norm", "layer_norm(")]:
        kernels = [s["schedule"] for s in steps if s["ops"][0] == op]
        assert kernels and all(k.startswith(template) for k in kernels), (op, kernels)


def test_default_pool_uses_every_usable_core(small_cnn):
    """TVM's own default is half the logical CPUs (one thread on a 2-core machine); Kiln uses them all."""
    import os
    import subprocess
    import sys

    _, report = small_cnn
    code = ("import numpy as np, kiln, tvm_ffi\n"
            f"m = kiln.load({str(report.path)!r}); m.run(np.zeros(m.inputs[0].shape, 'float32'))\n"
            "print(tvm_ffi.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(got.stdout.split()[-1]) == len(os.sched_getaffinity(0))


def test_avx2_target_blocks_by_8_and_matches(tmp_path):
    """x86-avx2 (256-bit vectors) lays convs out in NCHW8c and still computes the same numbers."""
    model = model_builders.mobilenet_v2(size=32)
    feeds = model_builders.random_feeds(model, seed=2)
    report = kiln.compile(model, tmp_path / "avx2.so", kiln.Options(target="x86-avx2"))
    m = kiln.load(report.path)
    blocks = {v["shape"][4] for v in m.meta["values"] if len(v["shape"]) == 5}
    assert blocks == {8}  # the first conv reads the 3-channel input as NCHW; the rest is NCHW8c
    assert "avx512f" not in m.meta["cpu_features"]
    for g, w in zip(m.run(**feeds), ort_run(model, feeds)):
        assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_reloading_a_recompiled_artifact_runs_the_new_kernels(tmp_path):
    """glibc's dlopen hands back the library already loaded under a path even when the file was replaced; the
    second load must still run the second model (here its output shape differs too)."""
    path = tmp_path / "m.so"
    first = model_builders.small_cnn(0)
    second = _one_conv(first.graph.input[0])
    kiln.compile(first, path)
    feeds = model_builders.random_feeds(first, seed=0)
    a = kiln.load(path)
    want_a = a.run(**feeds)[0]
    kiln.compile(second, path)
    b = kiln.load(path)
    assert_close(b.run(**feeds)[0], ort_run(second, feeds)[0], rtol=1e-3, atol=1e-4)
    assert_close(a.run(**feeds)[0], want_a, rtol=0, atol=0)  # the first model, still loaded, is unchanged


def _one_conv(data):
    """A conv with relu on the same input as `data` (NCHW), its own output shape: a second, different model."""
    import onnx

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("one_conv", seed=1)
    n, c, h, w = (d.dim_value for d in data.type.tensor_type.shape.dim)
    y = g.op("Relu", [g.op("Conv", [data.name, g.weight((4, c, 3, 3), c * 9, "w")], kernel_shape=[3, 3],
                           pads=[1] * 4)])
    return g.model([data], [(y, onnx.TensorProto.FLOAT, [n, 4, h, w])])


def fire_modules(size: int = 16, channels: int = 32):
    """Two SqueezeNet fire modules: squeeze 1x1, then 1x1 and 3x3 expands joined by a channel concat."""
    import onnx

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("fire", seed=0)
    x, c = "x", channels
    for _ in range(2):
        s = g.conv_bn(x, c, 16, 1)
        x = g.op("Concat", [g.conv_bn(s, 16, 32, 1), g.conv_bn(s, 16, 32, 3)], axis=1)
        c = 64
    y = g.conv_bn(x, 64, 16, 1)
    inp = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, size, size])
    return g.model([inp], [(y, onnx.TensorProto.FLOAT, [1, 16, size, size])])


def test_concat_inputs_write_in_place(tmp_path):
    """Each expand conv writes its half of the concat directly: the concats cost no kernel, and the answer holds
    (NCHW16c on AVX-512 and NCHW8c on AVX2, where the offsets differ)."""
    model = fire_modules()
    feeds = model_builders.random_feeds(model, seed=2)
    want = ort_run(model, feeds)[0]
    for target in ("native", "x86-avx2"):
        report = kiln.compile(model, tmp_path / f"{target}.so", kiln.Options(target=target))
        m = kiln.load(report.path)
        assert not any(s["ops"] == ["concatenate"] for s in m.meta["steps"])
        offsets = sorted({v.get("offset", 0) for v in m.meta["values"] if v["kind"] == "block"})
        assert len(offsets) > 1  # the second expand of each fire module writes behind the first
        assert_close(m.run(**feeds)[0], want, rtol=1e-3, atol=1e-4)


def test_grouped_conv_compiles_blocked_and_matches(tmp_path):
    """AlexNet-style groups=2 convs of whole 16-channel blocks run the NCHWc template, not the NCHW fallback."""
    import onnx

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("grouped", seed=3)
    y = g.conv_bn("x", 32, 64, 3)
    y = g.conv_bn(y, 64, 96, 3, groups=2)
    y = g.conv_bn(y, 96, 64, 1, groups=2)
    model = g.model([onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 13, 13])],
                    [(y, onnx.TensorProto.FLOAT, [1, 64, 13, 13])])
    feeds = model_builders.random_feeds(model, seed=4)
    m = kiln.load(kiln.compile(model, tmp_path / "g.so").path)  # groups of 32-48 channels: whole blocks of 8 or 16
    convs = [s["schedule"] for s in m.meta["steps"] if s["ops"][0].startswith("nn.conv2d")]
    # the ungrouped 3x3 may take Winograd (it does on AVX2's tiles); the grouped two must be blocked, not NCHW
    assert len(convs) == 3 and all(s.startswith(("nchwc(", "winograd(")) for s in convs), convs
    assert sum(s.startswith("nchwc(") for s in convs) >= 2, convs
    assert_close(m.run(**feeds)[0], ort_run(model, feeds)[0], rtol=1e-3, atol=1e-4)


def test_lowering_refuses_a_compute_whose_dtype_is_not_its_type():
    # a kernel writing float64 (or float32) into a buffer planned for float32 (or float16) would overrun it;
    # TVM's own argument check catches that only at run time and only for a group's output
    from kiln.codegen.lower import lower_group
    from kiln.codegen.target import resolve_target
    from kiln.errors import CodegenError
    from kiln.ir import Call
    from kiln.ir.ops.elementwise import RELU

    from ..groups import group, params

    ps = params(((4, 8), "float32"))
    fn = group(ps, Call(RELU, (ps[0],), RELU.attrs_type()))
    right = RELU.compute
    object.__setattr__(RELU, "compute", lambda x, a: _as_f64(x))
    try:
        with pytest.raises(CodegenError, match=r"nn.relu .*gives float64 where its type says float32"):
            lower_group(fn, "main", resolve_target("x86-avx2"))
    finally:
        object.__setattr__(RELU, "compute", right)


def _as_f64(x):
    from tvm import te

    return te.compute(x.shape, lambda *i: x(*i).astype("float64"), name="wrong")


def test_a_kernel_tvm_refuses_is_named_in_the_error(tmp_path, monkeypatch):
    """When tvm.compile fails on the module, each kernel is compiled alone to name the failing one (its layer
    and ops), so the error points at the model, not only at TVM's internals."""
    import tvm

    from kiln.errors import CodegenError

    real = tvm.compile

    def refuses_k1(mod, *a, **k):
        if any(gv.name_hint == "kiln_k1" for gv in mod.get_global_vars()):
            raise RuntimeError("Check failed: injected")
        return real(mod, *a, **k)

    monkeypatch.setattr(tvm, "compile", refuses_k1)
    with pytest.raises(CodegenError, match=r"(?s)injected.*in kernel kiln_k1 \(layer '[^']+': \S+"):
        kiln.compile(model_builders.resnet18(size=32), tmp_path / "m.so")
