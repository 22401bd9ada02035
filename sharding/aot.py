"""Ahead-of-time pod plans: compiles the real training step for a TPU topology on this machine.

  python -m sharding.aot --config=configs/transformer.py:preset=llama_small --topology=v5p:2x2x1

libtpu (an optional requirement: `pip install -r requirements-tpu.txt`) describes the
topology's chips without any TPU present; the step of trainer/loop.py is lowered with abstract
arrays carrying their shardings on that mesh and compiled by the TPU compiler. The plan prints
memory per chip against the chip's HBM, FLOPs per step, the collectives in the compiled HLO
and a verdict: "fits" or "does not fit (needs X GiB of Y GiB per chip)". No data is read and
no array is allocated, so a plan for a pod takes seconds to minutes on a laptop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys

import errors

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation."""
  hbm_per_device: float  # bytes of HBM the TPU compiler lets one jax device use
  peak_bf16: float       # FLOP/s per chip
  dims: int              # topology dimensions: 3 (3D torus) or 2 (2D torus)


# HBM: what the TPU compiler of libtpu 0.0.42.1 reports as available per device when a program
# does not fit (measured with this module). Google's TPU pages state per chip v4 32 GiB (two
# TensorCores, which libtpu's compile-only topology shows as two devices of 15.25 GiB each),
# v5e 16 GB, v5p 95 GB, v6e 32 GB; peak bf16 per chip 275, 197, 459 and 918 TFLOP/s.
CHIPS = {
    'v4': Chip(15.25 * GiB, 275e12, 3),
    'v5e': Chip(15.75 * GiB, 197e12, 2),
    'v5p': Chip(95.74 * GiB, 459e12, 3),
    'v6e': Chip(31.25 * GiB, 918e12, 2),
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_COLLECTIVE_RE = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
LIBTPU_HINT = ('libtpu is not installed: pip install -r requirements-tpu.txt '
               '(libtpu==0.0.42.*, the version jax[tpu]==0.10.2 pins)')


class PlanError(errors.ConfigError):
  """A bad flag or a layout the topology cannot hold; the message is one line."""


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
  """`'v5p:2x2x1'` -> `('v5p', (2, 2, 1))`, with one-line errors naming --topology."""
  match = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', text.strip().lower())
  if not match:
    raise PlanError(f'--topology={text!r} is not CHIP:AxB[xC], e.g. v5p:2x2x1 or v5e:4x4')
  chip, dims = match.group(1), tuple(int(d) for d in match.group(2).split('x'))
  if chip not in CHIPS:
    raise PlanError(f'--topology={text!r}: unknown chip {chip!r}; one of {", ".join(CHIPS)}')
  if len(dims) != CHIPS[chip].dims:
    example = 'x'.join(['2'] * (CHIPS[chip].dims - 1) + ['1' if CHIPS[chip].dims == 3 else '2'])
    raise PlanError(f'--topology={text!r}: {chip} topologies have {CHIPS[chip].dims} dimensions, '
                    f'e.g. {chip}:{example}')
  if min(dims) < 1:
    raise PlanError(f'--topology={text!r}: every dimension must be at least 1')
  return chip, dims


def libtpu_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('libtpu') is not None or bool(os.environ.get('TPU_LIBRARY_PATH'))


def topology_devices(chip: str, dims: tuple[int, ...]) -> list:
  """The topology's compile-only devices (no TPU needed; libtpu must be installed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = f'{chip}:{"x".join(map(str, dims))}'
  # Hosts hold 2x2x1 chips (libtpu's default); a slice smaller than that is one host.
  dims3 = tuple(dims) + (1,) * (3 - len(dims))
  host_bounds = tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1)))
  try:
    # libtpu warns on stderr that this is no TPU VM (no accelerator type, no worker hosts):
    # true and expected here, so its start-up chatter is dropped.
    with _quiet_stderr():
      topology = topologies.get_topology_desc(name, 'tpu', chips_per_host_bounds=host_bounds)
    return list(topology.devices)
  except (RuntimeError, jax.errors.JaxRuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PlanError(f'--topology={name}: libtpu rejected it: {first}') from None


@contextlib.contextmanager
def _quiet_stderr():
  """Sends file descriptor 2 (where C++ libraries log) to /dev/null for the block."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions in HLO text, async `-start` forms counted once, `-done` not."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for match in _COLLECTIVE_RE.finditer(hlo_text):
    counts[match.group(1)] += 1
  return counts


def build_step(config, devices):
  """The training step of trainer/step.py on a mesh over `devices`, with abstract inputs.

  Returns (jitted train step, abstract state, abstract batch, mesh, rules, info) where the
  abstract arrays are ShapeDtypeStructs carrying their shardings.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import models  # pylint: disable=g-import-not-at-top
  from input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from models import objectives  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top
  from trainer import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from trainer import init_from as init_from_lib  # pylint: disable=g-import-not-at-top
  from trainer import step as step_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config.to_dict())
  if config.get('init_from'):
    init_from_lib.prepare(config)
  t = config.train
  if t.batch_size <= 0 or t.batch_size % t.grad_accum:
    raise PlanError(f'train.batch_size={t.batch_size} must be a positive multiple of '
                    f'train.grad_accum={t.grad_accum}')
  try:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
  except AssertionError:  # v4: mesh_utils wants one device per chip ("megacore")
    shape = mesh_lib.mesh_shape(config.mesh, len(devices))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(shape), rules_lib.MESH_AXES)
  rules = rules_lib.get_rules(config.sharding_rules)
  rows = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  if t.batch_size % rows:
    raise PlanError(f'train.batch_size={t.batch_size} must divide by the batch mesh axes '
                    f'data x fsdp x expert = {rows} (config.mesh {dict(mesh.shape)})')
  vocab = _tokenizer_vocab(config.data, tokenizer_lib)
  if config.model.vocab_size == 0:
    config.model.vocab_size = vocab
  model = models.build(config.model)
  # Only the shape matters for the plan: the byte counts feed the bits-per-byte metric.
  objective = objectives.build(config, objectives.Tokens(
      bytes_V=jnp.ones((config.model.vocab_size,), jnp.float32)))
  fns = step_lib.jit_functions(config, model, objective, mesh, rules)
  params = flops_lib.count_params(nn.meta.unbox(fns.abstract)['params'])
  info = dict(params=params['params'], tokens_per_step=fns.tokens_per_step,
              analytic_flops_per_step=fns.train_flops_per_token * fns.tokens_per_step,
              scan_layers=bool(config.model.scan_layers))
  return (fns.train_step, fns.abstract_state(),
          fns.abstract_batch(t.batch_size, config.data.seq_len), mesh, rules, info)


def _tokenizer_vocab(data_config, tokenizer_lib) -> int:
  """The vocabulary size the run's tokenizer will have, without reading the corpus."""
  if data_config.tokenizer_path:
    if not os.path.isfile(data_config.tokenizer_path):
      raise PlanError(f'data.tokenizer_path={data_config.tokenizer_path!r}: no such file')
    return tokenizer_lib.load_tokenizer(data_config.tokenizer_path).vocab_size
  if data_config.tokenizer == 'bpe':
    return data_config.bpe_vocab_size
  return tokenizer_lib.ByteTokenizer().vocab_size


def plan(config, topology: str) -> dict:
  """Compiles the training step for `topology` and returns the numbers the report prints."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  chip_name, dims = parse_topology(topology)
  chip = CHIPS[chip_name]
  devices = topology_devices(chip_name, dims)
  chips = math.prod(dims)
  devices_per_chip = len(devices) // chips  # v4 shows each chip's two TensorCores as devices
  hbm_per_chip = chip.hbm_per_device * devices_per_chip
  train_jit, state, batch, mesh, rules, info = build_step(config, devices)
  result = dict(topology=f'{chip_name}:{"x".join(map(str, dims))}', chip=chip_name,
                device_kind=devices[0].device_kind, chips=chips, devices=len(devices),
                hosts=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
                hbm_per_chip=hbm_per_chip, **info)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = train_jit.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      # The TPU compiler refuses a program that cannot fit in HBM at all; its message says
      # how much the program needs per device.
      first = str(e).strip().splitlines()[0]
      needed = re.search(r'\(([\d.]+)G\) exceeds available HBM', first)
      return dict(result, fits=False, compile_error=first, needed_per_chip=(
          float(needed.group(1)) * GiB * devices_per_chip if needed else None))
  memory = compiled.memory_analysis()
  per_device = dict(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                    aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                    generated_code=memory.generated_code_size_in_bytes)
  # Donated state: outputs aliased to arguments occupy HBM once.
  per_device['total'] = (per_device['arguments'] + per_device['outputs'] - per_device['aliased']
                         + per_device['temporaries'] + per_device['generated_code'])
  per_chip = {k: v * devices_per_chip for k, v in per_device.items()}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  xla_flops = float(cost['flops']) * len(devices) if cost and 'flops' in cost else None
  return dict(result, memory_per_chip=per_chip, fits=per_chip['total'] <= hbm_per_chip,
              xla_flops_per_step=xla_flops, peak_flops=chip.peak_bf16 * chips,
              collectives=count_collectives(compiled.as_text()))


def _gib(x: float) -> str:
  return f'{x / GiB:.2f} GiB'


def _size(x: float) -> str:
  """Bytes in GiB, or MiB / KiB when smaller than a tenth of a GiB."""
  for unit, scale in (('GiB', GiB), ('MiB', 2**20), ('KiB', 2**10)):
    if x >= 0.1 * scale or unit == 'KiB':
      return f'{x / scale:.2f} {unit}'


def _duration(seconds: float) -> str:
  for unit, scale in (('s', 1.0), ('ms', 1e-3), ('us', 1e-6)):
    if seconds >= scale or unit == 'us':
      return f'{seconds / scale:.2f} {unit}'


def format_plan(p: dict) -> str:
  mesh = ' '.join(f'{k}={v}' for k, v in p['mesh'].items())
  lines = [
      f"topology {p['topology']}: {p['chips']} chips ({p['device_kind']}), {p['devices']} devices, "
      f"{p['hosts']} hosts; mesh {mesh}",
      f"model: {p['params']:,} parameters; {p['tokens_per_step']:,} tokens per step",
  ]
  if 'compile_error' in p:
    lines.append(f"the TPU compiler refused the step: {p['compile_error']}")
    needs = _gib(p['needed_per_chip']) if p['needed_per_chip'] else 'more than'
    lines.append(f"verdict: does not fit (needs {needs} of {_gib(p['hbm_per_chip'])} per chip)")
    return '\n'.join(lines)
  m = p['memory_per_chip']
  lines += [
      'memory per chip (compiled.memory_analysis):',
      f"  arguments      {_size(m['arguments'])}",
      f"  outputs        {_size(m['outputs'])} ({_size(m['aliased'])} aliased to donated arguments)",
      f"  temporaries    {_size(m['temporaries'])}",
      f"  generated code {_size(m['generated_code'])}",
      f"  total          {_size(m['total'])} of {_gib(p['hbm_per_chip'])} HBM "
      f"({100 * m['total'] / p['hbm_per_chip']:.1f}%)",
  ]
  analytic = p['analytic_flops_per_step']
  seconds = analytic / p['peak_flops']
  lines.append(f'FLOPs per step: {analytic:.3e} analytic (3 x forward, trainer/flops.py); at the chips\' bf16 '
               f'peak >= {_duration(seconds)} per step')
  if p['xla_flops_per_step']:
    note = (' (scanned layers: XLA counts the repeated block once)' if p['scan_layers'] else '')
    lines.append(f"FLOPs per step: {p['xla_flops_per_step']:.3e} from compiled.cost_analysis, "
                 f'all chips{note}')
  lines.append('collectives in the compiled step (HLO instructions; a scanned body counts once): '
               + ', '.join(f'{k} {v}' for k, v in p['collectives'].items()))
  if p['fits']:
    lines.append(f"verdict: fits ({_size(m['total'])} of {_gib(p['hbm_per_chip'])} per chip)")
  else:
    lines.append(f"verdict: does not fit (needs {_gib(m['total'])} of "
                 f"{_gib(p['hbm_per_chip'])} per chip)")
  return '\n'.join(lines)


def main(argv=None) -> None:
  # The plan compiles for TPU but runs nothing: keep jax on the CPU and libtpu off the
  # metadata server (there is no TPU VM here).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  # libtpu takes /tmp/libtpu_lockfile for the process's life; a compile-only use need not
  # wait for another process holding it (any jax process started without JAX_PLATFORMS=cpu).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Config file with arguments, e.g. configs/transformer.py:preset=llama_small',
      lock_config=True)
  topology_flag = flags.DEFINE_string('topology', None, 'TPU topology CHIP:AxB[xC], CHIP one of '
                                      + ', '.join(CHIPS) + ' (e.g. v5p:4x4x4)')
  flags.mark_flags_as_required(['config', 'topology'])

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    try:
      parse_topology(topology_flag.value)
      if not libtpu_installed():
        sys.exit(f'sharding.aot: error: {LIBTPU_HINT}')
      print(format_plan(plan(config_flag.value, topology_flag.value)))
    except (PlanError, ValueError) as e:
      if os.environ.get('ARCHLAB_DEBUG'):
        raise
      sys.exit(f'sharding.aot: error: {str(e).strip().splitlines()[0]}')

  app.run(run, argv=argv, flags_parser=errors.flags_parser('sharding.aot'))


if __name__ == '__main__':
  main()
