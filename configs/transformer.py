"""Autoregressive decoders: GPT-2 and Llama baselines built from `A` and `F` sublayers, the
transformer families, and the linear-time mixer hybrids (`G`: gated DeltaNet).

Run (the default preset is llama_tiny):

  python train.py --config=configs/transformer.py:preset=llama_tiny --workdir=/tmp/llama_tiny

Arguments after the colon: `preset=NAME`, `runlocal` (shrink to a run of well under a
minute), `seq_len=N`, `batch_size=N`, `steps=N`, and for a hybrid preset
`attention_fraction=F` (the share of layers that are attention, spread evenly), for a block
diffusion preset `block_size=N` (L'). Diffusion presets (`llada_tiny`, `mdlm_tiny`,
`bd3lm_tiny`) train a bidirectional backbone on models/diffusion.py's objectives; their
validation bits per byte are the NELBO, an upper bound. Any field can also be set with
`--config.model.d_model=256` etc.

Measured on this project's 2-core x86_64 CPU machine (no accelerator), byte tokenizer, stdlib
corpus, 2026-11-23 (wall time includes start-up and compilation; the corpus was cached):

  command arguments                 steps x batch x seq   wall     validation bits/byte
  (default: preset=llama_tiny)      300 x 16 x 128         57 s     2.23
  preset=gpt2_tiny                  300 x 16 x 128         84 s *   2.77
  preset=llama_tiny,runlocal        40 x 8 x 64            11 s     4.09
  preset=gpt2_tiny,runlocal         40 x 8 x 64            8 s      4.15
  preset=llama_small,runlocal       40 x 8 x 64            10 s     4.51
  preset=gpt2_small,runlocal        40 x 8 x 64            12 s     6.11

  * with other jobs on the machine. llama_small's full budget (33M tokens) would take about
  4.3 hours at the 2,150 tokens/s measured by experiments/benchmarks/train_throughput.py, and
  gpt2_small is meant for an accelerator; neither was run to its budget here.
"""

from __future__ import annotations

import ml_collections

import errors
from configs import common


def _tiny_budget(config):
  """About a minute on a 2-core CPU: 300 steps x 16 rows x 128 tokens = 0.6M tokens.

  Layers unrolled: at these depths XLA:CPU runs the unrolled step 10-20% faster than the
  scanned one (measured: llama_small 48.7% vs 44.5% MFU) and compiles in seconds anyway.
  """
  config.model.scan_layers = False
  config.data.seq_len = 128
  config.train.batch_size = 16
  config.train.steps = 300
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.optim.warmup_steps = 30


def gpt2_tiny(config):
  """GPT-2 layout, tiny: learned positions, LayerNorm, GELU, MHA, biases, tied embeddings.

  0.96M parameters (0.79M without the token and position tables) with the byte vocabulary.
  """
  m = config.model
  m.pattern = 'AF' * 4
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 128, 4, 4, 512
  m.position, m.norm, m.mlp_activation = 'learned', 'layernorm', 'gelu'
  m.tie_embeddings, m.use_bias = True, True
  m.max_len = 1024
  _tiny_budget(config)


def gpt2_small(config):
  """GPT-2 small (124M with its 50257 BPE vocabulary; 85M without embeddings).

  12 layers, d=768, 12 heads, sequence 1024, batch 32: 10k steps = 328M tokens. Meant for
  an accelerator; on a CPU use `runlocal`.
  """
  gpt2_tiny(config)
  m = config.model
  m.pattern = 'AF' * 12
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 768, 12, 12, 3072
  config.data.seq_len = 1024
  config.train.batch_size = 32
  config.train.steps = 10_000
  config.train.eval_every = 500
  config.train.checkpoint_every = 1000
  config.optim.warmup_steps = 500
  config.optim.lr = 6e-4
  config.model.scan_layers = True


def llama_tiny(config):
  """Llama layout, tiny: RoPE, RMSNorm, SwiGLU, GQA (4 heads, 2 kv heads), untied.

  0.85M parameters (0.82M without the token table) with the byte vocabulary. The default
  config of the Quick start.
  """
  m = config.model
  m.pattern = 'AF' * 4
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 128, 4, 2, 384
  m.position, m.norm, m.mlp_activation = 'rope', 'rmsnorm', 'swiglu'
  m.tie_embeddings, m.use_bias = False, False
  _tiny_budget(config)


def llama_small(config):
  """Llama layout, small: d=384, 6 layers, 6 heads, 2 kv heads, SwiGLU 1024, sequence 512.

  9.6M parameters (9.5M without the token table) with the byte vocabulary; 4000 steps x 16
  x 512 = 33M tokens.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = 'AF' * 6
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = 384, 6, 2, 1024
  config.data.seq_len = 512
  config.train.batch_size = 16
  config.train.steps = 4000
  config.train.eval_every = 200
  config.train.checkpoint_every = 500
  config.optim.warmup_steps = 200
  config.optim.lr = 2e-3


def qwen3_tiny(config):
  """Qwen3 layout, tiny: llama_tiny plus per-head QK-norm and RoPE theta 1e6.

  0.85M parameters (0.82M without the token table) with the byte vocabulary.
  """
  llama_tiny(config)
  config.model.attention.qk_norm = 'head'
  config.model.rope_theta = 1e6
  config.model.norm_eps = 1e-6


def olmo3_tiny(config):
  """OLMo 3 layout, tiny: post-norm residuals (x + norm(op(x))), QK-norm over the whole q/k
  width, 3:1 sliding-window (window 64) to global attention.

  0.92M parameters (0.89M without the token table) with the byte vocabulary.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = 'WFWFWFAF'
  m.num_kv_heads = 4
  m.norm_placement = 'post'
  m.attention.qk_norm = 'full'
  m.attention.window = 64
  m.rope_theta = 5e5
  m.norm_eps = 1e-6


def gpt_oss_tiny(config):
  """GPT-OSS layout, tiny: alternating sliding-window (64) and global attention, learned
  sinks, q/k/v and output biases, MoE (8 experts, top-2, softmax over the top k) in every
  layer, with biases on the router and experts and GPT-OSS's clamped SwiGLU.

  2.65M parameters (2.58M without the token table; 0.9M active per token) with the byte
  vocabulary.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = 'WEAE' * 2
  m.attention.sinks = True
  m.attention.window = 64
  m.attention.qkv_bias = m.attention.o_bias = True
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_mlp_dim = 8, 2, 192
  m.mlp_dim = 192  # unused (no dense MLP), set as GPT-OSS's config.json does
  m.moe.dispatch = 'capacity'  # ragged_dot is slow on XLA:CPU (README)
  m.mlp_activation = 'swiglu_clamped'
  m.mlp_bias = True  # router and expert biases (there is no dense MLP)
  m.rope_theta = 1.5e5


def deepseek_v3_tiny(config):
  """DeepSeek V3 layout, tiny: MLA (q rank 64, kv rank 32, RoPE head dim 16, interleaved),
  one dense MLP layer then MoE layers with a shared expert, sigmoid router, group-limited
  routing (4 groups, top 2) and the aux-loss-free bias.

  1.4M parameters (1.39M without the token table) with the byte vocabulary.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = 'AF' + 'AE' * 3
  m.attention.kind = 'mla'
  m.num_kv_heads = m.num_heads  # unused by MLA (every head has its keys), as DeepSeek's config
  m.attention.mla.update(dict(q_rank=64, kv_rank=32, nope_head_dim=32, rope_head_dim=16,
                              v_head_dim=32, norm_eps=1e-6))  # DeepSeek's latent norm eps
  m.rope_interleaved = True
  m.moe.update(dict(num_experts=8, num_experts_per_tok=2, expert_mlp_dim=96, router='sigmoid',
                    num_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                    aux_loss_weight=0.0, bias_update_rate=1e-3, dispatch='capacity'))


def deepseek_v32_tiny(config):
  """DeepSeek V3.2 layout, tiny: deepseek_v3_tiny with every `A` a DSA `S`
  (models/layers/dsa.py): a lightning indexer of 8 heads of 32 (16 rotated, rotate-half) picks
  32 keys per query, so selection matters beyond 32 tokens (seq_len 128). Eight heads, not
  four: a key scores exactly 0 (a tie) when every head's ReLU is 0, 1/16 of keys with four
  heads, and ties at the top-k boundary are broken arbitrarily (transformers' differently).

  1.51M parameters (1.47M without the token table) with the byte vocabulary: the indexer
  adds 21.6K a layer to deepseek_v3_tiny. Two-stage training
  (dense warm-up of the indexer, then sparse): README "Sparse attention".
  """
  deepseek_v3_tiny(config)
  m = config.model
  m.pattern = m.pattern.replace('A', 'S')
  m.dsa.update(dict(index_heads=8, index_head_dim=32, index_rope_dim=16, topk=32))


def moba_tiny(config):
  """MoBA block-sparse attention, tiny: llama_tiny with every `A` a `B` (models/layers/moba.py):
  blocks of 16 positions, each query its own block plus the top 2 earlier ones, so at
  seq_len 128 a query sees at most 48 of 128 keys (the runlocal rows of 64: 48 of 64).

  0.85M parameters (0.82M without the token table) with the byte vocabulary, as llama_tiny:
  the selection adds none.
  """
  llama_tiny(config)
  config.model.pattern = 'BF' * 4
  config.model.moba.update(dict(block=16, topk=2))


def qwen3_next_tiny(config):
  """Qwen3-Next layout, tiny: three gated-DeltaNet layers per gated-attention layer, each
  followed by a MoE with a gated shared expert (pattern ('GE' * 3 + 'AE') * 2).

  Attention: 4 heads of 32, 2 kv heads, per-head QK-norm, elementwise sigmoid output gate,
  RoPE on a quarter of each head. DeltaNet: 2 key heads and 4 value heads of 32, a 4-tap
  convolution, chunks of 64. Every norm zero-centred. MoE: 8 experts of 64, top 2, one
  shared expert of 128 behind a sigmoid gate.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = ('GE' * 3 + 'AE') * 2
  m.head_dim = 32
  m.attention.qk_norm, m.attention.output_gate = 'head', 'elementwise'
  m.rope_fraction, m.rope_theta, m.norm_eps = 0.25, 1e7, 1e-6
  m.norm_zero_centred = True
  m.deltanet.update(dict(key_heads=2, value_heads=4, key_head_dim=32, value_head_dim=32))
  m.moe.update(dict(num_experts=8, num_experts_per_tok=2, expert_mlp_dim=64, router='softmax',
                    norm_topk_prob=True, num_shared_experts=1, shared_expert_mlp_dim=128,
                    shared_expert_gate=True, dispatch='capacity'))


def deltanet_tiny(config):
  """Gated DeltaNet only, tiny: llama_tiny with every attention layer a `G` (4 heads of 32,
  no positions: the recurrence orders the tokens)."""
  llama_tiny(config)
  config.model.pattern = 'GF' * 4
  config.model.position = 'none'


def deltanet_hybrid_tiny(config):
  """A gated-DeltaNet hybrid whose attention fraction is the config argument
  `attention_fraction` (default 0.25: `GFGFGFAF` x 2, Qwen3-Next's 3:1): llama_tiny's
  attention and MLP with 8 layers."""
  llama_tiny(config)
  config.model.pattern = common.hybrid_pattern('G', 0.25, 8)


# Nemotron-H's hybrid_override_pattern characters -> archlab sublayers: one HF layer each.
HYBRID_LAYERS = {'M': 'M', '*': 'A', '-': 'F', 'E': 'E'}


def from_hybrid_pattern(hybrid: str) -> str:
  """`model.pattern` of a Nemotron-H `hybrid_override_pattern` ('M-M-M*-' -> 'MFMFMAF')."""
  unknown = sorted(set(hybrid) - set(HYBRID_LAYERS))
  if unknown:
    raise errors.ConfigError(f'hybrid pattern {hybrid!r} has {unknown}; its characters are '
                             f'{sorted(HYBRID_LAYERS)} (Mamba-2, attention, MLP, MoE)')
  return ''.join(HYBRID_LAYERS[c] for c in hybrid)


def mamba2_tiny(config):
  """Pure Mamba-2 stack, tiny: 8 `M` sublayers (no MLP, as mamba_ssm's Mamba2 LM), d=128,
  inner width 256 in 8 heads of 32, state 32, one group, chunk 64, no positions.

  0.94M parameters (0.91M without the token table) with the byte vocabulary.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = 'M' * 8
  m.position = 'none'
  m.num_kv_heads = m.num_heads  # attention's fields, unused; as a mamba2 checkpoint reads back
  m.mamba.update(dict(num_heads=0, expand=2, head_dim=32, state_dim=32, groups=1, chunk=64))


def nemotron_h_tiny(config):
  """Nemotron-H layout, tiny: hybrid_override_pattern 'M-M-M*-' (Mamba-2, ReLU^2 MLP, one
  attention layer without positions), d=128, Mamba inner width 256 in 8 heads of 32, state
  32 in 2 groups, dt >= 0.001 as Nemotron-H clamps it.

  0.77M parameters (0.73M without the token table) with the byte vocabulary.
  """
  llama_tiny(config)
  m = config.model
  m.pattern = from_hybrid_pattern('M-M-M*-')
  m.position = 'none'
  m.mlp_activation = 'relu2'
  m.mamba.update(dict(num_heads=0, expand=2, head_dim=32, state_dim=32, groups=2, chunk=64,
                      dt_limit_min=0.001))


def mamba2_hybrid_tiny(config):
  """A Mamba-2 hybrid whose attention fraction is the config argument `attention_fraction`
  (default 0.25): mamba2_tiny's mixer with llama_tiny's attention and a SwiGLU MLP after
  every mixer, 8 layers."""
  mamba2_tiny(config)
  m = config.model
  m.pattern = common.hybrid_pattern('M', 0.25, 8)
  m.position, m.mlp_activation, m.mlp_dim, m.num_kv_heads = 'rope', 'swiglu', 384, 2


def llada_tiny(config):
  """LLaDA layout, tiny: llama_tiny's sublayers (RoPE, RMSNorm, SwiGLU, GQA) without the causal
  mask, trained as masked diffusion (models/diffusion.py). LLaDA 8B is a Llama-style
  decoder made bidirectional.

  0.85M parameters (0.82M without the token table) with the byte vocabulary; 300 x 16 x 128
  tokens, as llama_tiny.
  """
  llama_tiny(config)
  config.model.bidirectional = True
  config.objective.name = 'masked_diffusion'


def mdlm_tiny(config):
  """MDLM layout, tiny: MDLM's DiT backbone without its (unused) time conditioning, i.e.
  pre-LayerNorm, GELU MLP (4x), RoPE, MHA, bidirectional; masked diffusion.

  0.86M parameters (0.82M without the token table) with the byte vocabulary;
  300 x 16 x 128 tokens.
  """
  llama_tiny(config)
  m = config.model
  m.norm, m.mlp_activation, m.num_kv_heads, m.mlp_dim = 'layernorm', 'gelu', 4, 512
  m.bidirectional = True
  config.objective.name = 'masked_diffusion'


def bd3lm_tiny(config):
  """BD3-LM, tiny: mdlm_tiny's backbone trained as block diffusion with blocks of L' = 4
  (`block_size=16` for L' = 16): each step runs rows of 2 x 128 tokens [x_noisy, x].

  0.86M parameters with the byte vocabulary; 300 x 16 x 128 tokens (more than twice the
  FLOPs of mdlm_tiny per token: each token runs twice, in rows twice as long).
  """
  mdlm_tiny(config)
  set_block_size(config, 4)
  config.objective.name = 'block_diffusion'


def set_block_size(config, block: int) -> None:
  """Block diffusion's L': the objective's blocks and the attention mask's, kept equal."""
  config.objective.block_size = block
  config.model.diffusion_block = block


# Presets whose mixer `attention_fraction=` re-lays (attention at evenly spread layers).
HYBRID_MIXERS = {'deltanet_hybrid_tiny': 'G', 'mamba2_hybrid_tiny': 'M'}

PRESETS = {f.__name__: f for f in (gpt2_tiny, gpt2_small, llama_tiny, llama_small, qwen3_tiny,
                                   olmo3_tiny, gpt_oss_tiny, deepseek_v3_tiny, deepseek_v32_tiny,
                                   moba_tiny, qwen3_next_tiny,
                                   deltanet_tiny, deltanet_hybrid_tiny, mamba2_tiny,
                                   nemotron_h_tiny, mamba2_hybrid_tiny, llada_tiny, mdlm_tiny,
                                   bd3lm_tiny)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, preset='llama_tiny', runlocal=False, seq_len=0, batch_size=0,
                          steps=0, attention_fraction=-1.0, block_size=0)
  if args.preset not in PRESETS:
    raise errors.ConfigError(f'preset={args.preset!r} is not one of {sorted(PRESETS)} '
                     f'(configs/transformer.py)')
  config = common.base_config()
  PRESETS[args.preset](config)
  if args.attention_fraction >= 0:
    if args.preset not in HYBRID_MIXERS:
      raise errors.ConfigError(f'config argument attention_fraction applies to the hybrid presets '
                               f'{sorted(HYBRID_MIXERS)}, not preset={args.preset!r}')
    layers = len(config.model.pattern) // 2
    config.model.pattern = common.hybrid_pattern(HYBRID_MIXERS[args.preset],
                                                 args.attention_fraction, layers)
  if args.block_size:
    if config.objective.name != 'block_diffusion':
      raise errors.ConfigError(f'config argument block_size applies to block diffusion presets '
                               f'(bd3lm_tiny), not preset={args.preset!r}')
    set_block_size(config, args.block_size)
  if args.runlocal:
    common.apply_runlocal(config)
  if args.seq_len:
    config.data.seq_len = args.seq_len
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.steps:
    config.train.steps = args.steps
  return config
