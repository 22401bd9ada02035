"""`local_python`: the Python toolchain is an interpreter already on this machine.

archlab's third-party packages (jax, flax, pytest, ...) come from that interpreter's
site-packages, installed with `pip install -r requirements-test.txt`; Bazel downloads nothing.
The interpreter is `$ARCHLAB_PYTHON` when set (e.g. a venv's `bin/python`), else `python3` on
PATH, resolved to the `sys.executable` it reports (so a pyenv shim or an activated venv work).
"""

_CHECK = "import sys, jax, pytest; print(sys.executable)"

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
    stub_shebang = "#!{interpreter}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _local_python_impl(ctx):
    requested = ctx.os.environ.get("ARCHLAB_PYTHON", "")
    python = requested or ctx.which("python3")
    if not python:
        fail("archlab: no python3 on PATH; set ARCHLAB_PYTHON to the interpreter that has " +
             "requirements-test.txt installed")
    result = ctx.execute([python, "-c", _CHECK])
    if result.return_code != 0:
        fail(("archlab: the python `{}` cannot import jax and pytest; run " +
              "`{} -m pip install -r requirements-test.txt` or set ARCHLAB_PYTHON to the " +
              "interpreter that has them.\n{}").format(python, python, result.stderr))
    interpreter = result.stdout.strip()
    ctx.file("WORKSPACE", "workspace(name = \"{}\")\n".format(ctx.name))
    ctx.file("BUILD.bazel", _BUILD.format(interpreter = interpreter))

local_python = repository_rule(
    implementation = _local_python_impl,
    environ = ["ARCHLAB_PYTHON", "PATH"],
    local = True,
    doc = "A py_runtime toolchain for the local interpreter that has archlab's requirements.",
)
