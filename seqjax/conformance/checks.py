"""The conformance checks: what the mixer contract (seqjax.nn.contract) promises, tested on one registered mixer.

Each check takes a `Subject` (a mixer name, its tiny `ModelConfig`, inputs and parameters) and returns a
`CheckResult`: passed, failed or not applicable, with the worst error it saw in units of the output's scale (the
largest |y| of the reference, at least 1) and what it compared. A check builds its reference from a different
computation than the one it checks — the same module on other inputs (causality, packing), another mode, the step
function, finite differences of the outputs, another device layout — never from the code path under test.

Legend (docs/ARCHITECTURE.md): B batch, T length, D model width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.config import ModelConfig, override
from seqjax.nn.mixers import is_bidirectional, make_mixer, mixer_modes
from seqjax.ops import backend

PASS, FAIL, NA = "pass", "fail", "n/a"


@dataclasses.dataclass(frozen=True)
class CheckResult:
  check: str
  status: str  # PASS | FAIL | NA
  error: float = 0.0  # the worst error seen, in units of the reference's scale
  detail: str = ""

  @property
  def passed(self) -> bool:
    return self.status != FAIL


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """Errors allowed, relative to the reference's scale (float32 computations of one function in two ways)."""
  exact: float = 1e-5  # the same computation on other inputs: causality, packed-document isolation
  modes: float = 2e-4  # two algorithms (another kernel, a chunked against a sequential scan, prefill + step)
  finite_differences: float = 5e-3  # autodiff against central differences of float32 outputs
  bfloat16: float = 8e-2  # bfloat16 compute against float32


# Compiler options of the quick run on a CPU: LLVM optimisation off and the classic elemental emitters compile the
# checks' programs about 5x faster. The programs compute the same functions (only slower, which does not matter at
# the checks' sizes); the full run compiles with XLA's defaults.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


class Program:
  """`fn` compiled once per argument signature; programs of a subject that lower to the same StableHLO share one
  executable (the default module and the mode it defaults to; the two CPU-kernel modes where no kernel applies).

  The CPU-kernel mode (`seqjax.ops.backend`) is part of the signature, as it is of `jax.jit`'s cache key.
  """

  def __init__(self, fn: Callable[..., Any], executables: dict[str, Any], compiler_options: dict[str, Any] | None):
    self.fn, self._executables, self._options = fn, executables, compiler_options
    self._by_signature: dict[Any, Any] = {}

  def __call__(self, *args: Any) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, backend.get_cpu_kernels(), tuple(
        (jax.typeof(leaf), leaf.sharding if isinstance(leaf, jax.Array) and not isinstance(
            leaf.sharding, jax.sharding.SingleDeviceSharding) else None) for leaf in leaves))
    executable = self._by_signature.get(signature)
    if executable is None:
      lowered = jax.jit(lambda *a: self.fn(*a)).lower(*args)
      text = lowered.as_text()
      executable = self._executables.get(text)
      if executable is None:
        executable = self._executables[text] = lowered.compile(compiler_options=self._options)
      self._by_signature[signature] = executable
    return executable(*args)


class Subject:
  """One mixer under test: its module (in any mode), parameters and inputs x [B, T, D] at tiny sizes.

  Inputs are host (NumPy) arrays, so that the checks' own arithmetic on them compiles nothing; every program a check
  runs goes through `program` (compiled once, shared between checks). `quick` compiles with
  `QUICK_COMPILER_OPTIONS` on a CPU.
  """

  def __init__(self, name: str, cfg: ModelConfig, *, batch: int = 2, length: int = 13, seed: int = 0,
               quick: bool = False):
    self.name, self.cfg, self.batch, self.length = name, cfg, batch, length
    rng = np.random.default_rng(seed)
    self.x_BTD = rng.standard_normal((batch, length, cfg.d_model)).astype(np.float32)
    self.cotangent_BTD = rng.standard_normal((batch, length, cfg.d_model)).astype(np.float32)
    self.rng = rng
    self.compiler_options = dict(QUICK_COMPILER_OPTIONS) if quick and jax.default_backend() == "cpu" else None
    self._executables: dict[str, Any] = {}
    self.module = self.build()
    shapes = jax.ShapeDtypeStruct(self.x_BTD.shape, jnp.float32)
    self.params = self.program(lambda key: self.module.lazy_init(key, shapes)["params"])(jax.random.key(seed))
    self._grads = self.program(functools.partial(_loss_and_grads, self.module))

  def program(self, fn: Callable[..., Any]) -> Program:
    return Program(fn, self._executables, self.compiler_options)

  def grads(self, params, x_BTD, cotangent_BTD, segment_ids_BT=None, positions_BT=None):
    """(y, (d params, d x)) of the default mode: one program per input structure, shared by the checks."""
    return self._grads(params, x_BTD, cotangent_BTD, segment_ids_BT, positions_BT)

  def forward(self, params, x_BTD, segment_ids_BT=None, positions_BT=None) -> np.ndarray:
    """y of the default mode, from the same program as `grads`."""
    return np.asarray(self.grads(params, x_BTD, self.cotangent_BTD, segment_ids_BT, positions_BT)[0])

  def build(self, **overrides: Any) -> nn.Module:
    return make_mixer(self.name, override(self.cfg, overrides) if overrides else self.cfg)

  def modes(self) -> dict[str, nn.Module]:
    return {mode: self.build(**overrides) for mode, overrides in mixer_modes(self.name).items()}


def positions_of(segment_ids_BT: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 at every document of each row (0 on padding)."""
  positions = np.zeros_like(segment_ids_BT)
  for b, row in enumerate(segment_ids_BT):
    for t in range(1, len(row)):
      positions[b, t] = positions[b, t - 1] + 1 if row[t] == row[t - 1] else 0
  return positions


def _forward(module: nn.Module) -> Callable[..., jax.Array]:
  def f(params, x_BTD, segment_ids_BT=None, positions_BT=None):
    return module.apply({"params": params}, x_BTD, segment_ids=segment_ids_BT, positions=positions_BT)
  return f


def _scale(reference: Any) -> float:
  return max([1.0] + [float(np.max(np.abs(np.asarray(leaf, np.float64)))) for leaf in jax.tree.leaves(reference)
                      if np.size(leaf)])


def _error(actual: Any, expected: Any) -> float:
  """Largest absolute difference over the pytrees, in units of the expected tree's scale."""
  diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
           for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True) if np.size(e)]
  return max(diffs, default=0.0) / _scale(expected)


def _verdict(check: str, error: float, tolerance: float, detail: str) -> CheckResult:
  if not np.isfinite(error):
    return CheckResult(check, FAIL, float("inf"), detail + ": non-finite values")
  return CheckResult(check, PASS if error <= tolerance else FAIL, error,
                     f"{detail} (error {error:.1e} of scale, tolerance {tolerance:.0e})")


def _loss_and_grads(module: nn.Module, params, x_BTD, cotangent_BTD, segment_ids_BT=None, positions_BT=None):
  """y and the gradients (d params, d x) of sum(y * cotangent) — one reverse pass, as training takes them."""
  f = _forward(module)

  def loss(params, x_BTD):
    y = f(params, x_BTD, segment_ids_BT, positions_BT)
    return jnp.sum(y.astype(jnp.float32) * cotangent_BTD), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x_BTD)
  return y, grads


# ----------------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------------


def _bidirectional(s: Subject, check: str) -> CheckResult | None:
  """Not applicable to a mixer registered as bidirectional (`register_mixer(..., bidirectional=True)`)."""
  if is_bidirectional(s.name):
    return CheckResult(check, NA, detail="registered bidirectional: no causal form, no decoding, documents not "
                                         "isolated")
  return None


def causality(s: Subject, tol: Tolerances) -> CheckResult:
  """Changing the future changes nothing before it: outputs before a cut are equal when the inputs after it are
  replaced; and no gradient flows from outputs before the cut to inputs after it (the backward pass is causal)."""
  if (skip := _bidirectional(s, "causal")) is not None:
    return skip
  cut = s.length // 2 + 1
  x2 = s.x_BTD.copy()
  x2[:, cut:] = s.rng.standard_normal(x2[:, cut:].shape)
  y, y2 = s.forward(s.params, s.x_BTD), s.forward(s.params, x2)
  forward_error = _error(y2[:, :cut], y[:, :cut])
  cotangent = s.cotangent_BTD.copy()
  cotangent[:, cut:] = 0.0
  _, (_, dx) = s.grads(s.params, s.x_BTD, cotangent)
  leak = _leak(dx, slice(cut, None))
  return _verdict("causal", max(forward_error, leak), tol.exact,
                  f"future inputs from t={cut}: outputs before moved {forward_error:.1e}, gradient leak {leak:.1e}")


def _leak(dx_BTD, where: slice) -> float:
  """The largest input gradient at the times `where`, relative to the largest anywhere (at least 1)."""
  dx_BTD = np.asarray(dx_BTD)
  return float(np.max(np.abs(dx_BTD[:, where]))) / max(1.0, float(np.max(np.abs(dx_BTD))))


def packing(s: Subject, tol: Tolerances) -> CheckResult:
  """Packed documents are isolated: each document of a packed row (positions restarting at 0, padding at the end)
  gives what it gives alone, and no gradient crosses a document boundary. The two documents are equally long (both
  run alone in one batch) and the second starts inside a chunk (at 5 with chunks of 4)."""
  if (skip := _bidirectional(s, "packing")) is not None:
    return skip
  pad = 2 + s.length % 2
  doc = (s.length - pad) // 2
  segment_ids = np.array([[1] * doc + [2] * doc + [0] * pad] * s.batch, np.int32)
  positions = positions_of(segment_ids)
  packed = s.forward(s.params, s.x_BTD, segment_ids, positions)
  documents = np.concatenate([s.x_BTD[:, :doc], s.x_BTD[:, doc:2 * doc]])  # [2B, doc, D]
  forward = s.program(_forward(s.module))
  alone = np.asarray(forward(s.params, documents, None, np.broadcast_to(np.arange(doc), documents.shape[:2])))
  error = _error(np.concatenate([packed[:, :doc], packed[:, doc:2 * doc]]), alone)
  cotangent = s.cotangent_BTD.copy()
  cotangent[:, :doc] = 0.0  # only the second document's outputs
  _, (_, dx) = s.grads(s.params, s.x_BTD, cotangent, segment_ids, positions)
  leak = _leak(dx, slice(0, doc))
  return _verdict("packing", max(error, leak), tol.exact,
                  f"two documents of {doc} tokens + {pad} padding: alone vs packed {error:.1e}, gradient across "
                  f"the boundary {leak:.1e}")


def modes_agree(s: Subject, tol: Tolerances) -> CheckResult:
  """Every declared mode computes the same outputs and gradients (parameters and inputs) as the first, on packed
  documents with restarting positions when the mixer takes segment ids (so the resetting paths are compared too)."""
  modes = s.modes()
  if len(modes) < 2:
    return CheckResult("modes", NA, detail="one way of computing declared")
  segment_ids = np.array([[1] * (s.length - 4) + [2] * 4] * s.batch, np.int32)
  positions = positions_of(segment_ids)
  results = {}
  for mode, module in modes.items():
    try:
      grads = s.program(functools.partial(_loss_and_grads, module))
      results[mode] = grads(s.params, s.x_BTD, s.cotangent_BTD, segment_ids, positions)
    except Exception as e:  # pylint: disable=broad-except
      return CheckResult("modes", FAIL, float("inf"), f"mode {mode!r} failed: {type(e).__name__}: {e}")
  (first, reference), *others = results.items()
  errors = {mode: max(_error(r[0], reference[0]), _error(r[1], reference[1])) for mode, r in others}
  worst = max(errors, key=errors.get)
  return _verdict("modes", errors[worst], tol.modes,
                  f"{', '.join(results)} against {first!r} (outputs and gradients); worst {worst!r}")


def kernels(s: Subject, tol: Tolerances) -> CheckResult:
  """The native CPU kernels (seqjax.cpu_kernels) compute what the portable JAX program computes, forward and
  gradients. Not applicable off the CPU."""
  if jax.default_backend() != "cpu":
    return CheckResult("kernels", NA, detail="CPU kernels apply on the CPU only")
  results = {}
  for mode in ("off", "auto"):  # the mode is part of a program's signature: each lowers its own program
    with backend.cpu_kernels_mode(mode):
      results[mode] = s.grads(s.params, s.x_BTD, s.cotangent_BTD)
  error = max(_error(results["auto"][0], results["off"][0]), _error(results["auto"][1], results["off"][1]))
  return _verdict("kernels", error, tol.modes, "CPU kernels where they apply vs portable JAX")


def decode(s: Subject, tol: Tolerances) -> CheckResult:
  """Prefill + step = the parallel forward. A prefill over T - 4 tokens in which the last row is right-padded by 2
  (segment id 0), then 4 steps per row, each row continuing from its own last real token; and 3 steps from
  `init_state`. Each output equals the parallel forward's at that row's position."""
  if (skip := _bidirectional(s, "decode")) is not None:
    return skip
  module, prompt = s.module, s.length - 4
  lengths_B = np.array([prompt] * (s.batch - 1) + [prompt - 2])
  segment_ids = (np.arange(prompt)[None] < lengths_B[:, None]).astype(np.int32)
  parallel = s.forward(s.params, s.x_BTD)
  prefill = s.program(lambda p, x, sid: module.apply({"params": p}, x, segment_ids=sid, return_state=True))
  step = s.program(lambda p, x, state: module.apply({"params": p}, x, state, method="step"))
  y_prefill, state = prefill(s.params, s.x_BTD[:, :prompt], segment_ids)
  real = segment_ids.astype(bool)
  errors = [_error(np.asarray(y_prefill)[real], parallel[:, :prompt][real])]
  rows = np.arange(s.batch)
  for j in range(s.length - prompt):
    y_t, state = step(s.params, s.x_BTD[rows, lengths_B + j], state)
    errors.append(_error(y_t, parallel[rows, lengths_B + j]))
  state = s.program(lambda: module.init_state(s.batch, s.cfg.max_len))()
  for t in range(3):
    y_t, state = step(s.params, s.x_BTD[:, t], state)
    errors.append(_error(y_t, parallel[:, t]))
  return _verdict("decode", max(errors), tol.modes,
                  f"prefill({prompt}, last row padded by 2) + {s.length - prompt} steps, and 3 steps from "
                  f"init_state, vs parallel")


def gradients(s: Subject, tol: Tolerances) -> CheckResult:
  """Reverse-mode gradients (inputs and parameters) against central differences of the outputs along random
  directions, the differences taken in float64 from float32 outputs and Richardson-extrapolated (O(h^4))."""
  _, (dparams, dx) = s.grads(s.params, s.x_BTD, s.cotangent_BTD)
  w = s.cotangent_BTD.astype(np.float64)

  def loss64(params, x):
    return float(np.sum(s.forward(params, x).astype(np.float64) * w))

  def central(g, h):
    return (g(h) - g(-h)) / (2 * h)

  errors, details = [], []
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, s.params))
  # Each parameter moves in proportion to its own size (a projection of fan-in F has entries ~ F^-1/2), so one
  # step h is as small for every leaf and the differences stay in their quadratic regime.
  sigmas = [max(float(np.sqrt(np.mean(np.square(leaf, dtype=np.float64)))), 1e-2) for leaf in leaves]
  directions = [(s.rng.standard_normal(leaf.shape) * sigma).astype(leaf.dtype) for leaf, sigma in zip(leaves, sigmas)]
  # The typical size of a directional derivative along such a random direction (its standard deviation), the unit
  # of the error: a direction that happens to be nearly orthogonal to the gradient must not inflate it.
  grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(dparams)]
  typical_p = float(np.sqrt(sum(np.sum(np.square(g)) * sigma ** 2 for g, sigma in zip(grads, sigmas))))
  typical_x = float(np.sqrt(np.sum(np.square(np.asarray(dx, np.float64)))))
  direction_x = s.rng.standard_normal(s.x_BTD.shape).astype(np.float32)
  perturbed = lambda h: treedef.unflatten([a + np.float32(h) * d for a, d in zip(leaves, directions)])
  cases = {
      "inputs": (typical_x, lambda h: loss64(s.params, s.x_BTD + np.float32(h) * direction_x),
                 float(np.sum(np.asarray(dx, np.float64) * direction_x))),
      "parameters": (typical_p, lambda h: loss64(perturbed(h), s.x_BTD),
                     sum(float(np.sum(g * d)) for g, d in zip(grads, directions))),
  }
  for what, (typical, g, autodiff) in cases.items():
    h = 2e-3
    numeric = (4 * central(g, h / 2) - central(g, h)) / 3
    error = abs(numeric - autodiff) / max(abs(numeric), typical, 1e-6)
    errors.append(error)
    details.append(f"{what}: autodiff {autodiff:.4g} vs differences {numeric:.4g}")
  return _verdict("gradients", max(errors), tol.finite_differences, "; ".join(details))


def jit_agrees(s: Subject, tol: Tolerances) -> CheckResult:
  """The module run op by op (no jit) equals the jitted program, forward and gradients."""
  eager = _loss_and_grads(s.module, s.params, s.x_BTD, s.cotangent_BTD)
  jitted = s.grads(s.params, s.x_BTD, s.cotangent_BTD)
  error = max(_error(eager[0], jitted[0]), _error(eager[1], jitted[1]))
  return _verdict("jit", error, tol.modes, "not jitted vs jitted (outputs and gradients)")


def sharded(s: Subject, tol: Tolerances) -> CheckResult:
  """The batch sharded over every device (a "data" mesh axis; parameters replicated) computes what one device
  computes, forward and gradients. The batch is the subject's rows repeated, so the one-device reference is the
  default program's result repeated (gradients of the parameters summed over the copies)."""
  devices = jax.devices()
  if len(devices) < 2:
    return CheckResult("sharded", NA, detail="one device (set XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  n = len(devices)
  copies = -(-n // s.batch)
  x, cotangent = (np.concatenate([a] * copies)[:n] for a in (s.x_BTD, s.cotangent_BTD))
  grads = s.program(lambda p, x: _loss_and_grads(s.module, p, x, cotangent))
  if n % s.batch == 0:
    y, (dparams, dx) = s.grads(s.params, s.x_BTD, s.cotangent_BTD)
    reference = (np.concatenate([y] * copies), (jax.tree.map(lambda g: copies * np.asarray(g), dparams),
                                                np.concatenate([dx] * copies)))
  else:
    reference = grads(jax.device_put(s.params, devices[0]), jax.device_put(x, devices[0]))
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = grads(jax.device_put(s.params, replicated), jax.device_put(x, batch_sharding))
  error = max(_error(out[0], reference[0]), _error(out[1], reference[1]))
  return _verdict("sharded", error, tol.modes, f"batch of {n} sharded over {n} devices vs one device")


def bfloat16(s: Subject, tol: Tolerances) -> CheckResult:
  """With model.dtype="bfloat16" (parameters stay float32) outputs and gradients are finite and within bfloat16
  rounding of the float32 run."""
  low = s.program(functools.partial(_loss_and_grads, s.build(dtype="bfloat16")))(
      s.params, s.x_BTD, s.cotangent_BTD, None, None)
  if not all(bool(np.all(np.isfinite(np.asarray(leaf, np.float32)))) for leaf in jax.tree.leaves(low)):
    return CheckResult("bfloat16", FAIL, float("inf"), "non-finite outputs or gradients in bfloat16")
  high = s.grads(s.params, s.x_BTD, s.cotangent_BTD)
  error = _error(low[0], high[0])
  return _verdict("bfloat16", error, tol.bfloat16, "bfloat16 compute vs float32 (outputs; gradients finite)")


CHECKS: dict[str, Callable[[Subject, Tolerances], CheckResult]] = {
    "causal": causality,
    "packing": packing,
    "modes": modes_agree,
    "decode": decode,
    "gradients": gradients,
    "jit": jit_agrees,
    "sharded": sharded,
    "bfloat16": bfloat16,
    "kernels": kernels,
}
