"""Multi-host training: 2 processes x 4 CPU devices (jax.distributed, gloo) == 1 process x 8.

Each process runs train.py with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(sharding.mesh.maybe_initialize_distributed reads them), reads only its share of every global
batch, and both write one orbax checkpoint into the same workdir. The losses of every step and
the checkpointed parameters must match the single-process run on 8 forced devices.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import sharding_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SEC = 240  # the whole run takes about a minute on 2 cores; this only stops a hang
RTOL = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def small_corpus(directory) -> str:
  """A few stdlib files as a text corpus: tokenizes in well under a second."""
  os.makedirs(directory)
  json_dir = os.path.join(sysconfig.get_paths()['stdlib'], 'json')
  for name in sorted(os.listdir(json_dir)):
    if name.endswith('.py'):
      with open(os.path.join(json_dir, name), encoding='utf-8') as f:
        text = f.read()
      with open(os.path.join(directory, name + '.txt'), 'w', encoding='utf-8') as f:
        f.write(text)
  return os.path.join(directory, '*.txt')


def train_command(workdir, corpus_glob):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={ROOT}/configs/transformer.py:preset=llama_tiny,runlocal',
          f'--workdir={workdir}', '--config.peak_flops=1e11', '--config.model.d_model=32',
          '--config.model.pattern=AF', '--config.train.steps=6',
          '--config.train.log_every=1', '--config.train.eval_every=3',
          '--config.train.checkpoint_every=3', '--config.train.progress_bar=False',
          '--config.data.corpus=text', f'--config.data.paths={corpus_glob}']


def environment(cache, devices, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                              'SLURM_', 'TPU_WORKER'))}
  env.update(JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', ARCHLAB_CACHE=cache,
             XLA_FLAGS=(f"{sharding_worker.without_device_count(os.environ.get('XLA_FLAGS', ''))} "
                        f'--xla_force_host_platform_device_count={devices}').strip(), **extra)
  return env


def run_all(commands_envs, log_dir):
  """Starts every process, waits for all; on a failure or the timeout ends every one."""
  procs, logs = [], []
  try:
    for i, (cmd, env) in enumerate(commands_envs):
      log = open(os.path.join(log_dir, f'process{i}.log'), 'w+')
      logs.append(log)
      procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
      p.wait(timeout=TIMEOUT_SEC)
  except subprocess.TimeoutExpired:
    pytest.fail(f'multi-host run did not finish in {TIMEOUT_SEC} s')
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    text = log.read()
    log.close()
    assert p.returncode == 0, f'process {i} failed:\n{text[-3000:]}'


def losses(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {l['step']: l['loss'] for l in lines if 'loss' in l}, {
      l['step']: l['eval_loss'] for l in lines if 'eval_loss' in l}


def checkpoint(workdir):
  """All steps, and the latest state and data state, restored onto this process's one device."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data'))
  step = mngr.latest_step()
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  saved = ocp.StandardCheckpointer().metadata(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          saved.item_metadata)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        data=ocp.args.JsonRestore()))
  return mngr.all_steps(), restored['state'], restored['data']


def flat(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def test_two_processes_match_one(tmp_path):
  corpus = small_corpus(str(tmp_path / 'corpus'))
  cache = str(tmp_path / 'cache')
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  # The single-process run goes first and fills the token cache both runs read.
  run_all([(train_command(single, corpus), environment(cache, 8))], str(tmp_path))
  port = free_port()
  run_all([(train_command(multi, corpus),
            environment(cache, 4, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                        JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(p))) for p in (0, 1)],
          str(tmp_path))

  train_single, eval_single = losses(single)
  train_multi, eval_multi = losses(multi)
  assert sorted(train_single) == sorted(train_multi) == [1, 2, 3, 4, 5, 6]
  for step, loss in train_single.items():
    assert train_multi[step] == pytest.approx(loss, rel=RTOL), step
  assert sorted(eval_single) == sorted(eval_multi) == [3, 6]
  for step, loss in eval_single.items():
    assert eval_multi[step] == pytest.approx(loss, rel=RTOL), step
  # The two processes wrote one summary (process 0) that counts all 8 devices.
  assert json.load(open(os.path.join(multi, 'summary.json')))['devices'] == 8

  steps_single, state_single, data_single = checkpoint(single)
  steps_multi, state_multi, data_multi = checkpoint(multi)
  assert list(steps_single) == list(steps_multi) == [3, 6]
  assert data_multi == data_single  # batches read per process == global batches read
  assert int(state_multi['step']) == int(state_single['step']) == 6
  params_single, params_multi = flat(state_single['params']), flat(state_multi['params'])
  assert params_single.keys() == params_multi.keys()
  for name, value in params_single.items():
    np.testing.assert_allclose(params_multi[name], value, rtol=RTOL, atol=1e-7, err_msg=name)
  # The runs trained (equal parameters are not just equal initialisations).
  assert train_single[6] < train_single[1]


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='needs libtpu (requirements-tpu.txt) for a two-host device set')
def test_batch_must_split_over_processes():
  """A mesh that replicates the batch across hosts is refused (libtpu's 2-host v5e:2x4)."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sharding import aot  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top

  devices = aot.topology_devices('v5e', (2, 4))
  assert sorted({d.process_index for d in devices}) == [0, 1]

  def batch_sharding(order=devices, **sizes):
    mesh_config = ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, tensor=1, expert=1), **sizes))
    mesh = jax.sharding.Mesh(np.array(order).reshape(mesh_lib.mesh_shape(mesh_config, 8)),
                             rules_lib.MESH_AXES)
    return nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec('batch', 'length'), mesh,
                                       rules_lib.get_rules('fsdp'))

  mesh_lib.check_batch_split(batch_sharding(data=8), 16, 2)
  mesh_lib.check_batch_split(batch_sharding(fsdp=2, tensor=4), 16, 2)  # tensor within a host
  with pytest.raises(ValueError, match=r'must split train.batch_size=16 into 2 distinct shares'):
    mesh_lib.check_batch_split(batch_sharding(tensor=8), 16, 2)
  # Each tensor pair holds one device of each host: both hosts would need every row.
  by_host = [[d for d in devices if d.process_index == p] for p in (0, 1)]
  across = [d for pair in zip(*by_host) for d in pair]
  mesh_lib.check_batch_split(batch_sharding(order=across, data=8), 16, 2)
  with pytest.raises(ValueError, match=r'keep `tensor` within a host'):
    mesh_lib.check_batch_split(batch_sharding(order=across, data=4, tensor=2), 16, 2)
