"""Metric files a user can open: TensorBoard event files, a JSONL log, and a PNG of the learning curves."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax


class MetricWriter:
  """Writes scalars to `WORKDIR/tensorboard/` (event files) and `WORKDIR/metrics.jsonl` (one JSON per record).

  Only process 0 writes. Records carry a `split` ("train" or "eval") so the JSONL can be plotted directly.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for k, v in clean.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, metric: str = "loss") -> str | None:
  """Plots train and eval `metric` (and eval bits/byte) against step into WORKDIR/curves.png."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = read_jsonl(path)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-"), ("eval", "o-")):
    pts = sorted((r["step"], r[metric]) for r in records if r["split"] == split and metric in r)
    if pts:
      axes[0].plot(*zip(*pts), style, label=split, markersize=3)
  axes[0].set(xlabel="step", ylabel=f"{metric} (nats/token)", title="loss")
  axes[0].legend()
  pts = sorted((r["step"], r["bits_per_byte"]) for r in records if r["split"] == "eval" and "bits_per_byte" in r)
  if pts:
    axes[1].plot(*zip(*pts), "o-", color="C1")
  axes[1].set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
