"""The Bazel BUILD files keep up with the code: every module in a target, every test a py_test.

BUILD files (and the .bzl macros they load) are executed as Python with stub rules that record
each target, so this runs in well under a second without Bazel. It reads the real source tree
(under `bazel test` too, through the runfiles links), not the files a target declared.
"""

import ast
import fnmatch
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# Directories whose Python files must all belong to a target (recursively), besides the
# top-level *.py files such as train.py.
PACKAGE_DIRS = ('configs', 'experiments', 'input_pipeline', 'models', 'sharding', 'tests',
                'tools', 'trainer')
BUILD_NAMES = ('BUILD', 'BUILD.bazel')
PY_RULES = ('py_library', 'py_binary', 'py_test')
OTHER_RULES = ('alias', 'exports_files', 'filegroup', 'genrule', 'licenses', 'package',
               'sh_binary', 'sh_library', 'sh_test', 'test_suite')
DEVICE_COUNT = re.compile(r'--xla_force_host_platform_device_count=(\d+)')


def _skip_dir(name):
  return name.startswith(('.', 'bazel-')) or name in ('__pycache__', 'node_modules')


def _walk(top):
  """Yields (directory relative to ROOT, file names), not entering other Bazel workspaces."""
  for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
    rel = os.path.relpath(dirpath, ROOT)
    rel = '' if rel == '.' else rel
    if rel and ('WORKSPACE' in filenames or 'WORKSPACE.bazel' in filenames):
      dirnames[:] = []
      continue
    dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
    yield rel, filenames


def python_files():
  files = {f for f in os.listdir(ROOT) if f.endswith('.py')}
  for top in PACKAGE_DIRS:
    for rel, names in _walk(top):
      files.update(os.path.join(rel, n) for n in names if n.endswith('.py'))
  return files


class Target:

  def __init__(self, kind, package, attrs):
    self.kind, self.package, self.name = kind, package, attrs['name']
    self.label = f'//{package}:{self.name}'
    self.attrs = attrs
    self.srcs = [self.resolve_file(s) for s in attrs.get('srcs', [])]
    self.deps = [self.resolve_label(d) for d in attrs.get('deps', [])]

  def resolve_label(self, label):
    if label.startswith(':'):
      return f'//{self.package}{label}'
    if label.startswith('//') and ':' not in label:
      return f'{label}:{label.rsplit("/", 1)[-1]}'
    if not label.startswith('//'):
      return f'//{self.package}:{label}'
    return label

  def resolve_file(self, label):
    package, name = self.resolve_label(label)[2:].split(':')
    return os.path.join(package, name)


class BuildFiles:
  """Every target of the workspace's BUILD files, by label, recorded by executing them."""

  def __init__(self):
    self.targets = {}
    self.packages = set()
    self._package = None
    self._bzl_cache = {}
    self._closures = {}
    for rel, names in _walk(''):
      build = next((n for n in BUILD_NAMES if n in names), None)
      if build:
        self.packages.add(rel)
        self._package = rel
        self._exec(os.path.join(rel, build), self._globals())

  def _record(self, kind):
    def rule(**attrs):
      target = Target(kind, self._package, attrs)
      assert target.label not in self.targets, f'{target.label} is defined twice'
      self.targets[target.label] = target
    return rule

  def _glob(self, include, exclude=(), **kwargs):
    del kwargs
    base = os.path.join(ROOT, self._package)
    found = []
    for rel, names in _walk(self._package):
      for n in names:
        path = os.path.relpath(os.path.join(ROOT, rel, n), base)
        if any(fnmatch.fnmatch(path, p) for p in include) and not any(
            fnmatch.fnmatch(path, p) for p in exclude):
          found.append(path)
    return sorted(found)

  def _rules(self):
    """Python rules are recorded; other rules and BUILD functions are accepted and ignored."""
    rules = {kind: self._record(kind) for kind in PY_RULES}
    rules.update({kind: lambda *args, **kwargs: None for kind in OTHER_RULES})
    rules.update(glob=self._glob, package_name=lambda: self._package)
    return rules

  def _globals(self):
    namespace = dict(self._rules(), select=lambda d: d.get('//conditions:default', []))

    def load(label, *symbols, **aliases):
      module = self._load_bzl(label)
      for s in symbols:
        namespace[s] = module[s]
      for alias, s in aliases.items():
        namespace[alias] = module[s]

    namespace['load'] = load
    return namespace

  def _load_bzl(self, label):
    assert label.startswith('//'), f'only this workspace\'s .bzl files can be read: {label}'
    package, name = label[2:].split(':')
    path = os.path.join(package, name)
    if path not in self._bzl_cache:
      native = type('native', (), {k: staticmethod(v) for k, v in self._rules().items()})
      module = {'native': native, 'fail': self._fail}
      self._exec(path, module)
      self._bzl_cache[path] = module
    return self._bzl_cache[path]

  @staticmethod
  def _fail(message):
    raise AssertionError(message)

  @staticmethod
  def _exec(path, namespace):
    with open(os.path.join(ROOT, path)) as f:
      exec(compile(f.read(), path, 'exec'), namespace)  # pylint: disable=exec-used

  def closure(self, label):
    """The source files of a target and of everything it depends on, transitively."""
    if label not in self._closures:
      files, seen, stack = set(), set(), [label]
      while stack:
        current = stack.pop()
        if current in seen or current not in self.targets:
          continue
        seen.add(current)
        files.update(self.targets[current].srcs)
        stack.extend(self.targets[current].deps)
      self._closures[label] = files
    return self._closures[label]


@pytest.fixture(scope='module')
def build():
  return BuildFiles()


def _owners(build):
  owners = {}
  for target in build.targets.values():
    for src in target.srcs:
      owners.setdefault(src, []).append(target)
  return owners


def test_every_module_is_in_a_target(build):
  owners = _owners(build)
  missing = sorted(f for f in python_files() if f not in owners)
  assert not missing, f'Python files in no BUILD target\'s srcs (add a py_library): {missing}'


def test_every_test_file_has_a_py_test(build):
  tested = {s for t in build.targets.values() if t.kind == 'py_test' for s in t.srcs}
  tests = {f for f in python_files() if re.fullmatch(r'tests/(.*/)?test_[^/]*\.py', f)}
  missing = sorted(tests - tested)
  assert not missing, f'test files with no py_test in tests/BUILD (add a pytest_test): {missing}'


def test_srcs_exist_and_belong_to_their_package(build):
  for target in build.targets.values():
    for label in target.attrs.get('srcs', []):
      src = target.resolve_file(label)
      assert os.path.isfile(os.path.join(ROOT, src)), f'{target.label}: no file {src}'
      package = os.path.dirname(src)  # the file's package: its nearest directory with a BUILD
      while package and package not in build.packages:
        package = os.path.dirname(package)
      assert target.resolve_label(label)[2:].split(':')[0] == package, (
          f'{target.label}: {src} belongs to the package //{package}; name it //{package}:...')


def test_deps_are_defined(build):
  for target in build.targets.values():
    for dep in target.deps:
      assert dep in build.targets, f'{target.label} depends on {dep}, which no BUILD file defines'


def _imported_modules(path):
  """Project module names a file imports (each with its parent packages), anywhere in it."""
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  modules = set()
  for name in names:
    parts = name.split('.')
    for i in range(1, len(parts) + 1):
      modules.add('.'.join(parts[:i]))
  return modules


def _module_file(module):
  base = os.path.join(ROOT, *module.split('.'))
  for path in (os.path.join(base, '__init__.py'), base + '.py'):
    if os.path.isfile(path):
      return os.path.relpath(path, ROOT)
  return None


def test_deps_cover_project_imports(build):
  """A target reaches every project module its files import, except where Bazel can't.

  The exception is an import back into a target that itself depends on the importer (a
  package __init__.py that imports its own modules): that edge would be a cycle.
  """
  owners = _owners(build)
  problems = []
  for target in build.targets.values():
    reach = build.closure(target.label)
    for src in target.srcs:
      for module in sorted(_imported_modules(src)):
        path = _module_file(module)
        if path is None or path in reach or path not in owners:
          continue
        if any(src in build.closure(owner.label) for owner in owners[path]):
          continue  # a cycle through a package __init__.py: the other side holds the edge
        problems.append(f'{target.label}: {src} imports {module} ({path}); add a dep on '
                        f'{" or ".join(o.label for o in owners[path])}')
  assert not problems, '\n'.join(problems)


def test_multi_device_tests_set_their_devices(build):
  """A test file that forces N CPU devices runs in a target whose XLA_FLAGS force N."""
  for target in build.targets.values():
    if target.kind != 'py_test':
      continue
    for src in target.srcs:
      with open(os.path.join(ROOT, src)) as f:
        counts = set(DEVICE_COUNT.findall(f.read()))
      if counts:
        flags = DEVICE_COUNT.findall(target.attrs.get('env', {}).get('XLA_FLAGS', ''))
        assert set(flags) & counts, (
            f'{target.label}: {src} forces {sorted(counts)} CPU devices; give its '
            f'pytest_test cpu_devices=N')
