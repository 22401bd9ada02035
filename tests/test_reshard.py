"""Reshardable checkpoints through the real loop: a run saved under 8-way FSDP resumes under
2 x 4 FSDP x tensor parallelism and on one device with the saved parameters, bit for bit,
and trains on as the run that kept its mesh does. Each mesh is a process of its own
(tests/sharding_worker.py `train`)."""

import json
import shutil

import numpy as np
import pytest

from tests import sharding_worker

# One worker runs the module, so the module fixture's 8-device runs happen once.
pytestmark = pytest.mark.xdist_group('reshard')

FSDP8 = dict(data=1, fsdp=8, tensor=1, expert=1)
FSDP2_TP4 = dict(data=1, fsdp=2, tensor=4, expert=1)
ONE = dict(data=1, fsdp=1, tensor=1, expert=1)
FIELDS = json.dumps({'model.num_kv_heads': 4})  # 4 kv heads split 4 ways


def train(workdir, mesh, rules, devices, steps, restore_step=0):
  return sharding_worker.run(
      'train', '--families=llama', f'--workdir={workdir}', f'--mesh={json.dumps(mesh)}',
      f'--rules={rules}', f'--steps={steps}', '--checkpoint_every=2',
      f'--restore_step={restore_step}', f'--fields={FIELDS}', devices=devices)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two steps under fsdp=8 with a checkpoint, then two more under each mesh."""
  root = tmp_path_factory.mktemp('reshard')
  saved = train(root / 'saved', FSDP8, 'fsdp', 8, steps=2)
  out = {'saved': saved}
  for name, mesh, rules, devices in (('fsdp8', FSDP8, 'fsdp', 8),
                                     ('fsdp2_tp4', FSDP2_TP4, 'fsdp_tp', 8),
                                     ('one_device', ONE, 'fsdp', 1)):
    shutil.copytree(root / 'saved', root / name)
    out[name] = train(root / name, mesh, rules, devices, steps=4, restore_step=2)
  return out


@pytest.mark.parametrize('name', ['fsdp8', 'fsdp2_tp4', 'one_device'])
def test_restore_under_another_mesh_gives_the_saved_parameters(runs, name):
  saved, got = runs['saved'], runs[name]
  assert saved['step'] == 2
  assert got['restored'].keys() == saved['params'].keys()
  for k, value in saved['params'].items():
    a, b = np.asarray(got['restored'][k], np.float32), np.asarray(value, np.float32)
    assert a.shape == b.shape and np.array_equal(a, b), f'{name}: {k} differs after restore'
  specs = ' '.join(got['restored_specs'].values())
  if name == 'fsdp2_tp4':  # restored straight into the new layout
    assert "'tensor'" in specs and "'fsdp'" in specs, got['restored_specs']
  assert got['restored_devices'] == [1 if name == 'one_device' else 8]


@pytest.mark.parametrize('name', ['fsdp2_tp4', 'one_device'])
def test_resharded_run_trains_on_as_the_unchanged_one(runs, name):
  ref, got = runs['fsdp8'], runs[name]
  assert got['step'] == ref['step'] == 4
  for step in ('3', '4'):
    assert np.isfinite(got['losses'][step])
    assert abs(got['losses'][step] - ref['losses'][step]) <= 1e-5 * ref['losses'][step], (
        name, step, got['losses'][step], ref['losses'][step])
  num = sum(np.sum(np.square(np.asarray(got['params'][k]) - np.asarray(v)))
            for k, v in ref['params'].items())
  den = sum(np.sum(np.square(np.asarray(v))) for v in ref['params'].values())
  assert (num / den) ** 0.5 <= 1e-5, name
  # The first two steps' losses are the saved run's (metrics.jsonl came with the workdir).
  assert got['losses']['1'] == runs['saved']['losses']['1']
