"""Shared config pieces: the `:key=value` argument parser and the defaults every family uses.

The model's fields are declared beside the modules that read them (the decoder in
models/lm.py, each sublayer in its file under models/layers/) and the objectives' beside
theirs (models/objectives.py); `base_config()` gathers them with the data, optimizer, training
and mesh fields below.
"""

from __future__ import annotations

import ml_collections

import errors
from models import lm
from models import objectives
from models import schema


# Fields that moved: the old dotted name -> the new one. A command line that sets an old name
# is refused in one line that gives the new spelling (train.py).
MOVED_FIELDS = {
    'optim.z_loss': 'objective.z_loss',
    'objective': 'objective.name',  # config.objective is a section (models/objectives.py)
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `'preset=llama_tiny,runlocal,seq_len=128'`.

  Each key must be one of `defaults`; its value is converted to the default's type. A bare
  key is `True` for a boolean. Unknown keys and unconvertible values raise one clear line.
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or '').split(',')):
    key, has_value, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise errors.ConfigError(f'config argument {key!r} is not one of {sorted(defaults)}')
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise errors.ConfigError(f'config argument {key!r} needs a value ({key}=...)')
      parsed[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
          raise errors.ConfigError(value)
        parsed[key] = value.lower() in ('true', '1')
      else:
        parsed[key] = type(default)(value)
    except ValueError:
      raise errors.ConfigError(f'config argument {key}={value!r} is not a {type(default).__name__}') from None
  return parsed


def hybrid_pattern(mixer: str, attention_fraction: float, layers: int, mlp: str = 'F') -> str:
  """`layers` layers of (mixer, `mlp`), round(fraction x layers) of whose mixers are `A`,
  spread evenly with each attention layer last in its group (0.25 of 8: GFGFGFAF GFGFGFAF,
  as Qwen3-Next places them)."""
  if not 0.0 <= attention_fraction <= 1.0:
    raise errors.ConfigError(f'attention_fraction={attention_fraction} must be in [0, 1]')
  n = round(attention_fraction * layers)
  return ''.join(('A' if (i + 1) * n // layers > i * n // layers else mixer) + mlp
                 for i in range(layers))


def get_field(node, dotted: str):
  """`node['a']['b']` for `dotted='a.b'` (ConfigDicts and dicts)."""
  for key in dotted.split('.'):
    node = node[key]
  return node


def set_field(node, dotted: str, value) -> None:
  """Sets `node['a']['b'] = value` for `dotted='a.b'`."""
  *parents, leaf = dotted.split('.')
  node = get_field(node, '.'.join(parents)) if parents else node
  node[leaf] = value


def model_defaults() -> ml_collections.ConfigDict:
  """config.model's fields and defaults: the decoder's (models/lm.py) and each sublayer's,
  declared beside its module (models/layers/*.py); models/schema.py assembles them."""
  return schema.model_defaults()


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults; family configs change what differs."""
  config = ml_collections.ConfigDict()
  config.model = model_defaults()
  config.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',           # stdlib | text | jsonl
      paths='',                  # glob(s), comma-separated, for text / jsonl
      text_field='text',
      tokenizer='bytes',         # bytes | bpe
      bpe_vocab_size=4096,
      tokenizer_path='',
      bpe_train_bytes=8_000_000,
      seq_len=256,
      val_fraction=0.05,
      shuffle_seed=0,
      eval_batches=4,
      cache_dir='',              # '' -> $ARCHLAB_CACHE or ~/.cache/archlab
      task='',                   # 'mqar:seq_len=128,...': train on a synthetic task instead
                                 # of the corpus (input_pipeline/tasks; `;` mixes several)
  ))
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-3,
      schedule='cosine',         # cosine (to final_lr_fraction) | linear | wsd | constant
      warmup_steps=100,
      final_lr_fraction=0.1,
      decay_fraction=0.2,        # wsd: the last fraction of steps decays linearly
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,    # weight decay on embeddings and the head
      grad_clip=1.0,             # global norm; 0 disables
      trainable='all',           # all | indexer: only DSA's indexer trains (its dense warm-up)
  ))
  config.train = ml_collections.ConfigDict(dict(
      batch_size=16,             # global, in rows of data.seq_len tokens
      grad_accum=1,              # micro-batches per step
      steps=0,                   # the budget: exactly one of steps, tokens, flops
      tokens=0,
      flops=0.0,
      seed=0,
      log_every=10,
      eval_every=100,
      checkpoint_every=200,
      keep_checkpoints=3,
      async_checkpoint=True,     # write checkpoints in a background thread (orbax async)
      progress_bar=True,
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  config.sharding_rules = 'fsdp'
  config.peak_flops = 0.0        # per device; 0 measures the fp32 matmul peak at start-up
  # `name` and every objective's fields (models/objectives.py): next_token's z_loss, ...
  config.objective = objectives.objective_defaults()
  config.init_from = ''          # hf:/dir (a Hugging Face checkpoint) or run:/workdir (an archlab
                                 # run): start from its parameters (trainer/init_from.py)
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a run of well under a minute on a 2-core CPU."""
  unit, repeats = lm.split_pattern(config.model.pattern)
  config.model.pattern = unit * min(repeats, 2)
  config.model.d_model = min(config.model.d_model, 64)
  config.model.head_dim = 0
  heads, kv = config.model.num_heads, config.model.num_kv_heads
  config.model.num_heads = min(heads, 4)
  config.model.num_kv_heads = max(1, config.model.num_heads // max(1, heads // kv))
  config.model.mlp_dim = min(config.model.mlp_dim, 4 * config.model.d_model)
  config.data.seq_len = min(config.data.seq_len, 64)
  config.data.eval_batches = 2
  config.train.batch_size = min(config.train.batch_size, 8)
  config.train.steps, config.train.tokens, config.train.flops = 40, 0, 0.0
  config.train.log_every = 10
  config.train.eval_every = 20
  config.train.checkpoint_every = 20
  config.optim.warmup_steps = 5

