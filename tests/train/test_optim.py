"""The optimizer recipe (seqjax.train.optim) against closed forms and optax-free float64 arithmetic.

The trainer tests only see the recipe through a falling loss, which almost any optimizer gives. Here:
- the learning-rate schedule at chosen steps against its closed form (linear warmup from 0, then cosine from the
  peak to peak * end_lr_fraction at num_steps, constant after);
- the schedule as the optimizer applies it: with b1 = b2 = 0 the first Adam moments are g and g^2, so every
  update is -lr_t * g / (|g| + eps), i.e. -lr_t * sign(g) for eps -> 0: the step size of each parameter is lr_t;
- global-norm clipping at a known norm;
- decoupled weight decay on matrices (ndim >= 2) only, on the LM's real parameter tree;
- several AdamW steps of the whole chain against a NumPy transcription of the algorithm (Loshchilov & Hutter).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import OptimConfig
from seqjax.models.lm import DecoderLM
from seqjax.train.optim import learning_rate_schedule, make_optimizer
from tests.train.helpers import tiny_config


def closed_form_lr(step, *, peak, warmup, num_steps, end_fraction):
  """Linear warmup 0 -> peak over `warmup` steps, cosine peak -> peak * end_fraction at `num_steps`, then flat."""
  end = peak * end_fraction
  if step < warmup:
    return peak * step / warmup
  if step >= num_steps:
    return end
  progress = (step - warmup) / (num_steps - warmup)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_schedule_closed_form():
  """Catches (each planted once by rewriting learning_rate_schedule in a scratch plugin): the cosine ending at
  num_steps + warmup, the end value forgotten (decay to 0), the warmup starting at the peak (init_value=lr), a
  warmup of half the configured steps."""
  cfg = OptimConfig(learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.1)
  schedule = learning_rate_schedule(cfg, num_steps=1100)
  expected = {0: 0.0, 50: 5e-4, 100: 1e-3,  # warmup: 0, half, the peak
              350: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)),  # a quarter of the cosine
              600: 5.5e-4,  # half way down the cosine: (peak + end) / 2
              1100: 1e-4, 1500: 1e-4}  # the end value, and after the end
  for step, want in expected.items():
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-10), step
    assert want == pytest.approx(closed_form_lr(step, peak=1e-3, warmup=100, num_steps=1100, end_fraction=0.1))
  # No warmup: the first step already takes the peak.
  no_warmup = learning_rate_schedule(OptimConfig(learning_rate=2e-3, warmup_steps=0, end_lr_fraction=0.0), 10)
  assert float(no_warmup(0)) == pytest.approx(2e-3, rel=1e-6)
  assert float(no_warmup(5)) == pytest.approx(1e-3, rel=1e-5)


def _sign_adam_config(**kw):
  """b1 = b2 = 0 and a tiny eps: every update is -lr_t * sign(g) (no decay, no clipping unless asked)."""
  return OptimConfig(**{**dict(learning_rate=1e-2, warmup_steps=3, end_lr_fraction=0.25, weight_decay=0.0,
                               b1=0.0, b2=0.0, eps=1e-12, grad_clip_norm=0.0), **kw})


def test_optimizer_steps_by_the_schedule():
  """The step size of every parameter at step t is lr_t (the optimizer's step counter starts at 0 as the schedule).

  Catches (planted by rewriting make_optimizer): the schedule not passed to adamw (a constant lr), the schedule
  evaluated one step ahead; and every schedule bug listed above."""
  cfg = _sign_adam_config()
  num_steps = 8
  opt = make_optimizer(cfg, num_steps)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  grads = {"w": jnp.full((3, 4), -0.3), "b": jnp.full((4,), 2.0)}
  update = jax.jit(opt.update)
  state = opt.init(params)
  for t in range(num_steps + 2):
    updates, state = update(grads, state, params)
    lr = closed_form_lr(t, peak=1e-2, warmup=3, num_steps=num_steps, end_fraction=0.25)
    np.testing.assert_allclose(np.asarray(updates["w"]), lr, rtol=1e-5, atol=1e-12, err_msg=str(t))
    np.testing.assert_allclose(np.asarray(updates["b"]), -lr, rtol=1e-5, atol=1e-12, err_msg=str(t))


def _grads_of_norm(norm, seed=0):
  rng = np.random.default_rng(seed)
  g = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal((4,))}
  total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
  return {k: jnp.asarray(v * norm / total, jnp.float32) for k, v in g.items()}


def test_global_norm_clipping_at_a_known_norm():
  """A gradient of global norm 10 with grad_clip_norm=1 updates exactly as the same gradient scaled to norm 1
  (with clipping off); a gradient of norm 0.5 is left alone. eps = 0.1 makes Adam's first update depend on the
  gradient's scale (-lr g / (|g| + eps)), so a missing clip is visible (asserted).

  Catches (planted by rewriting make_optimizer): no clipping, clipping each leaf to norm 1 separately,
  element-wise clipping (optax.clip), clipping after Adam instead of before, eps moved inside the square root."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  clip = make_optimizer(_sign_adam_config(grad_clip_norm=1.0, eps=0.1, warmup_steps=0), 10)
  plain = make_optimizer(_sign_adam_config(grad_clip_norm=0.0, eps=0.1, warmup_steps=0), 10)

  def first_update(opt, grads):
    return jax.jit(opt.update)(grads, opt.init(params), params)[0]

  big, unit, small = _grads_of_norm(10.0), _grads_of_norm(1.0), _grads_of_norm(0.5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               first_update(clip, big), first_update(plain, unit))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               first_update(clip, small), first_update(plain, small))
  unclipped = first_update(plain, big)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(unclipped), jax.tree.leaves(first_update(plain, unit)))) > 1e-4
  # Optax-free arithmetic: b1 = b2 = 0 -> update = -lr * g_c / (|g_c| + eps), g_c = g * 1 / 10, lr = 1e-2.
  for name in ("w", "b"):
    g_c = np.asarray(big[name], np.float64) / 10.0
    np.testing.assert_allclose(first_update(clip, big)[name], -1e-2 * g_c / (np.abs(g_c) + 0.1), rtol=1e-5)


def test_weight_decay_on_matrices_only_in_the_lm():
  """With zero gradients only the decay moves parameters: every leaf with ndim >= 2 of the LM (embedding, kernels)
  shrinks by exactly lr * weight_decay * p, every 1-d leaf (norm scales and biases) stays bitwise the same.

  Catches (planted by rewriting _decay_mask / make_optimizer): the decay mask inverted, a mask of ndim >= 1
  (decay everywhere), no mask, L2 regularisation added to the gradient before Adam instead of decoupled decay
  (zero gradients then give an Adam-normalised step of size lr, not lr * wd * p), clipping after Adam."""
  model = DecoderLM(tiny_config(model={"norm": "layernorm", "num_layers": 1}).model)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)  # the LM's tree and shapes; values drawn here (no init compile needed)
  params = jax.tree.map(lambda s: (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  ndims = {leaf.ndim for leaf in jax.tree.leaves(params)}
  assert 1 in ndims and 2 in ndims  # the tree has both kinds
  cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.5, b1=0.9, b2=0.95,
                    eps=1e-8, grad_clip_norm=1.0)
  opt = make_optimizer(cfg, 100)
  update = jax.jit(opt.update)  # one compile each for init and update (eager would compile per leaf shape)
  state = jax.jit(opt.init)(params)
  zeros = jax.tree.map(np.zeros_like, params)
  p = params
  for _ in range(2):
    updates, state = update(zeros, state, p)
    new = jax.tree.map(lambda a, u: a + np.asarray(u), p, updates)
    for (path, old_leaf), new_leaf in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(new)):
      name = jax.tree_util.keystr(path)
      if old_leaf.ndim >= 2:
        np.testing.assert_allclose(new_leaf, old_leaf * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=name)
      else:
        np.testing.assert_array_equal(new_leaf, old_leaf, err_msg=name)
    p = new


def numpy_adamw(params, grads_per_step, *, lr_at, b1, b2, eps, weight_decay, clip):
  """AdamW with global-norm clipping, written out in float64: the parameters after each step."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for t, grads in enumerate(grads_per_step):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat = m[k] / (1 - b1 ** (t + 1))
      v_hat = v[k] / (1 - b2 ** (t + 1))
      direction = m_hat / (np.sqrt(v_hat) + eps)
      if p[k].ndim >= 2:
        direction = direction + weight_decay * p[k]
      p[k] = p[k] - lr_at(t) * direction
    history.append({k: x.copy() for k, x in p.items()})
  return history


def test_adamw_chain_matches_numpy_transcription():
  """Five steps of the full recipe (warmup, cosine, clipping that triggers on some steps only, decay on matrices,
  b1 = 0.9, b2 = 0.95) against `numpy_adamw`.

  Catches (planted by rewriting make_optimizer; each failed here): Adam without bias correction (a hand-written
  transformation), eps inside the square root, b1 and b2 swapped (only this test sees it), per-leaf / element-wise
  / no clipping, decay on every leaf or on none, coupled (L2) instead of decoupled decay, every schedule bug."""
  cfg = OptimConfig(learning_rate=1e-2, warmup_steps=2, end_lr_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                    eps=1e-3, grad_clip_norm=1.0)
  num_steps = 5
  rng = np.random.default_rng(4)
  params = {"kernel": rng.standard_normal((4, 3)), "stacked": rng.standard_normal((2, 3, 2)),
            "bias": rng.standard_normal((3,)), "scale": 1 + 0.1 * rng.standard_normal((3,))}
  norms = [3.0, 0.4, 7.0, 0.9, 0.2]  # clipped on steps 0 and 2 only
  grads_per_step = []
  for n in norms:
    g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    grads_per_step.append({k: x * n / total for k, x in g.items()})
  expected = numpy_adamw(params, grads_per_step, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1, clip=1.0,
                         lr_at=lambda t: closed_form_lr(t, peak=1e-2, warmup=2, num_steps=num_steps,
                                                        end_fraction=0.1))
  opt = make_optimizer(cfg, num_steps)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  update = jax.jit(opt.update)
  state = opt.init(p)
  for t, grads in enumerate(grads_per_step):
    updates, state = update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    for k in params:
      moved = expected[t][k] - params[k]
      np.testing.assert_allclose(np.asarray(p[k], np.float64) - params[k], moved, rtol=1e-4,
                                 atol=1e-4 * float(np.max(np.abs(moved))) + 1e-7, err_msg=f"step {t} {k}")
