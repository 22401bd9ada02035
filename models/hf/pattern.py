"""`model.pattern` as Hugging Face decoder layers, and back; config.json `layer_types`.

A transformers decoder layer is two archlab sublayers: a mixer then an MLP. So the pattern
'WEAE' is the layers [('W', 'E'), ('A', 'E')]: a sliding-window attention layer, then a
global one, each followed by a mixture of experts. Every family reads `model.pattern`
through `layers` (which refuses, in one line naming `model.pattern`, what the family's
layers cannot hold) and writes it with `join`.
"""

from __future__ import annotations

from models.hf import family as family_lib

Layer = tuple[str, str]  # (mixer char, MLP char) of one HF decoder layer

# config.json `layer_types` -> the mixer char of the layer (olmo3, gpt_oss)
LAYER_TYPES = {'sliding_attention': 'W', 'full_attention': 'A'}
_TYPE_OF = {char: name for name, char in LAYER_TYPES.items()}


def refuse(cfg, why: str):
  """Raises the one-line refusal of `model.pattern`: `why` says what the family needs."""
  raise family_lib.UnsupportedError(f'model.pattern={cfg.pattern!r} {why}')


def layers(cfg, mixers: str, mlps: str) -> list[Layer]:
  """The (mixer, MLP) chars of each layer of `model.pattern`, refused unless the pattern is
  one or more layers of one of `mixers` then one of `mlps`."""
  p = cfg.pattern
  pairs = [(p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)]
  if len(p) % 2 or not pairs or any(m not in mixers or f not in mlps for m, f in pairs):
    refuse(cfg, f'is not {_either(mixers)}{_either(mlps)} per layer')
  return pairs


def join(pairs: list[Layer]) -> str:
  """The `model.pattern` of these layers (the inverse of `layers`)."""
  return ''.join(m + f for m, f in pairs)


def _either(chars: str) -> str:
  return chars if len(chars) == 1 else f'({"|".join(chars)})'


def sliding_except_every(every: int, num_layers: int) -> list[str]:
  """Default `layer_types`: sliding attention, but full attention on every `every`-th layer."""
  return ['sliding_attention' if (i + 1) % every else 'full_attention'
          for i in range(num_layers)]


def mixers(hf: family_lib.HfConfig, types: list, num_layers: int) -> list[str]:
  """The mixer char of each layer from `types` (config.json `layer_types`, or the family's
  default when absent), refused unless each of the `num_layers` layers has one of
  `LAYER_TYPES`."""
  if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
    hf.refuse('layer_types', f'must give one of {list(LAYER_TYPES)} for each of the '
              f'num_hidden_layers={num_layers} layers')
  return [LAYER_TYPES[t] for t in types]


def layer_types(pairs: list[Layer]) -> list[str]:
  """config.json `layer_types` of layers whose mixers are `W` or `A` (the inverse of `mixers`)."""
  return [_TYPE_OF[m] for m, _ in pairs]


def sparse_layers(hf: family_lib.HfConfig, num_layers: int, experts: int, k: int) -> list[bool]:
  """Which layers have a sparse MoE MLP in the Qwen-MoE families: layer i unless it is in
  `mlp_only_layers`, when (i + 1) % `decoder_sparse_step` == 0 and there are experts;
  refuses a step that is not a positive integer and a top-k outside [1, experts]."""
  step = hf.get('decoder_sparse_step', 1)
  if not isinstance(step, int) or step < 1:
    hf.refuse('decoder_sparse_step', 'must be a positive integer')
  dense = set(hf.get('mlp_only_layers', []))
  sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
  if any(sparse) and not 1 <= k <= experts:
    hf.refuse('num_experts_per_tok', f'must be in [1, num_experts={experts}]')
  return sparse
