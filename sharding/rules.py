"""Logical axis rules: presets mapping the models' logical axis names onto mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and
optimizer state), `tensor` (Megatron-style within a layer), `expert` (experts; data
parallel outside the MoE layers). Rules are tried in order; flax skips a mesh axis already
used by another dimension of the same array, so `embed -> fsdp` shards parameters but not
activations whose batch dimension already took `fsdp`, and `latent -> fsdp` shards MLA's
up-projections (latent, heads, head_dim), which have no `embed` dimension, while the
down-projections (embed, latent) stay sharded by `embed`.

  logical axis        dp      fsdp    fsdp_tp   fsdp_ep
  batch               data, fsdp, expert (every preset)
  embed               -       fsdp    fsdp      fsdp
  latent (MLA rank)   -       fsdp    fsdp      fsdp
  heads, kv_heads     -       -       tensor    -
  mlp                 -       -       tensor    -
  vocab               -       -       tensor    -
  experts             -       -       -         expert
  expert_groups       data, fsdp, expert (data, fsdp in fsdp_ep): MoE capacity groups
  length, head_dim, norm, layers, position, state: replicated

Axes the rules do not name (or a mesh axis of size 1) leave that dimension replicated.
"""

from __future__ import annotations

import errors

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
BATCH = ('data', 'fsdp', 'expert')

_REPLICATED = (('length', None), ('head_dim', None), ('norm', None), ('layers', None),
               ('position', None), ('state', None))
# MoE capacity buffers (group, expert, slot, embed): the group axis keeps the batch's mesh
# axes, or data x fsdp when the experts took `expert` (fsdp_ep: tokens move to their experts).
_EXPERT_GROUPS = (('expert_groups', BATCH), ('expert_groups', ('data', 'fsdp')))

PRESETS = {
    'dp': (('batch', BATCH),) + _REPLICATED + (
        ('embed', None), ('latent', None), ('heads', None), ('kv_heads', None),
        ('mlp', None), ('vocab', None), ('experts', None)) + _EXPERT_GROUPS,
    'fsdp': (('batch', BATCH),) + _REPLICATED + (
        ('embed', 'fsdp'), ('latent', 'fsdp'), ('heads', None), ('kv_heads', None),
        ('mlp', None), ('vocab', None), ('experts', None)) + _EXPERT_GROUPS,
    'fsdp_tp': (('batch', BATCH),) + _REPLICATED + (
        ('embed', 'fsdp'), ('latent', 'fsdp'), ('heads', 'tensor'), ('kv_heads', 'tensor'),
        ('mlp', 'tensor'), ('vocab', 'tensor'), ('experts', None)) + _EXPERT_GROUPS,
    'fsdp_ep': (('batch', BATCH),) + _REPLICATED + (
        ('experts', 'expert'), ('embed', 'fsdp'), ('latent', 'fsdp'), ('heads', None),
        ('kv_heads', None), ('mlp', None), ('vocab', None)) + _EXPERT_GROUPS,
}


def get_rules(name: str):
  if name not in PRESETS:
    raise errors.ConfigError(f'sharding_rules={name!r} is not one of {sorted(PRESETS)}')
  return PRESETS[name]
