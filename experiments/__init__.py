"""Sweeps, scaling-law fits, reports, conversion and benchmarks."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version() -> str:
  """The git commit of the checkout, '+uncommitted' when the tree has changes, or 'unknown'."""
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain'], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return head + ('+uncommitted' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
