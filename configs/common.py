"""Shared config pieces: the `:key=value` argument parser and the defaults every family uses."""

from __future__ import annotations

import ml_collections

from models import lm


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
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)}')
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      parsed[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
        parsed[key] = value.lower() in ('true', '1')
      else:
        parsed[key] = type(default)(value)
    except ValueError:
      raise ValueError(f'config argument {key}={value!r} is not a {type(default).__name__}') from None
  return parsed


def model_defaults() -> ml_collections.ConfigDict:
  """The decoder's fields; families change what differs."""
  return ml_collections.ConfigDict(dict(
      name='lm',
      pattern='AF' * 4,          # one character per residual sublayer (DESIGN.md)
      vocab_size=0,              # 0: taken from the tokenizer
      d_model=128,
      num_heads=4,
      num_kv_heads=4,
      head_dim=0,                # 0: d_model // num_heads
      mlp_dim=512,
      mlp_activation='swiglu',   # swiglu | geglu | gelu | gelu_exact | relu | relu2 | silu
      norm='rmsnorm',            # rmsnorm | layernorm
      norm_eps=1e-5,
      position='rope',           # rope | learned | none
      rope_theta=10000.0,
      max_len=2048,              # rows of the learned position table
      tie_embeddings=False,
      use_bias=False,
      bidirectional=False,       # True for diffusion objectives
      init_std=0.02,
      scan_layers=True,          # nn.scan over the pattern's repeating unit
      remat='none',              # none | full | save_dots | save_dots_no_batch
      dtype='float32',           # compute dtype
      param_dtype='float32',
      attention=dict(
          impl='xla',            # xla | dot_product | auto
          softmax_scale=0.0,     # 0: 1/sqrt(head_dim)
          causal_block=128,      # query block rows; skips fully masked key blocks (0: off)
      ),
  ))


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
      z_loss=0.0,                # weight of log(Z)^2 on the output softmax
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
      progress_bar=True,
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  config.sharding_rules = 'fsdp'
  config.peak_flops = 0.0        # per device; 0 measures the fp32 matmul peak at start-up
  config.objective = 'next_token'
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a run of well under a minute on a 2-core CPU."""
  unit, _ = lm.split_pattern(config.model.pattern)
  config.model.pattern = unit * 2
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

