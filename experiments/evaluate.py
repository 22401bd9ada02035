"""Scores a trained run (or a Hugging Face checkpoint) on capability tasks; writes eval.json.

  python -m experiments.evaluate --workdir=RUN                      # the task it trained on
  python -m experiments.evaluate --workdir=RUN --tasks=niah,mqar
  python -m experiments.evaluate --workdir=RUN --tasks=mqar --task_options=mqar:vocab_size=256
  python -m experiments.evaluate --hf=/path/to/hf_dir --tasks=niah_single_1:seq_len=1024
  python -m experiments.evaluate --sweep_dir=SWEEP_DIR              # every finished run

`--tasks` takes suite names (`mqar`: Zoology's grid (64, 4) .. (256, 64) at vocabulary 8192;
`mad`: the five MAD tasks a causal decoder runs; `niah`: the three S-NIAH forms at 512, 1024
and 2048 tokens) and task specs (`name` or `name:key=value`, one option per task: commas
separate the list). `--task_options=NAME:key=value,...` (repeatable; NAME a task or a suite)
changes options of every listed task it names, e.g. a vocabulary that fits a byte-level model.
Without `--tasks` a run is scored on what it trained on (`data.task`).

The instances are the `test` split, never trained on (`--instances`, default each task's
`num_test`: Zoology's 1,000 for MQAR, MAD's 1,280, 100 per needle setting). Scoring is
teacher-forced on the answer tokens: a token is right when the model's argmax there is the
answer, `accuracy` is the fraction of answer tokens right (Zoology's and MAD's metric) and
`exact_match` the fraction of instances with every answer token right (for needle retrieval,
that greedy decoding writes the value first); each with a 95% interval over instances (the
ratio estimator's normal interval; Wilson's for exact_match). `state_bytes` is the decode
cache of one sequence at the task's length (what recall has to live in).

Runs trained with a diffusion objective (masked or block diffusion) are scored by one
parallel denoising step, the first step of their samplers: every answer token of the
instance masked at once, the rest of the sequence clean (for block diffusion, the clean
stream beside it, as in training), and a token right when the denoiser's argmax at its
masked position is the answer (masked diffusion predicts position l's own token, not l + 1).
This is the model's answer with no other answer known; eval.json's `scoring` says which rule
scored a run.

`answer_nll` is the negative log-likelihood of the answers, in nats per answer token: exact
(teacher-forced) for next-token runs; for diffusion runs LLaDA's estimator over the answer
tokens (`NLL_SAMPLES` draws per instance: l of its L answer tokens masked, l uniform in 1..L,
the masked ones' NLL weighted L / l, MASK never predicted), which bounds the NLL from above in
expectation (`models/diffusion_likelihood.py` holds the same estimator for a prompt and a
response).

eval.json (in the workdir, or `--output`) keeps earlier results of the same checkpoint and
adds these, keyed by task spec.
"""

from __future__ import annotations

import datetime
import json
import math
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import errors
import experiments
import models
from configs import common
from experiments import sample
from input_pipeline import tasks as tasks_lib
from models import lm
from trainer import checkpoint
from trainer import flops as flops_lib

# experiments.sample defines --workdir, --hf and --step; this process shares them.
_WORKDIR = flags.FLAGS['workdir']
_HF = flags.FLAGS['hf']
_STEP = flags.FLAGS['step']
_TASKS = flags.DEFINE_list('tasks', [], 'Suites (mqar, mad, niah) and task specs.')
_OPTIONS = flags.DEFINE_multi_string('task_options', [], 'NAME:key=value,... for the listed '
                                     'tasks NAME names (a task or a suite).')
_INSTANCES = flags.DEFINE_integer('instances', 0, 'Test instances per task (0: its num_test).')
_BATCH = flags.DEFINE_integer('eval_batch_size', 16, 'Instances per forward pass.')
_OUTPUT = flags.FLAGS['output']  # experiments.sample's --output: here the eval.json path
_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'Score every finished run of a sweep.')

SCORING = ('teacher-forced: the argmax at each answer token against the answer (causal '
           'next-token models); answer_nll teacher-forced, exact')
DIFFUSION_OBJECTIVES = ('masked_diffusion', 'block_diffusion')
NLL_SAMPLES = 8  # LLaDA-estimator draws per instance for a diffusion run's answer_nll
DIFFUSION_SCORING = ('one parallel denoising step: every answer token masked at once, the '
                     'argmax at each masked answer position against the answer; answer_nll '
                     f"by LLaDA's estimator over the answers ({NLL_SAMPLES} draws an instance: "
                     'an upper bound in expectation)')


def diffusion_rows(batch, mask_id: int):
  """(z_BS, x_BS, answer_BS) of S = T + 1 from next-token rows: the whole sequence x
  (inputs[0], then targets), the answer positions (where the targets are weighted, one
  later), and z: x with every answer token masked."""
  x_BS = jnp.concatenate([batch['inputs'][:, :1], batch['targets']], axis=1)
  answer_BS = jnp.pad(batch['weights'] > 0, ((0, 0), (1, 0)))
  return jnp.where(answer_BS, mask_id, x_BS), x_BS, answer_BS


def expand(names: list[str], options: list[str]) -> list[str]:
  """Canonical task specs of suite names and specs, with `--task_options` applied: options
  given for a suite apply to those of its tasks that have them, those given for a task must
  be its own."""
  overrides: dict[str, dict[str, str]] = {}
  for item in options:
    name, sep, arg = item.partition(':')
    if not sep or not arg:
      raise errors.ConfigError(f'--task_options={item!r}: give NAME:key=value,...')
    if name not in tasks_lib.SUITES and name not in tasks_lib.TASKS:
      raise errors.ConfigError(f'--task_options={item!r}: {name!r} is not a suite '
                               f'{sorted(tasks_lib.SUITES)} or a task {sorted(tasks_lib.TASKS)}')
    for pair in filter(None, arg.split(',')):
      key, has, value = pair.partition('=')
      if not has:
        raise errors.ConfigError(f'--task_options={item!r}: {pair!r} is not key=value')
      overrides.setdefault(name, {})[key.strip()] = value.strip()
  for name, keys in overrides.items():
    members = tasks_lib.SUITES.get(name, [name])
    known = set().union(*(tasks_lib.TASKS[m.partition(':')[0]].DEFAULTS for m in members))
    unknown = sorted(set(keys) - known)
    if unknown:
      raise errors.ConfigError(f'--task_options: {name} has no option {unknown[0]!r}; the '
                               f'options are {sorted(known)}')
  joined = []  # --tasks splits at every comma: 'mqar:seq_len=128', 'num_kv_pairs=8' is one spec
  for name in names:
    if '=' in name and ':' not in name and joined and ':' in joined[-1]:
      joined[-1] += ',' + name
    else:
      joined.append(name)
  specs = []
  for name in joined:
    for spec in tasks_lib.suite(name):
      extra = {**overrides.get(name, {}), **overrides.get(spec.partition(':')[0], {})}
      cls, values = tasks_lib.parse_one(spec, extra)
      specs.append(tasks_lib.spec_of(cls, values, dataset=False))
  return list(dict.fromkeys(specs))


def _interval_ratio(correct_I: np.ndarray, count_I: np.ndarray) -> tuple[float, float, float]:
  """sum(correct) / sum(count) and its 95% normal interval over instances (linearised)."""
  total = max(float(count_I.sum()), 1.0)
  ratio = float(correct_I.sum()) / total
  se = math.sqrt(float(np.sum((correct_I - ratio * count_I) ** 2))) / total
  return ratio, max(0.0, ratio - 1.96 * se), min(1.0, ratio + 1.96 * se)


def _wilson(successes: int, n: int) -> tuple[float, float]:
  if n == 0:
    return 0.0, 1.0
  z, p = 1.96, successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def state_bytes(model_config, length: int) -> int:
  """Bytes of one sequence's decode cache at `length` (every sublayer's own cache)."""
  shapes = jax.eval_shape(lambda: lm.init_cache(model_config, 1, length))
  return int(sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes)))


def _score_fn(model):
  @jax.jit
  def score(variables, batch, key):
    del key  # teacher-forced: nothing is drawn (the diffusion score's draws take it)
    logits_BTV, _, _ = model.apply(variables, batch['inputs'], positions_BT=batch['positions'],
                                   segment_ids_BT=batch['segment_ids'])
    logits_BTV = logits_BTV.astype(jnp.float32)
    right_BT = (jnp.argmax(logits_BTV, axis=-1) == batch['targets'])
    scored_BT = batch['weights'] > 0
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), batch['targets'][..., None],
                                  -1)[..., 0]
    return (jnp.sum(right_BT & scored_BT, axis=-1), jnp.sum(scored_BT, axis=-1),
            -jnp.sum(jnp.where(scored_BT, logp_BT, 0.0), axis=-1))
  return score


def _diffusion_score_fn(model, mask_id: int, block: bool, nll_samples: int = NLL_SAMPLES):
  """The score of `diffusion_rows` through a bidirectional denoiser; with `block`, over
  [z, x] as block diffusion trains (each block sees the clean earlier blocks). The answer NLL
  is LLaDA's estimator over the answer tokens, `nll_samples` draws (module docstring)."""
  def denoise(variables, z_BS, x_BS):
    rows, length = x_BS.shape
    pos_BS = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    seg_BS = jnp.ones_like(pos_BS)
    if block:
      both = lambda a, b: jnp.concatenate([a, b], axis=1)
      logits_BSV, _, _ = model.apply(variables, both(z_BS, x_BS), positions_BT=both(pos_BS, pos_BS),
                                     segment_ids_BT=both(seg_BS, seg_BS))
      return logits_BSV[:, :length].astype(jnp.float32)
    logits_BSV, _, _ = model.apply(variables, z_BS, positions_BT=pos_BS, segment_ids_BT=seg_BS)
    return logits_BSV.astype(jnp.float32)

  def estimate(variables, x_BS, answer_BS, key):
    """One draw of LLaDA's estimator per row: l of the L answers masked, NLL times L / l."""
    count_B = jnp.sum(answer_BS, -1)
    key_l, key_order = jax.random.split(key)
    l_B = jnp.floor(jax.random.uniform(key_l, count_B.shape) * count_B).astype(jnp.int32) + 1
    order_BS = jnp.where(answer_BS, jax.random.uniform(key_order, x_BS.shape), 2.0)
    rank_BS = jnp.argsort(jnp.argsort(order_BS, -1), -1)  # answers first, in random order
    masked_BS = answer_BS & (rank_BS < l_B[:, None])
    logits_BSV = denoise(variables, jnp.where(masked_BS, mask_id, x_BS), x_BS)
    logp_BSV = jax.nn.log_softmax(logits_BSV.at[..., mask_id].set(-jnp.inf))  # SUBS
    logp_BS = jnp.take_along_axis(logp_BSV, x_BS[..., None], -1)[..., 0]
    nll_B = -jnp.sum(jnp.where(masked_BS, logp_BS, 0.0), -1)
    return jnp.where(count_B > 0, nll_B * count_B / l_B, 0.0)

  @jax.jit
  def score(variables, batch, key):
    z_BS, x_BS, answer_BS = diffusion_rows(batch, mask_id)
    right_BS = jnp.argmax(denoise(variables, z_BS, x_BS), axis=-1) == x_BS
    nll_B = jax.lax.map(lambda k: estimate(variables, x_BS, answer_BS, k),
                        jax.random.split(key, nll_samples)).mean(0)
    return jnp.sum(right_BS & answer_BS, axis=-1), jnp.sum(answer_BS, axis=-1), nll_B
  return score


def diffusion_mask_id(objective: dict, tokenizer) -> int:
  """The MASK id a diffusion run trained with (`objective.mask_id`, -1: the tokenizer's)."""
  mask_id = objective.get('mask_id', -1)
  if mask_id is None or mask_id < 0:
    mask_id = getattr(tokenizer, 'mask_id', None)
  if mask_id is None:
    raise errors.ConfigError('the diffusion run\'s objective.mask_id is -1 and its tokenizer '
                             'has no mask token')
  return int(mask_id)


def evaluate(model_config, variables, tokenizer, specs: list[str], *, instances: int = 0,
             batch_size: int = 16, text_source=None, objective=None) -> dict[str, dict]:
  """{spec: results} of the model on the test instances of each task spec; `objective` (the
  run's objective config, a dict) selects diffusion scoring (module docstring)."""
  tasks = tasks_lib.build(specs, tokenizer, text_source)
  tasks_lib.check_backbone([type(t) for t in tasks], bool(model_config.get('autoencoder')))
  tasks_lib.check_trainable(tasks, model_config.vocab_size, f'the model (vocabulary '
                            f'{model_config.vocab_size})')
  for task in tasks:
    if model_config.position == 'learned' and task.seq_len > model_config.max_len:
      raise errors.DataError(f'task {task.spec} has rows of {task.seq_len} tokens but the model '
                             f'learned positions for {model_config.max_len} (model.max_len)')
  model = models.build(model_config)
  name = (objective or {}).get('name', 'next_token')
  if name in DIFFUSION_OBJECTIVES:
    if model_config.position == 'learned' and max(t.seq_len for t in tasks) >= model_config.max_len:
      raise errors.DataError(f'diffusion scoring reads rows of seq_len + 1 tokens, beyond the '
                             f'model\'s learned positions (model.max_len={model_config.max_len})')
    score = _diffusion_score_fn(model, diffusion_mask_id(objective, tokenizer),
                                block=name == 'block_diffusion')
  elif name == 'next_token':
    score = _score_fn(model)
  else:
    raise errors.ConfigError(f'objective.name={name!r}: evaluate scores next_token and '
                             f'{sorted(DIFFUSION_OBJECTIVES)} runs')
  variables = jax.tree.map(jnp.asarray, variables)
  results = {}
  for task in tasks:
    n = instances or task.num_test
    correct, count, nll = [], [], []
    for start in range(0, n, batch_size):
      rows = [tasks_lib.pad_row(task.instance('test', i), task.seq_len, tokenizer.pad_id)
              for i in range(start, min(n, start + batch_size))]
      real = len(rows)
      rows += [dict(rows[0], weights=np.zeros_like(rows[0]['weights']))] * (batch_size - real)
      batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
      right_B, scored_B, nll_B = jax.device_get(score(variables, batch, jax.random.key(start)))
      correct.append(right_B[:real])
      count.append(scored_B[:real])
      nll.append(nll_B[:real])
    correct_I, count_I = np.concatenate(correct), np.concatenate(count)
    accuracy, low, high = _interval_ratio(correct_I.astype(np.float64), count_I.astype(np.float64))
    solved = int(np.sum(correct_I == count_I))
    results[task.setting] = {
        'task': task.NAME, 'options': task.options, 'source': task.SOURCE,
        'instances': int(n), 'answer_tokens': int(count_I.sum()),
        'accuracy': accuracy, 'accuracy_interval': [low, high],
        'exact_match': solved / n, 'exact_match_interval': list(_wilson(solved, n)),
        'answer_nll': float(np.concatenate(nll).sum() / max(count_I.sum(), 1)),
        'seq_len': task.seq_len, 'state_bytes': state_bytes(model_config, task.seq_len),
    }
    logging.info('evaluate: %s accuracy %.4f [%.4f, %.4f], exact match %.4f (%d instances)',
                 task.spec, accuracy, low, high, solved / n, n)
  return results


def _run_config(workdir: str) -> dict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise errors.CheckpointError(f'{workdir}: no config.json (not an archlab workdir, or the run '
                                 'never started)')
  with open(path) as f:
    return json.load(f)


def _data_config(saved: dict | None) -> ml_collections.ConfigDict:
  """The run's `config.data` (the corpus the needle haystack comes from), defaults filled."""
  data = common.base_config().data
  for key, value in (saved or {}).items():
    if key in data:
      data[key] = value
  return data


def evaluate_workdir(workdir: str, names: list[str], options: list[str], *, step=None,
                     instances: int = 0, batch_size: int = 16, output: str | None = None) -> dict:
  """Scores a run's checkpoint and writes its eval.json; returns the record."""
  if not os.path.isdir(workdir):
    raise errors.CheckpointError(f'--workdir={workdir}: no such directory')
  saved = _run_config(workdir)
  objective = dict(saved.get('objective') or {'name': 'next_token'})
  if objective['name'] == 'next_token' and saved.get('model', {}).get('bidirectional'):
    raise errors.ConfigError(f'{workdir} trained a bidirectional model on next_token: nothing '
                             'to score it with')
  if not names:
    trained = saved.get('data', {}).get('task', '')
    if not trained:
      raise errors.ConfigError(f'{workdir} trained on a corpus, not a task: give --tasks '
                               f'(suites {sorted(tasks_lib.SUITES)} or task specs)')
    names = [s for s in trained.split(';') if s.strip()]
  specs = expand(names, options)
  model_config, params, collections = checkpoint.read_model(workdir, step)
  tokenizer = sample.run_tokenizer(workdir, model_config)
  step = step if step is not None else _latest_step(workdir)
  results = evaluate(model_config, {'params': params, **collections}, tokenizer, specs,
                     instances=instances, batch_size=batch_size,
                     text_source=tasks_lib.corpus_text(_data_config(saved.get('data'))),
                     objective=objective)
  diffusion = objective['name'] in DIFFUSION_OBJECTIVES
  return _write(output or os.path.join(workdir, 'eval.json'), {
      'workdir': os.path.abspath(workdir), 'step': step, 'trained_on': saved.get('data', {}).get('task', ''),
      'params': flops_lib.count_params(params), 'objective': objective['name']}, results,
      scoring=DIFFUSION_SCORING if diffusion else SCORING)


def _latest_step(workdir: str):
  directory = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  return max(steps) if steps else None


def evaluate_hf(path: str, names: list[str], options: list[str], *, instances: int = 0,
                batch_size: int = 16, output: str | None = None) -> dict:
  if not names:
    raise errors.ConfigError('--hf needs --tasks (suites or task specs)')
  specs = expand(names, options)
  model_config, variables, tokenizer = sample.load_hf(path)
  results = evaluate(model_config, variables, tokenizer, specs, instances=instances,
                     batch_size=batch_size, text_source=tasks_lib.corpus_text(_data_config(None)))
  return _write(output or os.path.join(path, 'eval.json'), {
      'hf': os.path.abspath(path), 'step': None,
      'params': flops_lib.count_params(variables['params'])}, results)


def _write(path: str, header: dict, results: dict, scoring: str = SCORING) -> dict:
  record = {}
  if os.path.isfile(path):
    with open(path) as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError:
        record = {}
    if record.get('step') != header.get('step'):
      record = {}  # results of another checkpoint are replaced, not mixed
  record.update(header, scoring=scoring, code_version=experiments.code_version(),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  record['tasks'] = {**record.get('tasks', {}), **results}
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1, default=_plain)
  os.replace(tmp, path)
  return record


def _plain(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'{type(value).__name__} is not JSON')


def evaluate_sweep(sweep_dir: str, names: list[str], options: list[str], **kwargs) -> list[str]:
  """Scores every finished run of a sweep (runs with a summary.json) whose eval.json lacks
  these tasks at its latest step; `names` default to the sweep's `eval_tasks`, else each
  run's training task. Returns the runs scored."""
  path = os.path.join(sweep_dir, 'sweep.json')
  if not os.path.isfile(path):
    raise errors.ConfigError(f'--sweep_dir={sweep_dir}: no sweep.json (not a sweep directory)')
  with open(path) as f:
    state = json.load(f)
  names = names or list(state.get('sweep', {}).get('eval_tasks', []))
  scored = []
  for run in state['runs']:
    workdir = os.path.join(sweep_dir, 'runs', run['name'])
    if not os.path.isfile(os.path.join(workdir, 'summary.json')):
      continue
    existing = os.path.join(workdir, 'eval.json')
    if os.path.isfile(existing) and names:
      with open(existing) as f:
        done = json.load(f)
      if done.get('step') == _latest_step(workdir) and set(expand(names, options)) <= set(done['tasks']):
        continue
    evaluate_workdir(workdir, names, options, **kwargs)
    scored.append(run['name'])
  return scored


def _main():
  sources = [bool(_WORKDIR.value), bool(_HF.value), bool(_SWEEP_DIR.value)]
  if sum(sources) != 1:
    raise errors.ConfigError('give one of --workdir, --hf and --sweep_dir')
  if _BATCH.value < 1 or _INSTANCES.value < 0:
    raise errors.ConfigError('--eval_batch_size must be positive and --instances >= 0')
  kwargs = dict(instances=_INSTANCES.value, batch_size=_BATCH.value)
  if _SWEEP_DIR.value:
    scored = evaluate_sweep(_SWEEP_DIR.value, _TASKS.value, _OPTIONS.value, **kwargs)
    print(f'scored {len(scored)} runs in {_SWEEP_DIR.value}')
    return
  if _WORKDIR.value:
    record = evaluate_workdir(_WORKDIR.value, _TASKS.value, _OPTIONS.value, step=_STEP.value,
                              output=_OUTPUT.value, **kwargs)
  else:
    record = evaluate_hf(_HF.value, _TASKS.value, _OPTIONS.value, output=_OUTPUT.value, **kwargs)
  for spec, r in record['tasks'].items():
    print(f'{spec:48s} accuracy {r["accuracy"]:.4f} [{r["accuracy_interval"][0]:.4f}, '
          f'{r["accuracy_interval"][1]:.4f}]  exact {r["exact_match"]:.4f}  '
          f'({r["instances"]} instances)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint is read-only
  errors.run_main('evaluate', _main)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.flags_parser('evaluate'))
