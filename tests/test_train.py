"""End-to-end runs of train.py: outputs, resume after SIGKILL, refusals that lose nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, *flags, preset='llama_tiny'):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={ROOT}/configs/transformer.py:preset={preset},runlocal',
          f'--workdir={workdir}', '--config.peak_flops=1e11', *flags]


def run_train(workdir, *flags, preset='llama_tiny', check=True):
  proc = subprocess.run(train_cmd(workdir, *flags, preset=preset), capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f'train.py failed:\n{proc.stderr[-3000:]}')
  return proc


def final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return step, state['params']


def flat(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def test_end_to_end_outputs(tmp_path):
  workdir = str(tmp_path / 'run')
  run_train(workdir, preset='gpt2_tiny')
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines if 'loss' in l] == [10, 20, 30, 40]
  for key in ('step', 'tokens', 'flops', 'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu',
              'bits_per_byte'):
    assert key in lines[0], key
  assert lines[-1]['tokens'] == 40 * 8 * 64
  assert lines[-1]['loss'] < lines[0]['loss']
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  for key in ('params', 'params_non_embedding', 'flops', 'tokens', 'final_eval_bits_per_byte',
              'wall_time_sec', 'config', 'xla_flops_per_step', 'analytic_flops_per_step'):
    assert key in summary, key
  assert summary['params'] > summary['params_non_embedding'] > 0
  assert summary['config']['model']['position'] == 'learned'
  assert 0 < summary['final_eval_bits_per_byte'] < 8
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size'] == 260
  # The Quick start's last step: a sample from the run just trained, streamed.
  out = str(tmp_path / 'samples.jsonl')
  cmd = [sys.executable, '-m', 'experiments.sample', f'--workdir={workdir}',
         '--prompt=def fib(n):', '--max_new_tokens=24', '--seed=3', f'--output={out}']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(open(out).read())
  assert proc.stdout == 'def fib(n):' + row['completion'] + '\n'
  assert 0 < len(row['tokens']) <= 24 and row['tokens_per_sec'] > 0
  # In-process: the same seed reproduces the command's tokens; an earlier step is another
  # model; a step that was not saved is one line.
  from experiments import sample  # pylint: disable=g-import-not-at-top
  from models import decode  # pylint: disable=g-import-not-at-top
  kwargs = dict(max_new_tokens=24, sampler=decode.Sampler(temperature=0.8), stop=[], seed=3)
  model_config, variables, tokenizer = sample.load_run(workdir)
  assert sample.sample(model_config, variables, tokenizer, ['def fib(n):'], **kwargs)[0][
      'tokens'] == row['tokens']
  model_config, variables, tokenizer = sample.load_run(workdir, step=20)
  assert sample.sample(model_config, variables, tokenizer, ['def fib(n):'], **kwargs)[0][
      'tokens'] != row['tokens']
  with pytest.raises(ValueError, match=r'no checkpoint at step 30 \(steps: \[20, 40\]\)'):
    sample.load_run(workdir, step=30)


# The run the SIGKILLed one must equal, also the workdir a run of another model is refused.
STEPS = 60
FLAGS = [f'--config.train.steps={STEPS}', '--config.train.checkpoint_every=10',
         '--config.train.eval_every=1000', '--config.model.d_model=32']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('train') / 'straight')
  run_train(workdir, *FLAGS)
  return workdir


def test_sigkill_then_resume_is_bitwise_equal_to_uninterrupted(straight, tmp_path):
  """Killed once its first checkpoint (step 10) is on disk, with 50 steps to go."""
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(train_cmd(killed, *FLAGS), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  assert not os.path.exists(os.path.join(killed, 'summary.json'))
  resumed_from = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert resumed_from < STEPS

  run_train(killed, *FLAGS)
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(killed)
  assert step_a == step_b == STEPS
  a, b = flat(params_a), flat(params_b)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].tobytes() == b[key].tobytes(), key


def test_workdir_with_another_model_is_refused_untouched(straight, tmp_path):
  """A copy of the d_model=32 run, resumed with the preset's d_model=64."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  # run.lock is the one file a run writes before it reads the workdir: its holder's pid
  def stamps():
    return {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir)
            for p in fs if p != 'run.lock'}
  before = stamps()
  proc = run_train(workdir, f'--config.train.steps={STEPS}', check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert f'holds a checkpoint (step {STEPS}) of a different model config' in last
  assert 'model.d_model: 32 in the checkpoint, 64 now' in last and 'to start fresh' in last
  assert before == stamps()


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = run_train(workdir, '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
                   '--config.optim.grad_clip=0', '--config.train.checkpoint_every=1',
                   check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('train.py: error: loss became') and 'at step' in last, last
  failed_step = int(last.split('at step ')[1].split(';')[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert saved and saved[-1] == failed_step - 1
  assert f'the checkpoint at step {failed_step - 1} is kept' in last
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


@pytest.mark.parametrize('flag,message', [
    ('--config.data.paths=/nonexistent/*.txt', 'data.paths'),
    ('--config.model.num_kv_heads=3', 'model.num_kv_heads=3'),
])
def test_bad_input_is_one_line(tmp_path, flag, message):
  extra = ['--config.data.corpus=text'] if 'paths' in flag else []
  proc = run_train(str(tmp_path / 'run'), flag, *extra, check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('train.py: error:') and message in last, proc.stderr[-2000:]


def test_model_fields_are_checked_before_the_data_is_read(tmp_path):
  """A bad model field is reported even when the data could not be read (nor was)."""
  proc = run_train(str(tmp_path / 'run'), '--config.model.num_kv_heads=3',
                   '--config.data.corpus=text', '--config.data.paths=/nonexistent/*.txt',
                   check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('train.py: error: model.num_heads=4 must be a positive multiple of '
                         'model.num_kv_heads=3'), proc.stderr[-2000:]


@pytest.mark.parametrize('config_arg,flag,message', [
    ('preset=nope,runlocal', None, "preset='nope' is not one of"),
    ('preset=llama_tiny,bogus=1', None, "config argument 'bogus' is not one of"),
    ('preset=llama_tiny,runlocal', '--config.model.patern=AF',
     "train.py: error: --config.model.patern: the config has no field 'patern'; did you mean "
     "'pattern'?"),
    ('preset=llama_tiny,runlocal', '--config.model.d_model=abc', '--config.model.d_model=abc'),
])
def test_bad_command_line_is_one_line(tmp_path, config_arg, flag, message):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--config={ROOT}/configs/transformer.py:{config_arg}', f'--workdir={tmp_path / "run"}']
  proc = subprocess.run(cmd + ([flag] if flag else []), capture_output=True, text=True, cwd=ROOT,
                        timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('train.py: error:') and message in lines[0], proc.stderr
  assert not (tmp_path / 'run').exists()


def test_missing_config_file_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/nope.py',
                         f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "train.py: error: --config: [Errno 2] No such file or directory: 'configs/nope.py'")


def test_flag_errors_name_the_flag_the_suggestion_and_moved_fields():
  """What `--config.x.y=...` of a missing field prints, in-process (one line, no escapes)."""
  import errors  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  config = config_dict.ConfigDict(dict(model=dict(pattern='AF'), objective=dict(z_loss=0.0)))
  config.lock()  # as config_flags locks it (lock_config=True)
  with pytest.raises((AttributeError, KeyError)) as e:
    config.model.patern = 'x'  # what config_flags does for --config.model.patern
  line = errors.flag_error_line(e.value, ['train.py', '--config.model.patern=AF'])
  assert line == "--config.model.patern: the config has no field 'patern'; did you mean 'pattern'?"
  with pytest.raises((AttributeError, KeyError)) as e:
    config.model.zzz_unknown = 1
  assert errors.flag_error_line(e.value, ['train.py', '--config.model.zzz_unknown=1']) == (
      "--config.model.zzz_unknown: the config has no field 'zzz_unknown'")
  with pytest.raises((AttributeError, KeyError)) as e:
    config.model.z_loss = 1e-4
  assert errors.flag_error_line(e.value, ['train.py', '--config.optim.z_loss=1e-4'],
                                {'optim.z_loss': 'objective.z_loss'}) == (
      '--config.optim.z_loss: the field moved: use --config.objective.z_loss')


def test_an_unexpected_exception_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
  """Config, data and checkpoint errors are one line; anything else is reported as a bug
  (`errors.run_main`, which train.py, experiments.convert and experiments.sweep run under)."""
  import errors  # pylint: disable=g-import-not-at-top

  def run(kind):
    if kind == 'user':
      raise errors.DataError('data.paths=/x/*.txt matches no file')
    raise TypeError('unsupported operand type(s) for +: int and str')

  monkeypatch.delenv('ARCHLAB_DEBUG', raising=False)
  with pytest.raises(SystemExit) as e:
    errors.run_main('train.py', run, 'user')
  assert str(e.value) == 'train.py: error: data.paths=/x/*.txt matches no file'
  assert 'Traceback' not in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    errors.run_main('train.py', run, 'bug')
  assert str(e.value).startswith('train.py: internal error: TypeError: unsupported operand')
  assert 'This is a bug in archlab' in str(e.value)
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' in err and 'in run' in err
  monkeypatch.setenv('ARCHLAB_DEBUG', '1')
  with pytest.raises(errors.DataError):
    errors.run_main('train.py', run, 'user')
