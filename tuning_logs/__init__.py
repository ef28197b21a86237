"""Tuning records that ship with Kiln, as JSON lines under tuning_logs/<target>/."""
