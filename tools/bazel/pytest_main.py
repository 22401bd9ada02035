"""Runs one test file under pytest as a `bazel test` target (see defs.bzl `pytest_test`).

Bazel starts this in the runfiles tree of the workspace, whose root holds pytest.ini, so
pytest picks the same rootdir, `pythonpath = .`, options and tests/conftest.py as a plain
`pytest` run. The test file comes as the first argument; temporary paths go under the test's
TEST_TMPDIR and the JUnit XML to where Bazel collects it.
"""

import os
import sys

import pytest


def main(argv):
  args = ['-q', *argv]
  if 'TEST_TMPDIR' in os.environ:
    args.append(f'--basetemp={os.path.join(os.environ["TEST_TMPDIR"], "pytest")}')
  if 'XML_OUTPUT_FILE' in os.environ:
    args.append(f'--junitxml={os.environ["XML_OUTPUT_FILE"]}')
  return pytest.main(args)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
