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
