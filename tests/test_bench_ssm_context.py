"""`python -m seqjax.bench ssm_context` on a tiny case: the figures the docs quote come out of the compiled program.

The all-gather combine keeps a constant number of collectives as the seq axis grows (two all-gathers forward, their
reduce-scatters backward, and the replicated decay's gradient summed once); the ppermute scan adds two sends per
doubling, forward and backward. Catches a combine that silently stops communicating (a count of 1, the local
kernel's) or a ppermute scan that is not log-depth.
"""

import pytest

from seqjax.bench import ssm_context


@pytest.mark.slow  # six programs compiled and timed; the ops tests check the combines' results
def test_collective_counts(tmp_path):
  result = ssm_context.main(["--local_len=8", "--shards=2,4", "--repeats=1", f"--results_dir={tmp_path}"])
  counts = {(r["P"], r["combine"]): r["collectives"] for r in result["rows"]}
  assert counts[(2, "local only")] == counts[(4, "local only")] == 1
  assert counts[(2, "all_gather")] == counts[(4, "all_gather")] == 5
  assert counts[(2, "ppermute")] == 5 and counts[(4, "ppermute")] == 9
  assert (tmp_path / "ssm_context.json").exists()


@pytest.mark.slow  # eight programs compiled and timed; tests/ops/linear checks the results
def test_delta_rule_collectives_and_what_xla_partitioning_moves(tmp_path):
  """`--op=delta`: the context-parallel delta rule's all-gather combine keeps 4 collectives as P doubles (the two
  maps gathered forward, their reduce-scatters backward) and moves a few maps, while XLA's partitioning of the
  single-device program moves bytes that grow with the whole sequence (more than the context-parallel program)."""
  result = ssm_context.main(["--op=delta", "--local_len=64", "--shards=2,4", "--repeats=1",
                             f"--results_dir={tmp_path}"])
  rows = {(r["P"], r["combine"]): r for r in result["rows"]}
  assert rows[(2, "local only")]["collectives"] == rows[(4, "local only")]["collectives"] == 0
  assert rows[(2, "all_gather")]["collectives"] == rows[(4, "all_gather")]["collectives"] == 4
  assert rows[(2, "ppermute")]["collectives"] == 4 and rows[(4, "ppermute")]["collectives"] == 8
  assert rows[(4, "xla")]["bytes"] > 2 * rows[(4, "all_gather")]["bytes"]
  assert (tmp_path / "delta.json").exists()
