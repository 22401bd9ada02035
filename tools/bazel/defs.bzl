"""`pytest_test`: a py_test that runs one tests/test_*.py file with pytest."""

def pytest_test(name, src = None, deps = [], data = [], env = {}, cpu_devices = None, **kwargs):
    """A py_test running `src` (default `<name>.py`) through tools/bazel/pytest_main.py.

    Args:
      name: target name, by convention the test file's name without `.py`.
      src: the test file; defaults to `name + ".py"`.
      deps: py_library targets the test imports (tests/conftest.py comes with //tests:conftest).
      data: files or binaries the test reads or runs.
      env: extra environment variables.
      cpu_devices: if set, XLA_FLAGS forces this many host (CPU) devices for the test process.
      **kwargs: passed on to py_test (size, timeout, tags, ...).
    """
    src = src or name + ".py"
    env = dict(env)

    # Imports resolve in the runfiles tree only, never in the script's real directory, so a
    # missing dependency fails here instead of passing through the source tree.
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if cpu_devices:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d" % cpu_devices
    native.py_test(
        name = name,
        srcs = [src, "//tools/bazel:pytest_main.py"],
        main = "//tools/bazel:pytest_main.py",
        args = ["$(rootpath %s)" % src],
        data = ["//:pytest.ini"] + data,
        deps = deps,
        env = env,
        **kwargs
    )
