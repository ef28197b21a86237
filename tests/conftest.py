"""Hypothesis runs derandomized by default, so CI sees the same examples every time and a failure reproduces;
`pytest --hypothesis-profile=explore` draws new random examples (run it when changing a template)."""

from hypothesis import settings

settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, max_examples=200)
settings.load_profile("default")
