"""The diffusion NELBOs on a distribution of known entropy: rows from a small random Markov
chain. Trained by the real training step (trainer/step.py), a tiny model's validation NELBO
(masked diffusion, and block diffusion with blocks of 4) stays above the true NLL of the
validation rows and approaches it."""

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import transformer
from models import objectives
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib
from trainer import step as step_lib

K, L, MASK = 4, 16, 4  # states 0..3 (one byte each), rows of 16, MASK the fifth id


def chain():
  """A 4-state chain with peaked rows (Dirichlet 0.3) and its stationary distribution."""
  P_KK = np.random.default_rng(0).dirichlet(np.full(K, 0.3), size=K)
  w, v = np.linalg.eig(P_KK.T)
  pi_K = np.real(v[:, np.argmin(abs(w - 1))])
  return P_KK, pi_K / pi_K.sum()


def sample(P_KK, pi_K, rows, rng):
  """Rows started from the stationary distribution."""
  x_BT = np.zeros((rows, L), np.int32)
  x_BT[:, 0] = rng.choice(K, rows, p=pi_K)
  for t in range(1, L):
    u_B1 = rng.uniform(size=rows)[:, None]
    x_BT[:, t] = (u_B1 > np.cumsum(P_KK[x_BT[:, t - 1]], 1)).sum(1)
  return x_BT


def batch_of(x_BT):
  return {'inputs': x_BT, 'targets': x_BT, 'segment_ids': np.ones_like(x_BT),
          'positions': np.broadcast_to(np.arange(L, dtype=np.int32), x_BT.shape),
          'weights': np.ones(x_BT.shape, np.float32)}


# After 400 steps the NELBO was 2.6% (masked) and 2.9% (blocks of 4) above the true NLL.
@pytest.mark.parametrize('preset', ['mdlm_tiny', 'bd3lm_tiny'])
def test_the_nelbo_stays_above_the_true_entropy_and_approaches_it(preset):
  P_KK, pi_K = chain()
  config = transformer.get_config(f'preset={preset},runlocal')
  config.model.update(dict(d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, pattern='AFAF',
                           vocab_size=K + 1))
  config.data.seq_len, config.train.batch_size, config.train.steps = L, 64, 400
  config.optim.warmup_steps = 20
  config.objective.mask_id, config.objective.eval_t_samples = MASK, 8
  model = models.build(config.model)
  objective = objectives.build(config, objectives.Tokens(bytes_V=jnp.ones(K + 1).at[MASK].set(0)))
  mesh, rules = mesh_lib.make_mesh(config.mesh), rules_lib.get_rules(config.sharding_rules)
  fns = step_lib.jit_functions(config, model, objective, mesh, rules)
  val_BT = sample(P_KK, pi_K, 512, np.random.default_rng(1))
  log_q_B = np.log(pi_K[val_BT[:, 0]]) + np.log(P_KK[val_BT[:, :-1], val_BT[:, 1:]]).sum(1)
  true_nll = -log_q_B.mean() / L  # nats per token of these rows under the chain itself
  rng, nelbos = np.random.default_rng(2), []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = fns.init_state(jax.random.key(0))
    for step in range(1, config.train.steps + 1):
      state, _ = fns.train_step(state, batch_of(sample(P_KK, pi_K, 64, rng)))
      if step % 100 == 0:
        sums = fns.eval_step(state['params'], state['collections'], batch_of(val_BT))
        nelbos.append(float(sums['nll_sum']) / float(sums['weight_sum']))
  gaps = [n - true_nll for n in nelbos]
  assert all(g > 0 for g in gaps), (nelbos, true_nll)            # a bound: never below
  assert gaps[-1] < 0.4 * gaps[0] and gaps[-1] < 0.06 * true_nll, (nelbos, true_nll)
