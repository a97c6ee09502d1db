"""`python -m seqjax.bench claims`: the recall task's data, the input-gradient probe and the verdict rules."""

import jax
import numpy as np
import pytest

from seqjax.bench import claims
from seqjax.models.lm import DecoderLM


def test_recall_batches_answer_the_first_token():
  """Catches: the answer not being the data token, noise overlapping data or query, the loss on other positions."""
  tokens, targets, weights = claims.recall_batch(np.random.default_rng(0), 64, 10)
  assert tokens.shape == targets.shape == weights.shape == (64, 12)
  np.testing.assert_array_equal(targets[:, -1], tokens[:, 0])
  assert tokens[:, 0].max() < claims.DATA and set(np.unique(tokens[:, 1:-1])) <= set(range(8, 14))
  assert (tokens[:, -1] == claims.QUERY).all()
  np.testing.assert_array_equal(weights.sum(1), 1.0)
  assert weights[:, -1].all()


def test_input_gradients_match_finite_differences():
  """Catches: a probe not added to the embeddings (zero gradients), a gradient taken against the parameters, rows
  mixed up, norms over the wrong axis."""
  model = DecoderLM(claims.model_config("attention", 8, d_model=16))
  params = claims._init(model)  # pylint: disable=protected-access
  batch = claims.recall_batch(np.random.default_rng(1), 2, 4)
  grad_BTD = claims.input_gradients(model, params, *batch)
  assert grad_BTD.shape == (2, 6, 16) and (np.linalg.norm(grad_BTD, axis=-1) > 0).all()
  np.testing.assert_allclose(claims.input_gradient_norms(model, params, *batch),
                             np.linalg.norm(grad_BTD, axis=-1).mean(0), rtol=1e-6)
  rng = np.random.default_rng(2)
  loss = jax.jit(lambda delta: claims.embedded_input_loss(model, params, delta, *batch))
  for row, t in ((0, 0), (1, 3), (1, 5)):
    direction = np.zeros((2, 6, 16), np.float32)
    direction[row, t] = rng.normal(size=16)
    eps = 1e-2
    fd = (float(loss(eps * direction)) - float(loss(-eps * direction))) / (2 * eps)
    np.testing.assert_allclose(fd, np.sum(grad_BTD * direction), rtol=2e-2, atol=1e-4)


def test_verdict_rules():
  """The verdicts follow the figures: a claim that holds in the numbers says so, one that does not says that."""
  result = {
      "throughput": [{"mixer": m, "length": L, "tokens_per_s": v} for m, v in
                     (("rnn", 100.), ("lstm", 50.), ("attention", 400.), ("mamba", 200.)) for L in (128, 512)],
      "decode": [{"mixer": m, "context": c, "ms_per_token": v * (c / 128 if m == "attention" else 1)}
                 for m, v in (("rnn", 1.), ("lstm", 1.), ("attention", 2.), ("mamba", 1.)) for c in (128, 4096)],
      "memory": [{"mixer": m, "length": L, "temp_mib": (L / 512) ** (2 if m == "attention (reference)" else 1)}
                 for m in ("rnn", "lstm", "attention (blockwise)", "attention (reference)", "mamba")
                 for L in (512, 4096)],
      "recall": [{"mixer": m, "distance": d, "accuracy": a} for m, accs in
                 (("rnn", (0.3, 0.1)), ("lstm", (1.0, 0.2)), ("attention", (1.0, 1.0)), ("mamba", (1.0, 1.0)))
                 for d, a in zip((8, 96), accs)],
      "grad": [{"mixer": m, "stage": s, "norms": [r, 1.0]} for m, r in
               (("rnn", 1e-6), ("lstm", 1e-4), ("attention", 0.3), ("mamba", 1e-3)) for s in ("init", "trained")],
  }
  verdicts = {row["claim"].split(" ")[0] + str(i): row["verdict"] for i, row in enumerate(claims.verdicts(result))}
  assert list(verdicts.values()) == ["holds", "holds", "holds", "holds for the materialising kernel only; the "
                                     "blockwise kernel is linear", "holds",
                                     "holds for rnn, lstm, mamba (attention's reaches every position)"]
  result["throughput"] = [dict(r, tokens_per_s=1.0 if r["mixer"] == "attention" else 5.0)
                          for r in result["throughput"]]
  result["recall"] = [dict(r, accuracy=1.0) for r in result["recall"]]  # no drop with distance
  verdicts = [row["verdict"] for row in claims.verdicts(result)]
  assert verdicts[0] == "does not hold at this scale" and verdicts[4] == "does not hold at this scale"


@pytest.mark.slow
def test_quick_run_writes_the_table_and_plots(tmp_path):
  """The whole command at tiny sizes (about 10 minutes on the shared CPU, compiles dominate)."""
  result = claims.main(["--quick", f"--results_dir={tmp_path}"])
  assert len(result["verdicts"]) == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ["claims.json", "claims.md", "decode.png", "grad.png",
                                                        "memory.png", "recall.png", "throughput.png"]
  assert jax.tree.leaves(result["grad"])
