"""config.json parsing: defaults, policies, and errors that name the field."""

from __future__ import annotations

import pytest
from kiln.serve.config import ConfigError, ModelConfig, VersionPolicy, parse_config


def test_defaults_and_overrides():
    cfg = parse_config({"max_batch_size": 4, "version_policy": {"specific": {"versions": [3, 1]}},
                        "traffic_split": {"1": 1, "3": 2}}, "t")
    assert cfg.max_batch_size == 4 and cfg.max_queue_delay_ms == ModelConfig().max_queue_delay_ms
    assert cfg.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert cfg.traffic_split == {1: 1.0, 3: 2.0}
    assert parse_config({"dynamic_batching": False}, "t", cfg).max_batch_size == 4  # over a base


@pytest.mark.parametrize("raw, field", [
    ({"max_batch_size": 0}, "'max_batch_size' must be ≥ 1"),
    ({"max_batch_size": "8"}, "'max_batch_size' must be an integer"),
    ({"max_queue_delay_ms": -1}, "'max_queue_delay_ms' must be ≥ 0"),
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
