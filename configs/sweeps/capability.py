"""What the capability sweeps (configs/sweeps/mqar.py, mad.py) share: the models, at matched
width in their reference's layout, and the size rule that trains one of them on one task at one learning rate.

A sweep "architecture" is a (model, task, learning rate, weight decay) point of the protocol,
named `<model>_<task>_lr<lr>_wd<wd>`: the runner (experiments/sweep.py) trains each from
scratch per seed, `experiments.evaluate --sweep_dir` scores them on held-out instances, and
`experiments.report` keeps, per model, task and seed, the grid point with the lowest
validation loss (the answer tokens' NLL on the `val` split; the references pick on the test
accuracy itself), and reports its test accuracy with the spread over seeds and the model's
decode-state size.

Two layouts, the sweep's `layout` field, each as its reference builds models at width d:

`zoology` (MQAR; HazyResearch/zoology, `experiments/models_repo.py` and `model.py`):
LayerNorm, tied embeddings, no positions, no MLP (Zoology's `state_mixer` is the identity),
each mixer preceded by a gated short convolution `C` (Zoology's BaseConv, kernel 3, through
its `Hybrid`: layer 0 the convolution, layer 1 the mixer), as the pattern `zoology` below.

`mad` (MAD; athms/mad-lab's baselines): `layers` blocks of (sequence mixer, MLP) (heads of 16
below d=256, 64 from there; SwiGLU MLP 8d/3; Mamba-2 heads of the same head dim, expand 2),
with the positions and mixer fields of the preset named in MODELS.

  model            zoology  mad   what
  attention        CA       AF    attention (Zoology's MHA: one head; MAD: GQA, RoPE)
  sliding_window   CW       WF    the same over a window of `window` positions (the sweep's)
  moe              CAE      AE    with a mixture-of-experts MLP (4 experts, top 2, capacity)
  deltanet         CG       GF    gated DeltaNet (Zoology: 2 heads; its own short convs)
  mamba2           MM       MF    Mamba-2 (Zoology's Mamba2Block: no BaseConv, no MLP)
  deltanet_hybrid  CGCA     G/A   half the mixers attention (Zoology has no hybrids)
  mamba2_hybrid    MCA      M/A   the same with Mamba-2
  dsa              CS       SF    DeepSeek V3.2's DSA over GQA: each query's top 16 keys by
                                  the lightning indexer (Zoology's NSA rows are the nearest)
  moba             CB       BF    MoBA: blocks of 8 keys, a query's own and its top 2 earlier

The convolution is what lets two layers solve recall quickly (it writes each key into its
value's position, so the mixer only matches the query against it): with a (mixer, MLP) x 2
stack and RoPE instead, attention on MQAR (64, 4) stayed at the 25% plateau of "some value
of the context" after 5,000 steps here, where CA reaches 99% in a few hundred (2026-12-04).

A sublayer that lands later joins by one entry here, as DSA and MoBA did (`MODELS['dsa']`);
every sweep preset that lists all MODELS takes it up, and `models=` names it in any preset.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common
from input_pipeline import tasks as tasks_lib

MODELS = {
    'attention': dict(preset='llama_tiny', mixer='A', zoology='CA', heads=1),
    'sliding_window': dict(preset='llama_tiny', mixer='W', zoology='CW', heads=1),
    'moe': dict(preset='llama_tiny', mixer='A', mlp='E', zoology='CAE', heads=1,
                overrides={'model.moe.num_experts': 4, 'model.moe.num_experts_per_tok': 2,
                           'model.moe.dispatch': 'capacity'}),
    'deltanet': dict(preset='deltanet_tiny', mixer='G', zoology='CG', heads=2),
    'mamba2': dict(preset='mamba2_hybrid_tiny', mixer='M', attention_fraction=0.0,
                   zoology='MM', overrides={'model.position': 'none'}),
    'deltanet_hybrid': dict(preset='deltanet_hybrid_tiny', mixer='G', attention_fraction=0.5,
                            zoology='CGCA', heads=2),
    'mamba2_hybrid': dict(preset='mamba2_hybrid_tiny', mixer='M', attention_fraction=0.5,
                          zoology='MCA', heads=1),
    'dsa': dict(preset='llama_tiny', mixer='S', zoology='CS', heads=1,
                overrides={'model.dsa.topk': 16}),
    'moba': dict(preset='llama_tiny', mixer='B', zoology='CB', heads=1,
                 overrides={'model.moba.block': 8, 'model.moba.topk': 2}),
}
LAYOUTS = ('zoology', 'mad')


def _label(x: float) -> str:
  return f'{x:.0e}'.replace('+', '') if x else '0'


def architecture_name(model: str, task: str, lr: float, wd: float) -> str:
  return f'{model}_{task}_lr{_label(lr)}_wd{_label(wd)}'


def architectures(tasks: dict[str, str], grid: list[tuple[float, float]]) -> dict[str, dict]:
  """ARCHITECTURES of a capability sweep: every model x task (name -> data.task spec) x
  (learning rate, weight decay) of the grid."""
  out = {}
  for model, m in MODELS.items():
    for task, spec in tasks.items():
      for lr, wd in grid:
        out[architecture_name(model, task, lr, wd)] = dict(
            config='configs/transformer.py', arg=f'preset={m["preset"]}', model=model,
            task=task, spec=spec, lr=lr, weight_decay=wd)
  return out


def select(names: list[str] | None, what: str, known) -> list[str]:
  """`names` (or all of `known`) after checking each is known; one line otherwise."""
  names = list(known) if not names else names
  unknown = [n for n in names if n not in known]
  if unknown:
    raise errors.ConfigError(f'{what} {unknown[0]!r} is not one of {sorted(known)}')
  return names


def sweep_config(module_name: str, preset: str, *, models: list[str], tasks: list[str],
                 grid: list[tuple[float, float]], architectures_: dict, **fields):
  """The runner's fields plus what the report reads: for each architecture its model, task,
  learning rate and weight decay (`capability`), and the grid."""
  sweep = ml_collections.ConfigDict(fields)
  sweep.name = f'{module_name}_{preset}'
  names = [architecture_name(m, t, lr, wd) for m in models for t in tasks for lr, wd in grid]
  missing = [n for n in names if n not in architectures_]
  if missing:
    raise errors.ConfigError(f'{module_name}: {missing[0]!r} is not in its ARCHITECTURES')
  sweep.architectures = names
  sweep.sizes = 1
  sweep.tokens_per_param = 20.0  # unused: one width
  sweep.capability = {n: dict(model=architectures_[n]['model'], task=architectures_[n]['task'],
                              lr=architectures_[n]['lr'],
                              weight_decay=architectures_[n]['weight_decay']) for n in names}
  sweep.lr_grid = [list(g) for g in grid]
  sweep.baseline = 'attention'
  return sweep


def size_overrides(arch: dict, d: int, sweep) -> dict:
  """The fields of one protocol point at width `d` in the sweep's `layout`, with the task's
  vocabulary."""
  m = MODELS[arch['model']]
  if sweep.layout not in LAYOUTS:
    raise errors.ConfigError(f'sweep.layout={sweep.layout!r} is not one of {LAYOUTS}')
  if sweep.layout == 'zoology':
    pattern, heads, head_dim = m['zoology'], m.get('heads', 1), 16
    fields = {'model.position': 'none', 'model.norm': 'layernorm',
              'model.tie_embeddings': True, 'model.num_kv_heads': heads}
  else:
    head_dim = 16 if d < 256 else 64
    heads = max(1, d // head_dim)
    if 'attention_fraction' in m:
      pattern = common.hybrid_pattern(m['mixer'], m['attention_fraction'], sweep.layers,
                                      m.get('mlp', 'F'))
    else:
      pattern = (m['mixer'] + m.get('mlp', 'F')) * sweep.layers
    fields = {'model.num_kv_heads': heads // 2 if heads % 2 == 0 else heads}
  fields.update({
      'model.d_model': d,
      'model.num_heads': heads,
      'model.head_dim': 0,
      'model.mlp_dim': 16 * round(8 * d / 3 / 16),  # SwiGLU 8d/3 (also the MoE's experts)
      'model.mlp_activation': 'swiglu',
      'model.pattern': pattern,
      'data.task': arch['spec'],
      'optim.lr': arch['lr'],
      'optim.weight_decay': arch['weight_decay'],
      **m.get('overrides', {}),
  })
  specs = tasks_lib.parse_specs(arch['spec'])
  if not any(cls.TEXT for cls, _ in specs):  # the task's symbols and 4 special tokens
    fields['model.vocab_size'] = max(int(o['vocab_size']) for _, o in specs) + 4
  if not any(cls.CAUSAL for cls, _ in specs):  # reconstruction: MAD's autoencoder backbone
    fields['model.autoencoder'] = True
  if 'M' in pattern:
    fields.update({'model.mamba.num_heads': 2 * d // head_dim, 'model.mamba.head_dim': head_dim})
  if 'W' in pattern:
    fields['model.attention.window'] = sweep.window
  return fields
