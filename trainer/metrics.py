"""Metric outputs: `metrics.jsonl`, TensorBoard event files and a progress bar (process 0)."""

from __future__ import annotations

import json
import os
import sys

from absl import logging
import tqdm



def _tensorboardx():
  """tensorboardX, imported without torch where torch is not loaded yet: its writer imports
  torch (1 s of every training process's start) only to accept torch tensors, which are never
  logged here. `import torch` raises ImportError while sys.modules['torch'] is None."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


_LOGGED = ('loss', 'eval_loss', 'eval_bits_per_byte', 'grad_norm', 'tokens_per_sec', 'mfu')


class MetricWriter:
  """Writes one JSON line and TensorBoard scalars per logged step; drives a progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool,
               progress_bar: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    self.bar = None
    if not enabled:
      return
    _truncate_after(self.path, start_step)
    self.tb = _tensorboardx().SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if progress_bar:
      # disable=None: no bar when stderr is not a terminal (logs, CI, sweeps).
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                           mininterval=0.5, disable=None)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        self.tb.add_scalar(key, value, step)
    if self.bar is None or self.bar.disable:  # no bar to watch: one log line per record
      logging.info('step %d: %s', step, ', '.join(
          f'{k}={v:.4g}' for k, v in record.items() if k in _LOGGED and isinstance(v, float)))

  def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{loss:.4f}', tok_s=f'{tokens_per_sec:,.0f}', refresh=False)
      self.bar.update(step - self.bar.n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


def _plain(value):
  try:
    return float(value) if not isinstance(value, (int, str)) else value
  except (TypeError, ValueError):
    return str(value)


def _truncate_after(path: str, step: int) -> None:
  """On resume, drops lines logged after the checkpoint being resumed (they are re-done)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)
