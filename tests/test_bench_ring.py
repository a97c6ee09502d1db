"""`python -m seqjax.bench ring` on a tiny case: the traffic it counts from the compiled program and the tile balance.

Catches: a ring that sends more than (P - 1) K/V blocks forward or (2P - 1) backward (e.g. a send left outside the
loop, or the gradients' hop home doubled), an HLO byte count that misses loop bodies, and a layout whose causal work
is not balanced.
"""

from seqjax.bench import ring as ring_bench


def test_ring_bench_counts_the_expected_traffic(tmp_path):
  result = ring_bench.main(["--shards=4", "--local_len=32", "--block=8", "--lm_context=0", "--time_len=0",
                            f"--results_dir={tmp_path}"])
  (row,) = result["rows"]
  assert row["fwd_sent_bytes"] == 3 * row["kv_bytes"]
  assert row["bwd_sent_bytes"] == 7 * row["kv_bytes"]
  assert row["temp_bytes"] > 0
  assert (tmp_path / "ring.json").exists()


def test_balanced_layouts_are_balanced_and_contiguous_is_not():
  for P in (2, 4, 8):
    ratios = {layout: ring_bench.tile_balance(P, 256, 32, layout)["busiest_over_mean"]
              for layout in ("contiguous", "striped", "zigzag")}
    assert ratios["zigzag"] <= 1.05 and ratios["striped"] <= 1.05, ratios
    assert ratios["contiguous"] > 1.3, ratios


def test_static_plans_balance_and_mask_less():
  """The static hop plans keep the balanced layouts balanced, and only diagonal tiles (and striped's near-diagonal
  ones) evaluate a mask: in zigzag at P = 4, 256 tokens, tiles of 32, the diagonal hop's 8 tiles of 40."""
  for P in (2, 4, 8):
    plan = {layout: ring_bench.plan_tile_balance(P, 256, 32, layout) for layout in ("contiguous", "striped", "zigzag")}
    assert plan["zigzag"]["busiest_over_mean"] <= 1.05 and plan["striped"]["busiest_over_mean"] <= 1.05, plan
    assert plan["contiguous"]["busiest_over_mean"] > 1.3, plan
  zigzag = ring_bench.plan_tile_balance(4, 256, 32, "zigzag")
  assert zigzag["tiles_per_device"] == [36 + 3 * 32] * 4, zigzag
  assert zigzag["masked_tiles_per_device"] == [8] * 4, zigzag


def test_permute_bytes_reads_loop_bodies_and_entry():
  hlo = "\n".join([
      "%body (p: f32[4]) -> f32[4] {",
      "  %cp = f32[2,4]{1,0} collective-permute(f32[2,4]{1,0} %x), source_target_pairs={{0,1},{1,0}}",
      "}",
      "ENTRY %main () -> f32[4] {",
      "  %cp2 = (f32[8]{0}, s32[2]{0}) collective-permute(%a, %b), source_target_pairs={{0,1},{1,0}}",
      "}"])
  assert ring_bench.permute_bytes(hlo) == (32, 40)
