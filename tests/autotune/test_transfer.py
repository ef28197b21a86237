"""Transfer learning (autotune/transfer.py): records of other tasks of a template warm-start the xgb tuner, whose
first batch is then model-guided instead of random."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from kiln.autotune.records import Record
from kiln.autotune.transfer import TemplateFeatures, transfer
from kiln.autotune.tuners import make_tuner
from onnx import helper

from kiln.config import Options
from kiln.driver import model_tasks
from kiln.model_builders import GraphBuilder

TARGET = "x86-avx512"


def convs() -> onnx.ModelProto:
    """Two direct convs of different shapes: two tasks of one template."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("convs")
    w1 = g.const(rng.standard_normal((32, 16, 1, 1)).astype(np.float32), "w1")
    w2 = g.const(rng.standard_normal((64, 32, 1, 1)).astype(np.float32), "w2")
    y = g.op("Relu", [g.op("Conv", ["x", w1], kernel_shape=[1, 1])])
    z = g.op("Conv", [y, w2], kernel_shape=[1, 1], strides=[2, 2])
    return g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 28, 28])],
                   [(z, onnx.TensorProto.FLOAT, [1, 64, 14, 14])])


@pytest.fixture(scope="module")
def tasks():
    found = [t for t in model_tasks(convs(), Options(target=TARGET)) if t.template.name == "x86.conv2d_nchwc"]
    assert len(found) == 2 and found[0].key != found[1].key
    return found


def synthetic_cost(cfg) -> float:
    """A cost every task shares the shape of: wide tiles and one loop order are fast."""
    return (1.0 / (1 + cfg.get("tile_ow", 1)) + 1.0 / (1 + cfg.get("tile_oc", 1))
            + (0.3 if cfg.get("rows_outer") else 0.0) + (0.5 if cfg.get("algorithm") != "direct" else 0.0))


def test_columns_mean_the_same_for_every_task_of_a_template(tasks):
    a, b = tasks
    features = TemplateFeatures([a.space(), b.space()], [], [dict(a.workload.dims), dict(b.workload.dims)])
    cfg = a.default()
    va, vb = features.vector(cfg, dict(a.workload.dims)), features.vector(cfg, dict(b.workload.dims))
    differ = {features.columns[i] for i in np.flatnonzero(va != vb)}
    assert differ and all(c.startswith("dim:") for c in differ)  # only the shape columns differ


def test_records_of_another_task_guide_the_first_batch(tasks):
    source, task = tasks
    records = [Record.measured(source.template, source.workload, source.target, c, [synthetic_cost(c)])
               for c in source.space()]
    featurize, history = transfer(task, records)
    assert len(history) == len(records)
    space = list(task.space())
    typical = float(np.median([synthetic_cost(c) for c in space]))
    warm = make_tuner("xgb", task.space(), seed=0, featurize=featurize, history=history).next_batch(8)
    cold = make_tuner("xgb", task.space(), seed=0).next_batch(8)
    assert max(synthetic_cost(c) for c in warm) < typical  # every pick better than the median config
    assert np.mean([synthetic_cost(c) for c in warm]) < np.mean([synthetic_cost(c) for c in cold])


def test_no_records_of_the_template_no_transfer(tasks):
    assert transfer(tasks[0], []) is None
