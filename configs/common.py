"""Shared config pieces: the `:key=value` argument parser and the defaults every family uses."""

from __future__ import annotations

import ml_collections

import errors
from models import lm


# Fields that moved: the old dotted name -> the new one. A command line that sets an old name
# is refused in one line that gives the new spelling (train.py).
MOVED_FIELDS: dict[str, str] = {}


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
      mlp_activation='swiglu',   # swiglu | geglu | swiglu_clamped | gelu | gelu_exact | relu | relu2 | silu
      swiglu_limit=7.0,          # swiglu_clamped (GPT-OSS): gate <= limit, |up| <= limit,
      swiglu_alpha=1.702,        #   out = (up + 1) * gate * sigmoid(alpha * gate)
      norm='rmsnorm',            # rmsnorm | layernorm
      norm_eps=1e-5,
      norm_zero_centred=False,   # scale stored as w, applied as 1 + w (Gemma, Qwen3-Next)
      norm_placement='pre',      # pre: x + op(norm(x)) | post: x + norm(op(x)) (OLMo 2/3) | sandwich (Gemma 2/3)
      position='rope',           # rope | learned | none
      rope_theta=10000.0,
      rope_fraction=1.0,         # partial rotary: rotate the first int(head_dim * fraction) dims
      rope_interleaved=False,    # pairs (2i, 2i+1) (GPT-J, DeepSeek) instead of rotate-half (i, i+R/2)
      rope_scaling=dict(         # as transformers' rope_scaling / rope_parameters
          kind='none',           # none | linear | llama3 | yarn
          factor=1.0,            # context extension factor (linear, llama3, yarn)
          original_max_len=8192,  # llama3 and yarn: pre-training context (original_max_position_embeddings)
          low_freq_factor=1.0,   # llama3
          high_freq_factor=4.0,  # llama3
          beta_fast=32.0,        # yarn: ramp boundaries in rotations
          beta_slow=1.0,         # yarn
          mscale=0.0,            # yarn: with mscale_all_dim, attention factor mscale(m) / mscale(m_all)
          mscale_all_dim=0.0,    # yarn (MLA also multiplies its softmax scale by mscale(m_all)^2)
          attention_factor=0.0,  # yarn: cos/sin factor; 0: 0.1 ln(factor) + 1
          truncate=True,         # yarn: round the ramp boundaries to integers
      ),
      max_len=2048,              # rows of the learned position table
      tie_embeddings=False,
      use_bias=False,            # every bias (attention, MLP); the switches below add them separately
      mlp_bias=False,            # biases on the MLP's projections
      embed_scale=1.0,           # multiplies token embeddings (Gemma: sqrt(d_model))
      logit_softcap=0.0,         # cap * tanh(logits / cap) on the output logits (0: off)
      bidirectional=False,       # True for diffusion objectives
      init_std=0.02,
      scan_layers=True,          # nn.scan over the pattern's repeating unit
      remat='none',              # none | full | save_dots | save_dots_no_batch
      dtype='float32',           # compute dtype
      param_dtype='float32',
      attention=dict(
          kind='mha',            # mha (MHA/GQA/MQA by num_kv_heads) | mla (DeepSeek, see mla below)
          impl='auto',           # auto | xla (reference) | flash (blocked) | dot_product (jax.nn) | cudnn (GPU)
          softmax_scale=0.0,     # 0: 1/sqrt(head_dim)
          causal_block=128,      # query block rows; skips fully masked key blocks (0: off)
          window=0,              # W sublayers: a query sees keys fewer than window positions back
          qk_norm='none',        # none | head (RMSNorm per head, Qwen3) | full (whole q/k width, OLMo 2/3)
          qkv_bias=False,        # biases on q, k, v (Qwen2)
          o_bias=False,          # bias on the output projection
          output_gate='none',    # none | headwise | elementwise: sigmoid(x W_gate) * attention (Qwen3-Next)
          sinks=False,           # a learned logit per head in the softmax denominator (GPT-OSS)
          mla=dict(              # kind='mla': multi-head latent attention (models/layers/mla.py)
              q_rank=0,          # query bottleneck rank (0: full-rank queries)
              kv_rank=64,        # shared key/value latent
              nope_head_dim=32,  # per-head key/query features without RoPE
              rope_head_dim=16,  # RoPE features (the key's shared by all heads)
              v_head_dim=32,
              norm_eps=0.0,      # eps of the latent RMSNorms (0: model.norm_eps; DeepSeek: 1e-6)
          ),
      ),
      moe=dict(                  # the `E` sublayer (models/layers/moe.py)
          num_experts=8,
          num_experts_per_tok=2,     # top-k
          expert_mlp_dim=0,          # 0: model.mlp_dim
          router='softmax',          # softmax | sigmoid (scores for top-k and weights, fp32)
          norm_topk_prob=True,       # renormalise the k weights to sum to one
          routed_scaling_factor=1.0, # multiplies the routed weights (DeepSeek V3: 2.5)
          num_shared_experts=0,      # always-on experts, one MLP of n x shared_expert_mlp_dim
          shared_expert_mlp_dim=0,   # 0: expert_mlp_dim
          shared_expert_gate=False,  # sigmoid(x w) gate on the shared output (Qwen2-MoE)
          n_group=1,                 # DeepSeek group-limited routing: experts in n_group groups,
          topk_group=1,              #   top-k only within the best topk_group groups
          aux_loss_weight=0.01,      # Switch/GShard load-balancing loss, summed over layers
          router_z_loss_weight=0.0,  # ST-MoE z-loss on the router logits
          bias_update_rate=0.0,      # DeepSeek V3 aux-loss-free bias step (0: off; V3 0.001)
          correction_bias=False,     # a frozen per-expert parameter added to the scores for
                                     #   selection only (a checkpoint's e_score_correction_bias)
          dispatch='dropless',       # dropless (ragged_dot) | capacity | dense (reference)
          capacity_factor=1.25,      # capacity: slots per expert = cf * tokens * k / E
          capacity_group='row',      # capacity: a buffer per batch row (tokens stay on their
                                     #   device) | batch (one for all tokens of the step)
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
  config.init_from = ''          # hf:/dir: start from a Hugging Face checkpoint (models/hf)
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

