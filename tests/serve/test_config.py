"""config.json parsing: defaults, policies, and errors that name the field."""

from __future__ import annotations

import json

import pytest
from kiln.serve.config import ConfigError, ModelConfig, VersionPolicy, parse_config, read_config


def test_defaults_and_overrides():
    cfg = parse_config({"max_batch_size": 4, "version_policy": {"specific": {"versions": [3, 1]}},
                        "traffic_split": {"1": 1, "3": 2}}, "t")
    assert cfg.max_batch_size == 4 and cfg.max_queue_delay_ms == ModelConfig().max_queue_delay_ms
    assert cfg.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert cfg.traffic_split == {1: 1.0, 3: 2.0}
    assert parse_config({"dynamic_batching": False}, "t", cfg).max_batch_size == 4  # over a base


@pytest.mark.parametrize("raw, field", [
    ({"max_batch_size": 0}, "'max_batch_size' must be an integer in 1..65536, got 0"),
    ({"max_batch_size": "8"}, "'max_batch_size' must be an integer"),
    ({"max_queue_delay_ms": -1}, "'max_queue_delay_ms' must be a number in 0..60000, got -1"),
    ({"version_policy": {"newest": {}}}, "unknown version_policy 'newest'"),
    ({"version_policy": {"specific": {"versions": []}}}, "'version_policy.specific.versions'"),
    ({"traffic_split": {"one": 1}}, "'traffic_split' entry 'one'"),
    ({"batch_size": 4}, "unknown field(s) ['batch_size']"),
])
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(raw, "m/config.json")
    assert field in str(info.value) and str(info.value).startswith("m/config.json")


def test_policies_choose_versions():
    assert VersionPolicy("latest", num_versions=2).candidates([1, 3, 2]) == [3, 2, 1]
    assert VersionPolicy("latest", num_versions=2).wanted([1, 2, 3]) == 2
    assert VersionPolicy("specific", versions=(1, 5)).candidates([1, 2]) == [1]
    assert VersionPolicy("all").wanted([1, 2, 3]) == 3


# Values that were accepted and then broke serving (issue 13): a delay of NaN, Infinity or 1e300 ms killed the
# batch worker (every request hung), an infinite weight made every unversioned request fail, and `true` passed
# for an integer everywhere. Each must be refused, naming the field.
@pytest.mark.parametrize("raw, field", [
    ({"max_queue_delay_ms": float("nan")}, "'max_queue_delay_ms'"),
    ({"max_queue_delay_ms": float("inf")}, "'max_queue_delay_ms'"),
    ({"max_queue_delay_ms": 1e300}, "'max_queue_delay_ms'"),
    ({"max_batch_size": float("nan")}, "'max_batch_size'"),
    ({"max_batch_size": 1e300}, "'max_batch_size'"),
    ({"max_batch_size": True}, "'max_batch_size'"),
    ({"max_batch_size": 2.5}, "'max_batch_size' must be an integer"),
    ({"max_queue_size": float("inf")}, "'max_queue_size'"),
    ({"max_queue_size": 10 ** 30}, "'max_queue_size'"),
    ({"batch_buckets": [True]}, "'batch_buckets'"),
    ({"batch_buckets": [1, 1e300]}, "'batch_buckets'"),
    ({"batch_buckets": [1, 10 ** 9]}, "'batch_buckets'"),
    ({"traffic_split": {"1": float("inf")}}, "'traffic_split' entry '1'"),
    ({"traffic_split": {"1": float("nan")}}, "'traffic_split' entry '1'"),
    ({"traffic_split": {"1": 1e300}}, "'traffic_split' entry '1'"),
    ({"traffic_split": {"1": True}}, "'traffic_split' entry '1'"),
    ({"traffic_split": {"²": 1}}, "'traffic_split' entry '²'"),
    ({"traffic_split": {"99999999999": 1}}, "'traffic_split' entry '99999999999'"),
    ({"version_policy": {"latest": {"num_versions": float("inf")}}}, "'num_versions'"),
    ({"version_policy": {"latest": {"num_versions": True}}}, "'num_versions'"),
    ({"version_policy": {"latest": []}}, "'version_policy.latest' must be an object"),
    ({"version_policy": {"specific": {"versions": [True]}}}, "'version_policy.specific.versions'"),
    ({"version_policy": {"specific": {"versions": [2 ** 40]}}}, "'version_policy.specific.versions'"),
])
def test_non_finite_huge_and_bool_values_are_refused(raw, field):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "m/config.json")
    assert field in str(info.value) and str(info.value).startswith("m/config.json")


def test_bounds_are_inclusive():
    cfg = parse_config({"max_queue_delay_ms": 60_000, "max_batch_size": 65536, "batch_buckets": [1, 65536],
                        "traffic_split": {"1": 1e6, "2": 0}}, "t")
    assert (cfg.max_queue_delay_ms, cfg.max_batch_size, cfg.batch_buckets) == (60_000.0, 65536, (1, 65536))
    assert cfg.traffic_split == {1: 1e6, 2: 0.0}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_config_json_refuses_nan_and_infinity_literals(tmp_path, literal):
    (tmp_path / "config.json").write_text(f'{{"max_queue_delay_ms": {literal}}}')
    assert json.loads(f"[{literal}]")  # Python's json takes them: the reader must refuse them itself
    with pytest.raises(ConfigError, match=f"not valid JSON.*{literal}"):
        read_config(tmp_path)
