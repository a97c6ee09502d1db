"""SSM mixers (S4D, S5, Mamba, Mamba-2): step-by-step decode = prefill + steps = full forward; resets; causality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import ssm as ssm_nn

D_MODEL = 8
MIXERS = {
    "s4d": functools.partial(ssm_nn.S4D, d_model=D_MODEL, d_state=4),
    "s5": functools.partial(ssm_nn.S5, d_model=D_MODEL, d_state=6),
    "mamba": functools.partial(ssm_nn.Mamba, d_model=D_MODEL, d_state=4, chunk_size=4),
    "mamba2": functools.partial(ssm_nn.Mamba2, d_model=D_MODEL, d_state=4, head_dim=4, chunk_size=4),
}


def _init(name, length=11, batch=2, seed=0, **overrides):
  module = MIXERS[name](**overrides)
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, D_MODEL), dtype=np.float32))
  params = jax.jit(module.init)(jax.random.PRNGKey(seed + 1), x)
  return module, params, x


def _close(a, b, what="", atol=3e-5):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=0, atol=atol * max(1.0, float(np.max(np.abs(b)))), err_msg=what)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decode_equals_full_forward(name):
  """init_state + step for every token, and prefill(prompt) (return_state=True) + steps, both equal the full
  forward."""
  module, params, x = _init(name)
  y_full = jax.jit(module.apply)(params, x)
  assert y_full.shape == x.shape
  step = jax.jit(functools.partial(module.apply, method=module.step))
  state = jax.jit(functools.partial(module.apply, method=module.init_state), static_argnums=(1, 2))(params, 2, 16)
  for t in range(x.shape[1]):
    y_t, state = step(params, x[:, t], state)
    _close(y_t, y_full[:, t], f"{name} step {t}")
  prompt = 6
  y_pre, state = jax.jit(functools.partial(module.apply, return_state=True))(params, x[:, :prompt])
  _close(y_pre, y_full[:, :prompt], f"{name} prefill")
  for t in range(prompt, x.shape[1]):
    y_t, state = step(params, x[:, t], state)
    _close(y_t, y_full[:, t], f"{name} step {t} after prefill")


@pytest.mark.parametrize("name", ["s4d", "s5", "mamba", "mamba2"])
def test_segment_resets_equal_separate_sequences(name):
  module, params, x = _init(name, length=12, batch=1, seed=3)
  cut = 5
  seg = jnp.asarray([[1] * cut + [2] * (12 - cut)])
  apply = jax.jit(module.apply)
  y_packed = jax.jit(lambda p, x, s: module.apply(p, x, segment_ids=s))(params, x, seg)
  _close(y_packed[:, :cut], apply(params, x[:, :cut]), f"{name} first")
  _close(y_packed[:, cut:], apply(params, x[:, cut:]), f"{name} second")


@pytest.mark.parametrize("name", ["s4d", "s5", "mamba", "mamba2"])
def test_causal_by_gradients(name):
  module, params, x = _init(name, length=9, batch=1, seed=5)
  t = 4
  g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(module.apply(params, x)[:, t])))(x))
  # S4D trains by FFT convolution: the future's gradient is round-off (~1e-9), not exactly zero.
  bound = 1e-6 * np.max(np.abs(g)) if name == "s4d" else 0.0
  assert np.all(np.abs(g[:, t + 1:]) <= bound)
  assert np.all(np.any(g[:, :t + 1] != 0.0, axis=-1))


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_bfloat16_compute_close_to_float32(name):
  module32, params, x = _init(name)
  module16 = MIXERS[name](dtype=jnp.bfloat16)
  y32, y16 = jax.jit(module32.apply)(params, x), jax.jit(module16.apply)(params, x)
  assert y16.dtype == jnp.bfloat16
  _close(y16, y32, name, atol=5e-2)


def test_mamba_init_is_standard():
  module, params, _ = _init("mamba")
  p = params["params"]
  a_log = np.asarray(p["A_log"].value if hasattr(p["A_log"], "value") else p["A_log"])
  np.testing.assert_allclose(np.exp(a_log), np.broadcast_to(np.arange(1, 5), a_log.shape), rtol=1e-6)
  bias = p["dt_proj"]["bias"]
  bias = np.asarray(bias.value if hasattr(bias, "value") else bias)
  dt = np.log1p(np.exp(bias))
  assert np.all(dt >= 1e-3 * 0.999) and np.all(dt <= 0.1 * 1.001)


def test_bad_hyperparameters_raise():
  x = jnp.zeros((1, 4, D_MODEL))
  with pytest.raises(ValueError, match="head_dim"):
    ssm_nn.Mamba2(d_model=D_MODEL, head_dim=5).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="mode"):
    ssm_nn.Mamba(d_model=D_MODEL, mode="fast").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="segment_ids"):
    ssm_nn.S5(d_model=D_MODEL).init(jax.random.PRNGKey(0), x, segment_ids=jnp.zeros((1, 3), jnp.int32))
