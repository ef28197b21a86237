from pathlib import Path

import pytest

from kiln.config import Options, parse_input_shapes
from kiln.errors import KilnError


def test_explicit_values_beat_the_environment(monkeypatch):
    monkeypatch.setenv("KILN_OPT_LEVEL", "1")
    monkeypatch.setenv("KILN_DUMP_IR", "/tmp/dumps")
    assert Options.from_env().opt_level == 1
    assert Options.from_env().dump_dir == Path("/tmp/dumps")
    assert Options.from_env(opt_level=3).opt_level == 3


def test_bad_values_are_user_errors(monkeypatch):
    monkeypatch.setenv("KILN_OPT_LEVEL", "fast")
    with pytest.raises(KilnError, match="KILN_OPT_LEVEL"):
        Options.from_env()
    with pytest.raises(KilnError, match="0..3"):
        Options(opt_level=7)


def test_parse_input_shapes():
    assert parse_input_shapes(["data=1,3,224,224", "ids=N,128"]) == {"data": (1, 3, 224, 224), "ids": ("N", 128)}
    with pytest.raises(KilnError, match="name=d0"):
        parse_input_shapes(["1,3,224"])
