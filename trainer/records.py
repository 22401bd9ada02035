"""What a run writes about itself: one record per logged step, and `summary.json` at the end."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from models import objectives

# Step metrics that feed other entries rather than being logged themselves.
_NOT_LOGGED = ('ok', 'nll_sum', 'weight_sum', 'bytes_sum')


def log_record(metrics: dict, *, step: int, tokens_per_step: int, train_flops_per_step: float,
               seconds: float, steps: int, peak_flops: float) -> dict:
  """The metrics.jsonl record of training step `step`: tokens and FLOPs so far, loss, bits per
  byte, lr, gradient norm, throughput and MFU over the last `steps` steps (`seconds`), and every
  other metric the step reported (side losses, statistics; a vector as one scalar per entry)."""
  record = {
      'tokens': step * tokens_per_step,
      'flops': step * train_flops_per_step,
      'loss': metrics['loss'],
      'bits_per_byte': objectives.bits_per_byte(metrics['nll_sum'], metrics['bytes_sum']),
      'lr': metrics['lr'],
      'grad_norm': metrics['grad_norm'],
      'tokens_per_sec': steps * tokens_per_step / max(seconds, 1e-9),
      'mfu': train_flops_per_step * steps / max(seconds, 1e-9) / peak_flops,
  }
  for k, v in metrics.items():
    if k in _NOT_LOGGED or k in record:
      continue
    if np.ndim(v):  # a vector (e.g. the MoE load per expert): one scalar per entry
      record.update({f'{k}/{i}': x for i, x in enumerate(np.ravel(v))})
    else:
      record[k] = v
  return record


def summary(run, *, params_count: dict, eval_metrics: dict, xla_step_flops: float | None,
            train_time: float, wall_start: float, peak_flops: float, device_count: int) -> dict:
  """summary.json's contents (sweeps and reports read it)."""
  config = run.config
  return {
      **params_count,
      'steps': run.total_steps,
      'tokens': run.total_steps * run.tokens_per_step,
      'flops': run.total_steps * run.train_flops_per_step,
      'flops_per_token': run.train_flops_per_step / run.tokens_per_step,
      'xla_flops_per_step': xla_step_flops * device_count if xla_step_flops else None,
      # XLA's cost analysis counts a loop's body once: with scanned layers its count covers
      # one repeat of the pattern, with flash attention one block of scores.
      'xla_flops_scan_body_counted_once': run.xla_counts_loops_once,
      'analytic_flops_per_step': run.train_flops_per_step,
      'objective': config.objective.name,
      'final_eval_loss': eval_metrics['eval_loss'],
      'final_eval_bits_per_byte': eval_metrics['eval_bits_per_byte'],
      # True for a diffusion run: its bits per byte are the NELBO, an upper bound.
      'final_eval_bits_per_byte_is_upper_bound': bool(
          eval_metrics.get('eval_bits_per_byte_is_upper_bound', False)),
      'train_time_sec': train_time,
      'wall_time_sec': time.time() - wall_start,
      'peak_flops': peak_flops,
      'devices': device_count,
      'data': run.data.stats,
      'config': json.loads(config.to_json()),
  }


def write_config(workdir: str, config) -> None:
  """`workdir/config.json`: the run config as resolved (vocabulary size included), written
  when a run starts, so tools (experiments.sample) know its tokenizer and model."""
  _write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))


def write_summary(workdir: str, record: dict) -> None:
  """`workdir/summary.json`, written atomically (a sweep takes its presence as 'finished')."""
  _write_json(os.path.join(workdir, 'summary.json'), record)


def _write_json(path: str, record: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, default=str)
  os.replace(tmp, path)
