r"""The mutation probe: small deliberate bugs, each of which a named part of the suite must catch.

    python -m tests.mutation                   # every mutant, two at a time; a table; exit 1 if one survives
    python -m tests.mutation --list            # the mutants and the tests meant to catch them
    python -m tests.mutation --only NAME,NAME  # some of them
    python -m tests.mutation --check_clean     # also run each mutant's tests on the unmutated copy (must pass)

Each mutant copies the repository's files (tracked and new, not ignored) into a temporary directory, replaces
one snippet of one file there — the snippet must occur exactly once, so a moved or edited line makes the probe
fail loudly instead of testing nothing — and runs the mutant's tests in that copy with pytest. The mutant is
*caught* when those tests fail. The working tree is never touched.

When a real bug is found, add it here as a mutant together with the test that now catches it. `make mutation`
runs the whole list (slow: one pytest process per mutant); `tests/test_mutation.py` checks on every `make test`
that each snippet still occurs exactly once and each named test file exists.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  description: str
  path: str  # Relative to the repository root.
  old: str  # Must occur exactly once in `path`.
  new: str
  tests: tuple[str, ...]  # pytest node ids or files, relative to the root.


MUTANTS: tuple[Mutant, ...] = (
    # Training: the numbers a step reports and the update it makes.
    Mutant("accumulated_gradient_scaled", "gradient accumulation divides the micro-batch gradients once more",
           "seqjax/train/step.py", "jax.tree.map(jnp.add, acc_g, g)",
           "jax.tree.map(lambda a, b: a + b / grad_accum_steps, acc_g, g)",
           ("tests/train/test_step.py::test_grad_accumulation_one_sgd_step_equals_full_batch",)),
    Mutant("grad_norm_unnormalised", "the logged grad_norm is taken before dividing by the token weight",
           "seqjax/train/step.py", "grad_norm = optax.tree.norm(grads)", "grad_norm = optax.tree.norm(grads) * denom",
           ("tests/train/test_step.py::test_grad_norm_and_update_match_an_independent_loss",)),
    Mutant("weight_decay_on_every_leaf", "decoupled weight decay also on biases and norm scales",
           "seqjax/train/optim.py", "p.ndim >= 2", "p.ndim >= 0", ("tests/train/test_optim.py",)),
    Mutant("no_gradient_clipping", "global-norm clipping left out of the optimizer chain",
           "seqjax/train/optim.py", "parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))", "pass",
           ("tests/train/test_optim.py",)),
    Mutant("warmup_half_as_long", "the warm-up ends at half the configured steps",
           "seqjax/train/optim.py", "warmup_steps=warmup,", "warmup_steps=warmup // 2,",
           ("tests/train/test_optim.py",)),
    # Evaluation.
    Mutant("bits_per_byte_log_base", "bits per byte computed with log base 10 instead of 2",
           "seqjax/evals/lm_metrics.py", "/ math.log(2) /", "/ math.log(10) /", ("tests/evals/test_lm_metrics.py",)),
    Mutant("accuracy_counts_padding", "accuracy counts predictions on padding (the weights are dropped)",
           "seqjax/train/tasks/lm.py", "\"correct\": jnp.sum(correct_BT * w_BT)}", "\"correct\": jnp.sum(correct_BT)}",
           ("tests/evals/test_lm_metrics.py",)),
    Mutant("bleu_swapped_arguments", "corpus BLEU with hypotheses and references swapped",
           "seqjax/evals/text_metrics.py", "sacrebleu.corpus_bleu(list(hyps), [list(refs)], **kwargs)",
           "sacrebleu.corpus_bleu(list(refs), [list(hyps)], **kwargs)",
           ("tests/evals/test_text_metrics_by_hand.py",)),
    # Attention: positions and masks.
    Mutant("rope_sign_flip", "RoPE rotates the second half by -sin",
           "seqjax/ops/attention/positions.py", "x2 * cos + x1 * sin", "x2 * cos - x1 * sin",
           ("tests/ops/attention/test_positions.py",)),
    Mutant("causal_mask_off_by_one", "a query sees the next key too",
           "seqjax/ops/attention/masks.py", "return (kv_pos <= q_pos)[None, None]",
           "return (kv_pos <= q_pos + 1)[None, None]", ("tests/ops/attention/test_masks.py",)),
    Mutant("window_off_by_one", "a sliding window one key wider on the left",
           "seqjax/ops/attention/masks.py", "visible &= d >= -self.left", "visible &= d >= -self.left - 1",
           ("tests/ops/attention/test_masks.py",)),
    Mutant("lm_ignores_positions", "the LM's learned positions ignore the given (restarting) positions",
           "seqjax/models/lm.py", "name=\"pos_embed\")(positions)",
           "name=\"pos_embed\")(jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape))",
           ("tests/models/test_packing.py",)),
    Mutant("kv_cache_position_stuck", "a decoding step does not advance the cached token position",
           "seqjax/nn/attention.py", "self.index + 1, self.position + 1)", "self.index + 1, self.position)",
           ("tests/nn/test_mixer_contract.py",)),
    # State-space models.
    Mutant("selective_scan_no_skip", "the selective scan drops its D skip term",
           "seqjax/ops/ssm/selective.py", "y_BTE = y_BTE + D.astype(f32) * x_BTE", "y_BTE = y_BTE",
           ("tests/ops/ssm/test_numpy_oracle.py",)),
    Mutant("ssd_no_skip", "SSD drops its per-head D skip term",
           "seqjax/ops/ssm/ssd.py", "y_BTNH = y_BTNH + D.astype(f32)[:, None] * x_BTNH", "y_BTNH = y_BTNH",
           ("tests/ops/ssm/test_numpy_oracle.py",)),
    Mutant("segment_resets_ignored", "packed documents do not reset the scan state",
           "seqjax/ops/ssm/_common.py", "~changed_BT], axis=1)", "jnp.ones_like(changed_BT)], axis=1)",
           ("tests/ops/ssm/test_numpy_oracle.py",)),
    Mutant("zoh_is_euler", "zero-order hold discretises A to first order",
           "seqjax/ops/ssm/s4.py", "dA = jnp.exp(dtA)", "dA = 1.0 + dtA",
           ("tests/ops/ssm/test_numpy_oracle.py::test_discretize_matches_closed_form",)),
    Mutant("mamba_gate_dropped", "the Mamba block drops its SiLU(z) gate",
           "seqjax/nn/ssm.py", "y_BTD = self.out_proj(y_BTE * nn.silu(z_BTE))", "y_BTD = self.out_proj(y_BTE)",
           ("tests/nn/test_ssm_block_oracle.py",)),
    # Recurrences and dense ops.
    Mutant("lstm_forget_gate_dropped", "the LSTM cell keeps its whole cell state",
           "seqjax/ops/recurrent/cells.py", "jax.nn.sigmoid(f_BR) * c_BR", "c_BR",
           ("tests/ops/recurrent/test_recurrent.py",)),
    Mutant("gru_reset_dropped", "the GRU candidate ignores the reset gate",
           "seqjax/ops/recurrent/cells.py", "jnp.tanh(xn_BR + r_BR * hn_BR)", "jnp.tanh(xn_BR + hn_BR)",
           ("tests/ops/recurrent/test_recurrent.py",)),
    Mutant("gelu_exact", "the MLP's gelu is the erf form instead of the tanh approximation",
           "seqjax/ops/dense/mlp.py", "functools.partial(jax.nn.gelu, approximate=True)",
           "functools.partial(jax.nn.gelu, approximate=False)",
           ("tests/ops/dense/test_mlp.py", "tests/nn/test_mlp_oracle.py")),
    # Ring attention: the visiting block's positions, and its gradients' way home.
    Mutant("ring_hop_source_reversed", "each ring hop takes the positions of the shard r + h instead of r - h",
           "seqjax/ops/attention/ring.py", "(self.r - h) % self.P", "(self.r + h) % self.P",
           ("tests/ops/attention/test_ring.py::RingAttentionTest",)),
    Mutant("ring_grads_not_sent_home", "dK/dV stay one shard short of their block's home",
           "seqjax/ops/attention/ring.py", "  dk, dv = ring.send((dk, dv))  # home", "  # home",
           ("tests/ops/attention/test_ring.py::RingAttentionTest",)),
    Mutant("ring_striped_plan_not_strict", "striped hops from a later shard see the diagonal (plan kind wrong)",
           "seqjax/ops/attention/ring.py", "masks_lib.Causal(kv_offset=1)", "masks_lib.Causal()",
           ("tests/ops/attention/test_ring.py::RingAttentionTest",)),
    Mutant("lm_layout_not_applied", "the LM's batch is not dealt in the zigzag/striped order the ring assumes",
           "seqjax/train/tasks/lm.py", '  if shards == 1 or layout == "contiguous":', "  if True:",
           ("tests/train/test_context_parallel.py::test_sequence_sharded_step_equals_1_device",)),
    # Synthetic tasks and classification.
    Mutant("mqar_answers_shuffled", "MQAR's targets are the values of other keys",
           "seqjax/data/synthetic/mqar.py", "np.put_along_axis(targets_BT, query_pos_BP, values_BP, axis=1)",
           "np.put_along_axis(targets_BT, query_pos_BP, np.roll(values_BP, 1, axis=1), axis=1)",
           ("tests/data/test_synthetic.py::test_answers_recomputed_from_inputs",)),
    Mutant("mqar_gaps_uniform", "MQAR's queries are placed uniformly instead of with the power law",
           "seqjax/data/synthetic/mqar.py", "log_w = (setting.power_a - 1.0) * np.log(",
           "log_w = 0.0 * np.log(", ("tests/data/test_synthetic.py::test_mqar_gaps_follow_the_power_law",)),
    Mutant("listops_median_rounded_up", "ListOps' MED rounds an even count's median up",
           "seqjax/data/synthetic/listops.py", "value = int(statistics.median(values))",
           "value = int(statistics.median(values) + 0.5)",
           ("tests/data/test_synthetic.py::test_listops_labels_lengths_and_shape",)),
    Mutant("classifier_pools_padding", "mean pooling averages over the padding too",
           "seqjax/models/classifier.py",
           'return jnp.einsum("btd,bt->bd", h_BTD, real_BT) / jnp.maximum(real_BT.sum(axis=1), 1.0)[:, None]',
           "return h_BTD.mean(axis=1)", ("tests/train/test_synthetic_train.py::test_pooling_against_numpy",
                                          "tests/train/test_synthetic_train.py::test_classifier_ignores_padding")),
    Mutant("answer_loss_on_every_position", "the synthetic LM batches weigh every position, not only the answers",
           "seqjax/data/synthetic/pipeline.py", 'weights=seq("loss_mask", np.float32)',
           "weights=real_BT.astype(np.float32)",
           ("tests/train/test_synthetic_train.py::test_lm_loss_is_taken_on_answer_positions_only",)),
    Mutant("synthetic_epochs_repeat_one_order", "every training epoch of a synthetic split has the same order",
           "seqjax/data/synthetic/pipeline.py", "default_rng([seed, epoch])", "default_rng([seed, 0])",
           ("tests/data/test_synthetic.py::test_training_epoch_is_a_permutation_of_the_split_read_from_columns",)),
    Mutant("sweep_overrides_users_malloc_tunables", "a run's GLIBC_TUNABLES replaces the one the user set",
           "seqjax/sweep.py", 'env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)',
           'env["GLIBC_TUNABLES"] = MALLOC_TUNABLES',
           ("tests/test_sweep.py::test_runs_start_with_the_malloc_tunables_unless_set",)),
    Mutant("sweep_reruns_finished", "the sweep runs finished runs again",
           "seqjax/sweep.py", "    if run.finished:", "    if False:",
           ("tests/test_sweep.py::test_skips_finished_runs_and_restarts_the_others",)),
    # Decoding.
    Mutant("beam_cache_not_reordered", "every beam continues from the first beam's cache",
           "seqjax/decode/beam.py", "k + parent_BK).reshape(-1)", "k + 0 * parent_BK).reshape(-1)",
           ("tests/decode/test_beam.py::test_beam_search_equals_the_reference_with_beams_as_separate_rows",)),
    Mutant("scanned_cache_batch_axis", "the scanned stack's cache is gathered along the layers axis",
           "seqjax/decode/common.py", "axis = 1 if model.cfg.scan_layers else 0", "axis = 0",
           ("tests/decode/test_beam.py::test_beam_search_equals_the_reference_with_beams_as_separate_rows",)),
    Mutant("beam_stops_on_the_best_finished", "beam search stops once the best (not the K-th) finished wins",
           "seqjax/decode/beam.py", "done_B = (fin_score_BK[:, k - 1] >= reach_B)",
           "done_B = (fin_score_BK[:, 0] >= reach_B)",
           ("tests/decode/test_beam.py::test_stops_early_once_no_beam_can_win",)),
    Mutant("top_p_inclusive_mass", "top-p drops the token that crosses the mass threshold",
           "seqjax/decode/samplers.py", "keep_BV = before_BV < top_p", "keep_BV = before_BV + sorted_BV < top_p",
           ("tests/decode/test_samplers.py",)),
    Mutant("ragged_continuation_after_longest", "every row continues after the longest prompt",
           "seqjax/decode/generate.py", "common.write_at(tokens_BL, lengths_B + t, token_B)",
           "common.write_at(tokens_BL, prompts_BP.shape[1] + t, token_B)",
           ("tests/decode/test_generate.py::test_ragged_cached_greedy_equals_the_uncached_greedy_of_each_row",)),
    Mutant("encdec_decoder_not_causal", "the decoder's teacher-forced self-attention sees later target tokens",
           "seqjax/models/seq2seq_transformer.py",
           "return self_attention(x_BTD, mask=masks_lib.Causal(), deterministic=deterministic)",
           "return self_attention(x_BTD, mask=None, deterministic=deterministic)",
           ("tests/models/test_seq2seq_transformer.py",)),
    Mutant("encdec_cross_kv_wrong_rows", "a cached step attends over another row's precomputed encoder keys/values",
           "seqjax/models/seq2seq_transformer.py", "kv=state[1], mask=source_mask",
           "kv=jax.tree.map(lambda a: a[::-1], state[1]), mask=source_mask",
           ("tests/models/test_seq2seq_transformer.py",)),
    # Linear attention.
    Mutant("linear_attention_unnormalised", "causal linear attention drops the Katharopoulos normaliser",
           "seqjax/ops/linear/variants.py", "return o_aug[..., :-1] / (o_aug[..., -1:] + eps)",
           "return o_aug[..., :-1]", ("tests/ops/linear/test_numpy_oracle.py",)),
    Mutant("chunked_state_not_decayed", "the chunked form carries the state into the next chunk undecayed",
           "seqjax/ops/linear/recurrence.py", "s_BNPH = (chunk_decay_BNX[..., None] * s_BNPH",
           "s_BNPH = (s_BNPH", ("tests/ops/linear/test_numpy_oracle.py",)),
    Mutant("retnet_decay_shifted", "RetNet's head decays gamma_n = 1 - 2^(-4 - n) instead of 2^(-5 - n)",
           "seqjax/ops/linear/variants.py", "jnp.exp2(-5.0 - jnp.arange(num_heads, dtype=jnp.float32))",
           "jnp.exp2(-4.0 - jnp.arange(num_heads, dtype=jnp.float32))", ("tests/ops/linear/test_numpy_oracle.py",)),
    # Accelerator attention backends.
    Mutant("splash_padding_sees_padding", "splash: padding keeps segment id 0, so padded queries attend to padded keys",
           "seqjax/ops/attention/splash.py", "    if segments.padding_id is not None:", "    if False:",
           ("tests/ops/attention/test_accelerators.py::SplashTest",)),
    # Mixture of experts.
    Mutant("moe_gates_not_renormalised", "top-k gates left as raw probabilities instead of summing to 1",
           "seqjax/ops/moe/routing.py", "  if top_k > 1:\n    gates_BTA = gates_BTA /",
           "  if top_k > 99:\n    gates_BTA = gates_BTA /", ("tests/ops/moe/test_moe_oracle.py",)),
    Mutant("moe_load_balance_without_num_experts", "the Switch loss misses its factor J (uniform routing gives 1/J)",
           "seqjax/ops/moe/routing.py", "return num_experts * jnp.sum(f_J * p_J)", "return jnp.sum(f_J * p_J)",
           ("tests/ops/moe/test_moe_oracle.py",)),
    Mutant("moe_unsorted_by_the_sort_order", "dropless results unsorted with the sort permutation, not its inverse",
           "seqjax/ops/moe/dispatch.py", "out_sorted_YD[jnp.argsort(order_Y)]", "out_sorted_YD[order_Y]",
           ("tests/ops/moe/test_moe_oracle.py",)),
    Mutant("moe_slots_counted_from_one", "capacity slots numbered from 1: each expert keeps one assignment fewer",
           "seqjax/ops/moe/dispatch.py", "axis=-1) - 1", "axis=-1)",
           ("tests/ops/moe/test_moe_oracle.py",)),
    Mutant("moe_aux_losses_not_trained", "the MoE aux losses are logged but left out of the training loss",
           "seqjax/train/tasks/lm.py", "jnp.sum(losses_BT * w_BT) + objective * weight, weight, extras",
           "jnp.sum(losses_BT * w_BT), weight, extras", ("tests/nn/test_moe.py",)),
    Mutant("gated_delta_state_read_undecayed", "Gated DeltaNet's UT system subtracts the incoming state undecayed",
           "seqjax/ops/linear/delta.py", "jnp.concatenate([k * first_MB1C1 * gamma_MBNC1, v], axis=-1)",
           "jnp.concatenate([k * first_MB1C1, v], axis=-1)",
           ("tests/ops/linear/test_numpy_oracle.py::GatedDeltaRuleTest",)),
    Mutant("rwkv_bonus_dropped", "RWKV-6's wkv loses the bonus u of the current token",
           "seqjax/ops/linear/rwkv.py", "y_BTNH = o_ext[:, :t] + _bonus(r, k, v, u)", "y_BTNH = o_ext[:, :t]",
           ("tests/ops/linear/test_rwkv.py",)),
    Mutant("based_window_one_longer", "Based's sliding window sees one key more than based_window",
           "seqjax/nn/based.py", '{"attention": {"window": lin.based_window}}',
           '{"attention": {"window": lin.based_window + 1}}', ("tests/nn/test_based.py",)),
    Mutant("cp_ssm_document_start_on_shard_boundary", "a shard whose first token starts a document still takes the "
           "incoming state", "seqjax/ops/ssm/context_parallel.py",
           "  return keep_BT.at[:, 0].set(continues_B.astype(jnp.float32))", "  return keep_BT",
           ("tests/ops/ssm/test_context_parallel.py",)),
    Mutant("cp_conv_halo_dropped", "Mamba's causal conv on a seq shard sees zeros instead of the left neighbour's "
           "last inputs", "seqjax/nn/sequence_parallel.py",
           "x_ext = jnp.concatenate([cp.from_left(x_BTE, halo, AXIS), x_BTE], axis=1)",
           "x_ext = jnp.concatenate([0 * cp.from_left(x_BTE, halo, AXIS), x_BTE], axis=1)",
           ("tests/nn/test_sequence_parallel.py",)),
    Mutant("cp_delta_maps_composed_backwards", "the shards' delta-rule matrix maps composed in the wrong order",
           "seqjax/ops/ssm/context_parallel.py", "  return act(a2, a1), act(a2, b1) + b2",
           "  return act(a1, a2), act(a2, b1) + b2", ("tests/ops/linear/test_context_parallel.py",)),
    Mutant("cp_delta_identity_not_cut", "a delta-rule shard whose first token starts a document still takes the "
           "incoming state", "seqjax/ops/linear/context_parallel.py",
           "identity_BNPP = continues_B[:, None, None, None] * jnp.eye", "identity_BNPP = jnp.eye",
           ("tests/ops/linear/test_context_parallel.py",)),
    # Speculative decoding and int8 weights.
    Mutant("speculative_accept_without_min", "speculative decoding accepts with p / q instead of min(1, p / q)",
           "seqjax/decode/speculative.py", "return jnp.minimum(1.0, p / jnp.maximum(q, jnp.finfo(jnp.float32).tiny))",
           "return p / jnp.maximum(q, jnp.finfo(jnp.float32).tiny)",
           ("tests/decode/test_speculative.py::test_exact_output_distribution_equals_the_targets",)),
    Mutant("speculative_residual_unnormalised", "a rejected position draws from max(0, p - q) not renormalised",
           "seqjax/decode/speculative.py", "excess_V / jnp.where(total > 0, total, 1.0)", "excess_V",
           ("tests/decode/test_speculative.py::test_exact_output_distribution_equals_the_targets",)),
    Mutant("speculative_target_cache_not_restored", "the target's cache keeps every proposed token, rejected ones too",
           "seqjax/decode/speculative.py", "    cache = model.commit(cache, pending, a_B + 1)",
           "    cache = model.commit(cache, pending, jnp.full_like(a_B, k + 1))",
           ("tests/decode/test_speculative.py::test_greedy_speculative_equals_greedy_target",)),
    Mutant("int8_scale_per_tensor", "int8 quantization with one scale for the whole tensor",
           "seqjax/ops/quant.py", "amax = jnp.max(jnp.abs(w32), axis=tuple(reduce_axes), keepdims=True)",
           "amax = jnp.max(jnp.abs(w32), keepdims=True)", ("tests/decode/test_quantize.py",)),
    # The Performer's feature redraw in training.
    Mutant("performer_redraw_not_applied", "the LM loss ignores the step in the batch (draw 0 throughout training)",
           "seqjax/train/tasks/lm.py", "  if not every or FEATURE_STEP_KEY not in batch:",
           "  if True or not every or FEATURE_STEP_KEY not in batch:",
           ("tests/train/test_performer_redraw_training.py::"
            "test_loss_uses_draw_step_over_every_and_evaluation_draw_0",)),
)


def repo_files(root: Path = ROOT) -> list[str]:
  """Tracked and untracked-but-not-ignored files (what a clean clone plus the uncommitted work holds)."""
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                       capture_output=True).stdout.decode()
  return [p for p in out.split("\0") if p and (root / p).is_file()]


def check_mutant(m: Mutant, root: Path = ROOT) -> list[str]:
  """Problems that make a mutant unusable (the snippet is gone or ambiguous, a test file is missing)."""
  problems = []
  target = root / m.path
  if not target.is_file():
    return [f"{m.name}: {m.path} does not exist"]
  count = target.read_text().count(m.old)
  if count != 1:
    problems.append(f"{m.name}: the snippet occurs {count} times in {m.path} (must be exactly once): {m.old!r}")
  if m.old == m.new:
    problems.append(f"{m.name}: the replacement equals the snippet")
  for t in m.tests:
    if not (root / t.split("::")[0]).is_file():
      problems.append(f"{m.name}: test file {t.split('::')[0]} does not exist")
  return problems


def _copy_tree(dest: Path) -> None:
  for rel in repo_files():
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / rel, target)


def _pytest(cwd: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
  env = {**os.environ, "PYTHONPATH": str(cwd), "PYTHONDONTWRITEBYTECODE": "1", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-m", "not slow", *tests]
  try:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, f"timed out after {timeout:.0f} s"
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-300:]


def run_mutant(m: Mutant, *, check_clean: bool = False, timeout: float = 900.0) -> dict:
  """Runs one mutant in a fresh copy -> {"name", "caught", "summary", "seconds", "clean"}."""
  began = time.perf_counter()
  problems = check_mutant(m)
  if problems:
    return {"name": m.name, "caught": False, "summary": "; ".join(problems), "seconds": 0.0, "clean": None}
  with tempfile.TemporaryDirectory(prefix=f"seqjax-mutant-{m.name}-") as tmp:
    work = Path(tmp)
    _copy_tree(work)
    clean = None
    if check_clean:
      code, summary = _pytest(work, m.tests, timeout)
      clean = code == 0
      if not clean:
        return {"name": m.name, "caught": False, "summary": f"unmutated tests fail: {summary}",
                "seconds": time.perf_counter() - began, "clean": False}
    target = work / m.path
    target.write_text(target.read_text().replace(m.old, m.new))
    code, summary = _pytest(work, m.tests, timeout)
  # Exit code 1 = tests failed (caught). 0 = survived. Anything else (collection/usage errors, timeouts) is
  # reported as caught only if pytest ran and failed; an import error also counts as caught, since the suite
  # would go red, but the summary shows it.
  return {"name": m.name, "caught": code not in (0, 5), "summary": summary,
          "seconds": time.perf_counter() - began, "clean": clean}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--list", action="store_true", help="print the mutants and exit")
  parser.add_argument("--only", default="", help="comma-separated mutant names")
  parser.add_argument("--jobs", type=int, default=2, help="mutants run at once")
  parser.add_argument("--check_clean", action="store_true", help="first run each mutant's tests unmutated")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
  args = parser.parse_args(argv)
  chosen = list(MUTANTS)
  if args.only:
    names = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = names - {m.name for m in MUTANTS}
    if unknown:
      parser.error(f"unknown mutants {sorted(unknown)}; --list shows them")
    chosen = [m for m in MUTANTS if m.name in names]
  if args.list:
    for m in chosen:
      print(f"{m.name:28s} {m.path}: {m.description}\n{'':28s} caught by: {', '.join(m.tests)}")
    return 0
  print(f"running {len(chosen)} mutants, {args.jobs} at a time")
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
    results = list(pool.map(lambda m: run_mutant(m, check_clean=args.check_clean, timeout=args.timeout), chosen))
  width = max((len(r["name"]) for r in results), default=10)
  for r in results:
    mark = "caught  " if r["caught"] else "SURVIVED"
    print(f"{r['name']:{width}s}  {mark}  {r['seconds']:6.1f} s  {r['summary']}")
  survived = [r["name"] for r in results if not r["caught"]]
  print(f"{len(results) - len(survived)} of {len(results)} mutants caught" +
        (f"; survived: {', '.join(survived)}" if survived else ""))
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
