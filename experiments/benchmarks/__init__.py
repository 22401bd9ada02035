"""Benchmarks: one absl program each (`python -m experiments.benchmarks.NAME`)."""

from absl import flags


def shared_flag(name: str, define):
  """The flag `name` if another benchmark imported in this process defined it (tests import
  several), else `define()`'s. Either reads `.value`; only a benchmark's own `main`, run alone,
  reads it, so its own definition is the one in force there."""
  return flags.FLAGS[name] if name in flags.FLAGS else define()
