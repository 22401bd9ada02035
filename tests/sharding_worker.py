"""Sharded training steps on forced CPU devices, in a process of their own, for the sharding tests.

  python -m tests.sharding_worker TASK --out=result.json [--devices=8] [--families=llama,...]

XLA_FLAGS must force the device count before jax is first imported, and tests/conftest.py
imports jax for every test file, so the tests run this module in a subprocess (`run`) and
compare the JSON it writes. Tasks:

  steps        one training step of each `--cases` family:preset pair (default: all) and of
               each family on one device; for dp and fsdp also the compiled step's
               collectives (all-reduce, all-gather, reduce-scatter, ... with result shapes)
  tables       parameter PartitionSpecs per family under fsdp_tp; `--write` rewrites
               tests/sharding_tables/<family>.json (how to regenerate the checked-in tables)
  decode       greedy and sampled generation of `--families` on one device and under each
               `--cases` preset (the batch over the mesh), for the decoding tests
  train        train_and_evaluate in a workdir (`--workdir --mesh --steps`), for the
               reshardable-checkpoint test; also restores `--restore_step` under this mesh

`--setup=module:function` runs a function first: a test that defines its own sublayer
registers it there, and the {name: (preset, overrides)} it returns join FAMILIES.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES_DIR = os.path.join(ROOT, 'tests', 'sharding_tables')


def run(task: str, *args: str, devices: int = 8, timeout: int = 1800) -> dict:
  """Runs a task of this module in a fresh process with `devices` CPU devices; its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS=without_device_count(os.environ.get('XLA_FLAGS', '')))
    cmd = [sys.executable, '-m', 'tests.sharding_worker', task, f'--out={out}',
           f'--devices={devices}', *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if proc.returncode:
      raise AssertionError(f'{" ".join(cmd[2:])} failed:\n{proc.stderr[-4000:]}')
    with open(out) as f:
      return json.load(f)


def without_device_count(xla_flags: str) -> str:
  """XLA_FLAGS less any forced device count (the suite's compile flags stay)."""
  return re.sub(r'--xla_force_host_platform_device_count=\d+', '', xla_flags).strip()


if __name__ == '__main__':  # before jax is imported
  _devices = next((a.split('=')[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ['XLA_FLAGS'] = (f"{without_device_count(os.environ.get('XLA_FLAGS', ''))} "
                             f'--xla_force_host_platform_device_count={_devices}').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'

# pylint: disable=wrong-import-position
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import transformer  # noqa: E402
from configs import common  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer import loop  # noqa: E402

jax.config.update('jax_disable_most_optimizations', True)

# Each family as a tiny model: width 32, 4 heads, one or two repeats of its unit, 16 tokens.
FAMILIES = {
    'gpt2': ('gpt2_tiny', {'model.pattern': 'AFAF'}),
    'llama': ('llama_tiny', {'model.pattern': 'AFAF'}),
    'qwen3': ('qwen3_tiny', {'model.pattern': 'AFAF'}),
    'gpt_oss': ('gpt_oss_tiny', {'model.pattern': 'WEAE', 'model.attention.window': 8,
                                 'model.moe.expert_mlp_dim': 32}),
    'deepseek_v3': ('deepseek_v3_tiny', {
        'model.pattern': 'AFAE', 'model.moe.expert_mlp_dim': 32,
        'model.attention.mla': dict(q_rank=32, kv_rank=16, nope_head_dim=8, rope_head_dim=8,
                                    v_head_dim=8)}),
    # The linear-time mixers with attention and a MoE / an MLP: heads of G (key and value)
    # and of M on `tensor` under fsdp_tp, their convolutions and decays with them.
    'qwen3_next': ('qwen3_next_tiny', {
        'model.pattern': 'GEAE', 'model.head_dim': 8, 'model.moe.expert_mlp_dim': 32,
        'model.moe.shared_expert_mlp_dim': 32,
        'model.deltanet': dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=8)}),
    'nemotron_h': ('nemotron_h_tiny', {'model.pattern': 'MFAF',
                                       'model.mamba': dict(head_dim=8, state_dim=8)}),
    # The attention-ratio hybrids (their pure stacks hold the same mixer parameters).
    'deltanet_hybrid': ('deltanet_hybrid_tiny', {'model.pattern': 'GFAF'}),
    'mamba2_hybrid': ('mamba2_hybrid_tiny', {'model.pattern': 'MFAF',
                                             'model.mamba': dict(head_dim=8, state_dim=8)}),
    # Text diffusion (models/diffusion.py): masked diffusion's noising and stratified t, and
    # block diffusion's rows [x_noisy, x] under its mask, sharded like any training step.
    'mdlm': ('mdlm_tiny', {'model.pattern': 'AFAF'}),
    'bd3lm': ('bd3lm_tiny', {'model.pattern': 'AFAF'}),
}
# The sparse attentions: DSA `S` (its indexer's heads on `tensor` under fsdp_tp) over
# deepseek_v3's MLA, top 8 of 16 tokens; MoBA `B` with blocks of 4, own + 1 earlier.
FAMILIES['deepseek_v32'] = ('deepseek_v32_tiny', dict(
    FAMILIES['deepseek_v3'][1], **{'model.pattern': 'SFSE', 'model.dsa': dict(
        index_heads=4, index_head_dim=8, index_rope_dim=8, topk=8, block=8)}))
FAMILIES['moba'] = ('moba_tiny', {'model.pattern': 'BFBF', 'model.moba': dict(block=4, topk=1)})
# deepseek_v3 with dropless dispatch (sort + ragged_dot) instead of the preset's capacity.
FAMILIES['deepseek_v3_dropless'] = ('deepseek_v3_tiny', dict(
    FAMILIES['deepseek_v3'][1], **{'model.moe.dispatch': 'dropless'}))
# Rules preset -> mesh over 8 devices.
MESHES = {
    'dp': dict(data=8, fsdp=1, tensor=1, expert=1),
    'fsdp': dict(data=1, fsdp=8, tensor=1, expert=1),
    'fsdp_tp': dict(data=1, fsdp=4, tensor=2, expert=1),
    'fsdp_ep': dict(data=1, fsdp=2, tensor=1, expert=4),
}
# Adam's first step is lr * g / (|g| + eps): with the default eps=1e-8, gradient entries near
# zero turn float32 rounding (which differs with the layout) into steps of size lr. eps=1e-6
# keeps the step a smooth function of the gradient, so the comparison sees the sharding.
STEP_FIELDS = {'optim.eps': 1e-6}
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1, expert=1)
# `%name = TYPE op(` with TYPE one array (`f32[8,32]{1,0}`) or a tuple of them.
COLLECTIVE = re.compile(r'= (\([^)]*\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|'
                        r'collective-permute)(?:-start)?\(')
SHAPE = re.compile(r'[a-z]+[0-9]*\[([0-9,]*)\]')


def write_corpus(directory: str) -> str:
  """A small deterministic text corpus (enough rows for the train and validation splits)."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'shard', 'mesh', 'tensor', 'expert', 'layer']
  for i in range(24):
    with open(os.path.join(directory, f'doc{i:02d}.txt'), 'w') as f:
      f.write(' '.join(rng.choice(words, 200)))
  return os.path.join(directory, '*.txt')


def family_config(family: str, corpus_glob: str, *, rules='fsdp', mesh=None, **fields):
  """The run config of a family's tiny model: batch 8 x 16 tokens, constant lr from step 0."""
  preset, overrides = FAMILIES[family]
  config = transformer.get_config(f'preset={preset},runlocal')
  values = {'model.d_model': 32, 'model.num_heads': 4, 'model.mlp_dim': 64,
            'data.seq_len': 16, 'data.corpus': 'text', 'data.paths': corpus_glob,
            'data.eval_batches': 1, 'train.batch_size': 8, 'train.steps': 1,
            'train.progress_bar': False, 'optim.warmup_steps': 0, 'optim.schedule': 'constant',
            'peak_flops': 1e11, 'sharding_rules': rules, 'mesh': dict(mesh or ONE_DEVICE)}
  values.update(overrides)
  values.update(fields)
  for key, value in values.items():
    if isinstance(value, dict):
      common.get_field(config, key).update(value)
    else:
      common.set_field(config, key, value)
  return config


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def spec_str(sharding) -> str:
  return str(tuple(sharding.spec))


def batch_for(seed: int = 0, batch: int = 8, length: int = 16, vocab: int = 256) -> dict:
  """Random tokens, two documents a row (positions restart, segment ids 1 and 2)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  segments = np.where(np.arange(length) < length // 2, 1, 2).astype(np.int32)
  positions = np.arange(length) - (segments - 1) * (length // 2)
  return {'inputs': inputs, 'targets': np.roll(inputs, -1, 1),
          'positions': np.broadcast_to(positions, (batch, length)).astype(np.int32),
          'segment_ids': np.broadcast_to(segments, (batch, length)).copy(),
          'weights': np.ones((batch, length), np.float32)}


def one_step(config, devices, workdir, init=None):
  """(run, initial state, state after one step, metrics, compiled HLO text) through the
  loop's own setup; the initial state is `init` laid out on this run's mesh, or the run's
  own init."""
  run_ = loop.setup(config, workdir, devices=devices)
  with jax.set_mesh(run_.mesh), nn.logical_axis_rules(run_.rules):
    if init is None:
      state = run_.fns.init_state(jax.random.key(config.train.seed))
      init = jax.device_get(state)
    else:
      state = jax.device_put(init, run_.fns.state_sharding)
    batch = loop.to_global(run_, batch_for())
    compiled = run_.train_step.lower(state, batch).compile()
    new, metrics = compiled(state, batch)
    return run_, init, jax.device_get(new), jax.device_get(metrics), compiled.as_text()


def collectives_report(run_, hlo: str) -> dict:
  """The step's collectives with the parameters' shapes and which are sharded over fsdp."""
  specs = flat(run_.fns.state_sharding['params'])
  return {'collectives': collectives_of(hlo),
          'param_shapes': {k: list(v.shape) for k, v in
                           flat(loop.abstract_state(run_)['params']).items()},
          'fsdp_sharded': sorted(k for k, s in specs.items() if 'fsdp' in spec_str(s))}


def rel_diff(a: dict, b: dict) -> float:
  """|a - b| / |b| over the whole tree (2-norms): per leaf, a leaf whose gradient is zero in
  exact arithmetic (GPT-2's key bias: softmax ignores a constant per query) holds only
  rounding noise, which no layout reproduces."""
  num = sum(float(np.sum(np.square(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
            for k in b)
  den = sum(float(np.sum(np.square(np.asarray(b[k], np.float64)))) for k in b)
  return (num / den) ** 0.5 if den else num ** 0.5


def task_steps(args) -> dict:
  corpus = write_corpus(os.path.join(args.tmp, 'corpus'))
  cases = {}
  for case in args.cases.split(','):
    family, preset = case.split(':')
    cases.setdefault(family, []).append(preset)
  out = {}
  for family, presets in cases.items():
    _, ref_init, ref_new, ref_m, _ = one_step(family_config(family, corpus, **STEP_FIELDS),
                                           jax.devices()[:1], args.tmp)
    ref_params, ref_init_p = flat(ref_new['params']), flat(ref_init['params'])
    ref_update = {k: ref_params[k] - ref_init_p[k] for k in ref_params}
    res = {'single': {'loss': float(ref_m['loss']), 'grad_norm': float(ref_m['grad_norm'])}}
    for preset in presets:
      config = family_config(family, corpus, rules=preset, mesh=MESHES[preset], **STEP_FIELDS)
      run_, init, new, m, hlo = one_step(config, jax.devices(), args.tmp, init=ref_init)
      params, init_p = flat(new['params']), flat(init['params'])
      update = {k: params[k] - init_p[k] for k in params}
      specs = {k: spec_str(s) for k, s in flat(run_.fns.state_sharding['params']).items()}
      res[preset] = {
          'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
          'params': rel_diff(params, ref_params),
          'update': rel_diff(update, ref_update),
          'opt_state': rel_diff(flat(new['opt_state']), flat(ref_new['opt_state'])),
          'moved': rel_diff(params, init_p),
          'collections': rel_diff(flat(new['collections']), flat(ref_new['collections'])),
          'collections_moved': rel_diff(flat(new['collections']), flat(init['collections'])),
          'specs': specs,
      }
      if preset in ('dp', 'fsdp', 'fsdp_ep'):
        res[preset]['collectives'] = collectives_report(run_, hlo)
    out[family] = res
  return out


def param_specs(family: str, corpus: str, tmp: str) -> dict:
  config = family_config(family, corpus, rules='fsdp_tp', mesh=MESHES['fsdp_tp'])
  run_ = loop.setup(config, tmp)
  return {k: spec_str(s) for k, s in flat(run_.fns.state_sharding['params']).items()}


def task_tables(args) -> dict:
  corpus = write_corpus(os.path.join(args.tmp, 'corpus'))
  out = {f: param_specs(f, corpus, args.tmp) for f in args.families.split(',')}
  if args.write:
    os.makedirs(TABLES_DIR, exist_ok=True)
    for family, table in out.items():
      with open(os.path.join(TABLES_DIR, f'{family}.json'), 'w') as f:
        json.dump({'family': family, 'preset': FAMILIES[family][0], 'rules': 'fsdp_tp',
                   'mesh': MESHES['fsdp_tp'], 'params': table}, f, indent=1, sort_keys=True)
        f.write('\n')
  return out


def collectives_of(hlo: str) -> list[tuple[str, list[list[int]]]]:
  """(op, result shapes) of every collective in compiled HLO text."""
  return [(op, [[int(d) for d in dims.split(',') if d] for dims in SHAPE.findall(types)])
          for types, op in COLLECTIVE.findall(hlo)]


def task_decode(args) -> dict:
  """Sampled tokens (top-p, seeded) of `--families` decoded on one device and with the batch over
  the mesh of each `--cases` preset (parameters laid out by its rules, as training lays them)."""
  from models import decode  # pylint: disable=g-import-not-at-top
  from models import lm  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(os.path.join(args.tmp, 'corpus'))
  rng = np.random.default_rng(0)
  prompts = [[257] + rng.integers(0, 256, n).tolist() for n in (3, 9, 5, 1, 12, 7, 2, 6)]
  out = {}
  for family in args.families.split(','):
    config = family_config(family, corpus)
    config.model.vocab_size = 260
    model = models.build(config.model)
    dummy = jax.numpy.zeros((1, 8), jax.numpy.int32)
    boxed = jax.jit(lambda r: model.init(r, dummy, positions_BT=dummy,  # not op by op
                                         segment_ids_BT=dummy + 1))(jax.random.key(0))
    variables = nn.meta.unbox(boxed)
    results = {}
    for preset in ['single'] + args.cases.split(','):
      kwargs, placed = {}, variables
      if preset != 'single':
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(MESHES[preset]))
        rules = rules_lib.get_rules(preset)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        placed = jax.device_put(variables, shardings)
        kwargs = dict(mesh=mesh, rules=rules)
      tokens = {}
      for name, sampler in (('top_p', decode.Sampler(top_p=0.9, temperature=1.5)),):
        gen = decode.Generator(model, placed, max_len=28, sampler=sampler, prefill_chunk=16,
                               steps_per_call=12, **kwargs)
        tokens[name] = gen.generate(prompts, max_new_tokens=12, seed=5).tokens
      cache = gen._place({'cache': lm.init_cache(model.cfg, len(prompts), 28)})['cache']  # pylint: disable=protected-access
      tokens['cache_specs'] = sorted({spec_str(x.sharding) for x in jax.tree.leaves(cache)
                                      if x.ndim >= 2 and hasattr(x.sharding, 'spec')})
      results[preset] = tokens
    out[family] = results
  return out


def task_train(args) -> dict:
  """train_and_evaluate in `--workdir` on this process's mesh; parameters and losses back."""
  corpus = write_corpus(os.path.join(args.tmp, 'corpus'))
  mesh, rules = json.loads(args.mesh), args.rules
  config = family_config(args.families, corpus, rules=rules, mesh=mesh, **STEP_FIELDS,
                         **{'train.steps': args.steps, 'train.log_every': 1,
                            'train.checkpoint_every': args.checkpoint_every,
                            'train.eval_every': 1000}, **json.loads(args.fields))
  out = {}
  if args.restore_step:  # the saved state, restored under this mesh's shardings
    run_ = loop.setup(config, args.workdir)
    mngr = checkpoint.manager(args.workdir, 10)
    with jax.set_mesh(run_.mesh), nn.logical_axis_rules(run_.rules):
      state, _ = checkpoint.restore(mngr, args.restore_step, loop.abstract_state(run_))
    mngr.close()
    out['restored_specs'] = {k: spec_str(x.sharding) for k, x in flat(state['params']).items()}
    out['restored_devices'] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state)})
    out['restored'] = {k: np.asarray(x).tolist() for k, x in flat(jax.device_get(state['params'])).items()}
  loop.train_and_evaluate(config, args.workdir)
  with open(os.path.join(args.workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  out['losses'] = {str(r['step']): r['loss'] for r in lines if 'loss' in r}
  mngr = checkpoint.manager(args.workdir, 10)
  step = mngr.latest_step()
  saved = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  out['step'] = step
  out['params'] = {k: np.asarray(x).tolist() for k, x in flat(saved['params']).items()}
  return out


TASKS = {'steps': task_steps, 'tables': task_tables, 'train': task_train, 'decode': task_decode}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('task', choices=sorted(TASKS))
  parser.add_argument('--out', default='')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--families', default=','.join(FAMILIES))
  parser.add_argument('--cases', default=','.join(f'{f}:{p}' for f in FAMILIES for p in MESHES),
                      help='steps: family:preset pairs')
  parser.add_argument('--write', action='store_true')
  parser.add_argument('--workdir', default='')
  parser.add_argument('--mesh', default=json.dumps(MESHES['fsdp']))
  parser.add_argument('--rules', default='fsdp')
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--checkpoint_every', type=int, default=2)
  parser.add_argument('--restore_step', type=int, default=0)
  parser.add_argument('--fields', default='{}', help='config fields, JSON {"model.x": 1}')
  parser.add_argument('--setup', default='',
                      help='module:function called first, e.g. to register a sublayer a test '
                      'defines; the families it returns join FAMILIES')
  args = parser.parse_args()
  if args.setup:
    module, function = args.setup.split(':')
    FAMILIES.update(getattr(importlib.import_module(module), function)() or {})
  with tempfile.TemporaryDirectory() as tmp:
    args.tmp = tmp
    os.environ.setdefault('ARCHLAB_CACHE', os.path.join(tmp, 'cache'))
    result = TASKS[args.task](args)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f)
  else:
    json.dump(result, sys.stdout, indent=1)


if __name__ == '__main__':
  main()
