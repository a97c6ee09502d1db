"""Benchmark of ring attention (`seqjax.ops.attention.ring_attention`) on simulated CPU devices: what the program
costs per device as the ring grows, read from the compiled program rather than timed.

    python -m seqjax.bench ring                                  # P = 2, 4, 8 at local length 1024; ring.json
    python -m seqjax.bench ring --local_len=512 --shards=2,4     # a quick look

Three figures:
- memory: per-device temporary bytes of the jitted forward+backward (`compiled.memory_analysis()`; the program is
  SPMD, so this is one device's) at a fixed local length for each P. Flat in P: the hops run in a loop.
- traffic: bytes each device sends, counted from the compiled HLO: the `collective-permute` ops inside loop bodies
  run once per hop (P - 1 hops), the others once. Forward alone, then forward+backward minus forward. Expected:
  forward (P - 1) |K + V|, backward (P - 1) (|K + V| + |dK + dV|) + |dK + dV| (the gradients' last hop home).
- balance: the causal work per device in tiles, counted with the kernel's own run-time tile test
  (`masks.AtPositions(Causal(), ...)`) over every hop; the busiest device over the mean (1.0 = perfect) per layout.
  Then the same for the static hop plans (`ring.HOP_PLANS`, what plain causal attention runs): tiles per device,
  and the share of them that pay the mask arithmetic (PARTIAL tiles; the dynamic path masks every tile).
- plan vs dynamic: wall-clock fwd+bwd of the jitted ring with the static hop plans and with the dynamic
  position-mask path (`ring.hop_plans(False)`), side by side in one run (--time_shards devices, --time_len tokens
  each; 0 skips), interleaved repeats, median.
- LM: per-device temporary bytes of the LM's compiled train step on 1 device at --lm_context tokens, and on
  P = max(--shards) devices (mesh seq P, ring, zigzag) at P times that context.

The simulated devices are XLA CPU devices of one process (`jax_num_cpu_devices`, set before JAX starts): they
show the program's memory and communication, not a pod's speed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Sequence

import numpy as np
from absl import flags

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 8, 64


def _define_flags(fv):
  flags.DEFINE_integer("local_len", 1024, "tokens per device (the global length is P times this)", flag_values=fv)
  flags.DEFINE_list("shards", ["2", "4", "8"], "ring sizes P", flag_values=fv)
  flags.DEFINE_integer("block", 256, "tile side of the blockwise kernel", flag_values=fv)
  flags.DEFINE_string("layout", "zigzag", "layout for the memory and traffic figures", flag_values=fv)
  flags.DEFINE_string("results_dir", "results/ring", "where ring.json goes", flag_values=fv)
  flags.DEFINE_integer("time_shards", 4, "plan vs dynamic timing: ring size P", flag_values=fv)
  flags.DEFINE_integer("time_len", 1024, "plan vs dynamic timing: tokens per device; 0 skips it", flag_values=fv)
  flags.DEFINE_integer("time_repeats", 5, "plan vs dynamic timing: interleaved repeats (median)", flag_values=fv)
  flags.DEFINE_integer("lm_context", 2048, "LM figure: context of the 1-device step (the sharded step gets P times "
                       "this on P = max(--shards) devices); 0 skips it", flag_values=fv)


def simulated_devices(count: int):
  """jax, with at least `count` CPU devices simulated in this process (set before the backend starts)."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_num_cpu_devices", count)  # before the backend starts
  except RuntimeError:
    pass  # the backend is already up (e.g. under the test suite's 8 devices): use what it has
  if len(jax.devices()) < count:
    raise RuntimeError(f"{len(jax.devices())} devices, need {count}: run in a fresh process on a CPU")
  return jax


def _ring_program(P, local_len, block, layout, with_grad, plans=True):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, PartitionSpec  # pylint: disable=import-outside-toplevel

  from seqjax.ops.attention import ring_attention  # pylint: disable=import-outside-toplevel
  from seqjax.ops.attention.ring import hop_plans  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
  spec = PartitionSpec(None, "seq")
  attend = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, layout=layout, block_q=block, block_kv=block),
                         mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
  if with_grad:
    fn = lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2))(q, k, v)  # noqa
  else:
    fn = attend
  L = P * local_len
  q = jax.ShapeDtypeStruct((BATCH, L, HEADS, HEAD_DIM), jnp.float32)
  kv = jax.ShapeDtypeStruct((BATCH, L, KV_HEADS, HEAD_DIM), jnp.float32)
  with hop_plans(plans):
    return jax.jit(fn).lower(q, kv, kv).compile()


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def _shape_bytes(text: str) -> int:
  return sum(_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
             for d, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64)\[([\d,]*)\]", text))


def permute_bytes(hlo_text: str) -> tuple[int, int]:
  """(bytes sent by collective-permutes in non-entry computations (loop bodies), bytes sent in the entry)."""
  in_loop = in_entry = 0
  entry = False
  for line in hlo_text.splitlines():
    if line and not line.startswith(" "):  # a computation header
      entry = line.startswith("ENTRY")
    if " collective-permute(" in line or " collective-permute-start(" in line:
      result_type = line.split("=", 1)[1].split("collective-permute", 1)[0]
      nbytes = _shape_bytes(result_type)
      if entry:
        in_entry += nbytes
      else:
        in_loop += nbytes
  return in_loop, in_entry


def tile_balance(P: int, local_len: int, block: int, layout: str) -> dict:
  """Causal tiles each device computes over all hops (the kernel's run-time tile test), busiest / mean."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from seqjax.ops.attention import masks  # pylint: disable=import-outside-toplevel
  from seqjax.ops.attention.ring import shard_positions  # pylint: disable=import-outside-toplevel
  starts = np.arange(0, local_len, block)
  ends = np.minimum(starts + block, local_len) - 1
  work = []
  for r in range(P):
    q_pos = shard_positions(layout, local_len, P, r, np)
    tiles = 0
    for s in range(P):
      kv_pos = shard_positions(layout, local_len, P, s, np)
      visible = masks.Causal().span_maybe_visible(jnp.asarray(q_pos[starts])[:, None],
                                                  jnp.asarray(q_pos[ends])[:, None],
                                                  jnp.asarray(kv_pos[starts])[None, :],
                                                  jnp.asarray(kv_pos[ends])[None, :])
      tiles += int(np.asarray(visible).sum())
    work.append(tiles)
  return {"layout": layout, "P": P, "tiles_per_device": work, "busiest_over_mean": max(work) / np.mean(work)}


def plan_tile_balance(P: int, local_len: int, block: int, layout: str) -> dict:
  """Causal tiles each device computes over all hops under the static hop plans (`ring.HOP_PLANS`, the kernel's
  own static tile tables), busiest / mean, and the tiles that evaluate a mask (PARTIAL)."""
  from seqjax.ops.attention.blockwise import make_plan  # pylint: disable=import-outside-toplevel
  from seqjax.ops.attention.ring import HOP_PLANS, _rows_len, hop_kind_index  # pylint: disable=import-outside-toplevel
  work, masked = [], []
  for r in range(P):
    tiles = partial = 0
    for s in range(P):
      kind = HOP_PLANS[layout][int(hop_kind_index(r, s))]
      if kind is None:
        continue
      T, S = _rows_len(local_len, kind.q_rows), _rows_len(local_len, kind.kv_rows)
      plan = make_plan(kind.mask, T, S, min(block, T), min(block, S))
      tiles += plan.visited_tiles
      partial += int(plan.n_part_kv.sum())
    work.append(tiles)
    masked.append(partial)
  return {"layout": layout, "P": P, "tiles_per_device": work, "masked_tiles_per_device": masked,
          "busiest_over_mean": max(work) / np.mean(work), "masked_share": sum(masked) / sum(work)}


def time_plan_vs_dynamic(P: int, local_len: int, block: int, repeats: int) -> list[dict]:
  """Median seconds of the jitted causal ring fwd+bwd per layout, static hop plans vs the dynamic path, the two
  programs run alternately (so load changes hit both)."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  L = P * local_len
  key_q, key_kv = jax.random.split(jax.random.key(0))
  q = jax.random.normal(key_q, (BATCH, L, HEADS, HEAD_DIM), jnp.float32)
  kv = jax.random.normal(key_kv, (BATCH, L, KV_HEADS, HEAD_DIM), jnp.float32)
  rows = []
  for layout in ("contiguous", "striped", "zigzag"):
    programs = {name: _ring_program(P, local_len, block, layout, with_grad=True, plans=name == "plan")
                for name in ("plan", "dynamic")}
    seconds = {name: [] for name in programs}
    for _ in range(repeats + 1):  # the first round warms up
      for name, program in programs.items():
        began = time.perf_counter()
        jax.block_until_ready(program(q, kv, kv))
        seconds[name].append(time.perf_counter() - began)
    plan, dynamic = (float(np.median(seconds[name][1:])) for name in ("plan", "dynamic"))
    rows.append({"layout": layout, "P": P, "local_len": local_len, "plan_s": plan, "dynamic_s": dynamic,
                 "dynamic_over_plan": dynamic / plan})
  return rows


def lm_step_memory(context: int, seq_shards: int, batch: int = 1, layout: str = "zigzag") -> int:
  """Per-device temporary bytes of the LM's compiled train step (attention, d_model 256, 4 layers, 4 heads,
  blockwise attention with the CPU kernels off) at `context` tokens on a mesh of (seq `seq_shards`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from seqjax.config import default_config_dict, from_config_dict  # pylint: disable=import-outside-toplevel
  from seqjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel
  from seqjax.ops import backend  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  from seqjax.train.state import abstract_train_state  # pylint: disable=import-outside-toplevel
  from seqjax.train.step import jit_train_step, make_train_step  # pylint: disable=import-outside-toplevel
  from seqjax.train.tasks.lm import lm_loss_sum  # pylint: disable=import-outside-toplevel
  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=256, num_layers=4, mlp_dim=1024, max_len=context, positions="rope", vocab_size=259,
                      context_parallel_layout=layout if seq_shards > 1 else "contiguous")
  cfg["model"]["attention"].update(num_heads=4, implementation="blockwise")
  cfg["data"].update(seq_len=context)
  cfg["mesh"].update(data=1, seq=seq_shards)
  cfg = from_config_dict(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:seq_shards])
  model = DecoderLM(cfg.model)
  optimizer = optax.adamw(1e-3)
  abstract, shardings = abstract_train_state(model, optimizer, seq_len=context, mesh=mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=batch_sharding)
  batch_abstract = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
                    "weights": jax.ShapeDtypeStruct((batch, context), jnp.float32, sharding=batch_sharding)}
  with backend.cpu_kernels_mode("off"):  # the program an accelerator runs
    step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer), shardings, batch_sharding)
    with sharding.mesh_context(mesh):
      compiled = getattr(step, "jitted", step).lower(abstract, batch_abstract).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench ring` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench ring"] + list(sys.argv[1:] if argv is None else argv))
  shards = [int(p) for p in fv.shards]
  if min(shards) < 1 or fv.local_len < 2 or fv.local_len % 2 or fv.block < 1:
    raise ValueError("bad flags: --shards >= 1, --local_len even and >= 2, --block >= 1")
  jax = simulated_devices(max(shards))
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  kv_bytes = 2 * BATCH * fv.local_len * KV_HEADS * HEAD_DIM * 4
  log(f"jax {jax.__version__}, {len(jax.devices())} simulated {jax.devices()[0].platform} devices; ring attention "
      f"fwd+bwd, causal, {fv.layout}; per device: q [{BATCH}, {fv.local_len}, {HEADS}, {HEAD_DIM}], k/v "
      f"[{BATCH}, {fv.local_len}, {KV_HEADS}, {HEAD_DIM}] float32, |K+V| = {kv_bytes / 2**20:.2f} MiB; tiles "
      f"{fv.block}")
  rows = []
  log(f"{'P':>3} {'temp MiB':>9} {'fwd sent MiB':>13} {'(P-1)|K+V|':>11} {'bwd sent MiB':>13} {'(2P-1)|K+V|':>12}")
  for P in shards:
    fwd = _ring_program(P, fv.local_len, fv.block, fv.layout, with_grad=False)
    both = _ring_program(P, fv.local_len, fv.block, fv.layout, with_grad=True)
    hops = P - 1
    loop_f, entry_f = permute_bytes(fwd.as_text())
    loop_b, entry_b = permute_bytes(both.as_text())
    sent_fwd = loop_f * hops + entry_f
    sent_bwd = loop_b * hops + entry_b - sent_fwd
    row = dict(P=P, temp_bytes=int(both.memory_analysis().temp_size_in_bytes), fwd_sent_bytes=int(sent_fwd),
               bwd_sent_bytes=int(sent_bwd), kv_bytes=kv_bytes)
    rows.append(row)
    log(f"{P:>3} {row['temp_bytes'] / 2**20:9.2f} {sent_fwd / 2**20:13.2f} {hops * kv_bytes / 2**20:11.2f} "
        f"{sent_bwd / 2**20:13.2f} {(2 * P - 1) * kv_bytes / 2**20:12.2f}")
  temps = [r["temp_bytes"] for r in rows]
  log(f"temp memory, largest over smallest P: {max(temps) / min(temps):.3f}x")
  balance = [tile_balance(P, fv.local_len, fv.block, layout) for P in shards
             for layout in ("contiguous", "striped", "zigzag")]
  log("causal work, busiest device over the mean (tiles of the kernel's run-time test):")
  for P in shards:
    cells = "  ".join(f"{b['layout']} {b['busiest_over_mean']:.3f}" for b in balance if b["P"] == P)
    log(f"  P={P}: {cells}")
  plan_balance = [plan_tile_balance(P, fv.local_len, fv.block, layout) for P in shards
                  for layout in ("contiguous", "striped", "zigzag")]
  log("static hop plans: busiest device over the mean; busiest device's tiles; share of tiles masked:")
  for P in shards:
    cells = "  ".join(f"{b['layout']} {b['busiest_over_mean']:.3f} ({max(b['tiles_per_device'])} tiles, "
                      f"{b['masked_share']:.0%} masked)" for b in plan_balance if b["P"] == P)
    log(f"  P={P}: {cells}")
  timing = None
  if fv.time_len:
    timing = time_plan_vs_dynamic(fv.time_shards, fv.time_len, fv.block, fv.time_repeats)
    log(f"causal fwd+bwd, P={fv.time_shards}, {fv.time_len} tokens per device, median of {fv.time_repeats}:")
    for t in timing:
      log(f"  {t['layout']:>10}: plan {t['plan_s'] * 1e3:8.1f} ms  dynamic {t['dynamic_s'] * 1e3:8.1f} ms  "
          f"dynamic / plan {t['dynamic_over_plan']:.2f}x")
  lm = None
  if fv.lm_context:
    P = max(shards)
    one = lm_step_memory(fv.lm_context, 1)
    sharded = lm_step_memory(P * fv.lm_context, P)
    lm = dict(context=fv.lm_context, shards=P, one_device_temp_bytes=one, sharded_temp_bytes=sharded)
    log(f"LM train step temp memory per device: 1 device at {fv.lm_context} tokens {one / 2**20:.1f} MiB; {P} "
        f"devices (seq {P}, ring, zigzag) at {P * fv.lm_context} tokens {sharded / 2**20:.1f} MiB "
        f"({sharded / one:.2f}x)")
  result = dict(config=dict(batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, local_len=fv.local_len,
                            block=fv.block, layout=fv.layout, dtype="float32"),
                rows=rows, balance=balance, plan_balance=plan_balance, timing=timing, lm=lm)
  with open(os.path.join(fv.results_dir, "ring.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
