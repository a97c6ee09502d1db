r"""Attention maps of a trained run: per-layer grids of per-head heatmaps, and the seq2seq LSTM's alignment.

    python -m seqjax.visualize --workdir=runs/lm --text="def f(x):"                  # a byte-level LM run
    python -m seqjax.visualize --workdir=runs/mqar --text="12 4107 9 5000 12"          # a synthetic run: token ids
    python -m seqjax.visualize --workdir=runs/seq2seq_numbers --source="1204 77"     # the LSTM encoder-decoder

The run is read with `seqjax.load` (the newest checkpoint, or `--step`). For a decoder LM the text is run through
the model once with the attention collection mutable (`seqjax.nn.attention.WEIGHTS_COLLECTION`): every attention
layer then also computes its dense softmax probabilities [B, N, T, S] with `seqjax.ops.attention.attention_weights`
(the fast kernel's output is untouched), and `attention_layer_{i}.png` (i the layer's index in the stack; layers of
other mixers have no map) shows one heatmap per head: row t = query t, column s = key s, causal zeros above the
diagonal. For a seq2seq run each source number gives `alignment_{j}.png`: row t = the t-th greedy output token,
column s = source character s, the additive attention weights that produced it.

Token labels are written on the axes when the text has at most `--max_labels` tokens. The images' size in pixels
is fixed by the grid: `panel_size * dpi` per head panel (columns = min(N, --columns)), so tests and documents
can rely on it (`image_size`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PANEL_INCHES = 3.0  # one head's panel
ALIGNMENT_INCHES = 6.0  # the seq2seq alignment (outputs of up to ~60 characters)
DPI = 100


def capture_attention(model: Any, params: Any, tokens_BT: Any) -> dict[int, np.ndarray]:
  """The attention probabilities of every attention layer of a `DecoderLM`: {layer index: float32 [B, N, T, T]}.

  Runs the parallel forward once with the weights collection mutable; layers whose mixer is not attention are
  absent. A scanned stack (`scan_layers`) gives each layer its slice of the stacked weights.
  """
  from seqjax.nn.attention import WEIGHTS_COLLECTION  # pylint: disable=import-outside-toplevel
  _, captured = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=[WEIGHTS_COLLECTION]))(
      params, jnp.asarray(tokens_BT, jnp.int32))
  layers: dict[int, np.ndarray] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(captured.get(WEIGHTS_COLLECTION, {}))[0]:
    names = [getattr(key, "key", None) for key in path]
    leaf = np.asarray(leaf, np.float32)
    if "layers" in names:  # nn.scan: the layer is the leading axis
      for i in range(leaf.shape[0]):
        layers[i] = leaf[i]
    else:
      index = next(int(n[len("layer_"):]) for n in names if isinstance(n, str) and re.fullmatch(r"layer_\d+", n))
      layers[index] = leaf
  return dict(sorted(layers.items()))


def image_size(num_panels: int, columns: int, panel_size: float = PANEL_INCHES, dpi: int = DPI) -> tuple[int, int]:
  """(width, height) in pixels of a grid of `num_panels` heatmaps with at most `columns` per row."""
  cols = min(num_panels, columns)
  rows = math.ceil(num_panels / cols)
  return round(cols * panel_size * dpi), round(rows * panel_size * dpi)


def plot_heatmaps(path: str, maps: Sequence[np.ndarray], titles: Sequence[str], row_labels: Sequence[str] | None,
                  col_labels: Sequence[str] | None, suptitle: str, *, columns: int = 4,
                  panel_size: float = PANEL_INCHES, dpi: int = DPI, xlabel: str = "key",
                  ylabel: str = "query") -> str:
  """Writes a grid of heatmaps (each [rows, cols] in [0, 1]) as one PNG of exactly `image_size(...)` pixels."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  width, height = image_size(len(maps), columns, panel_size, dpi)
  cols = min(len(maps), columns)
  rows = math.ceil(len(maps) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False)
  for ax in axes.flat[len(maps):]:
    ax.axis("off")
  for ax, grid, title in zip(axes.flat, maps, titles):
    ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=8)
    for labels, set_ticks, n in ((col_labels, ax.set_xticks, grid.shape[1]), (row_labels, ax.set_yticks,
                                                                              grid.shape[0])):
      if labels is None:
        set_ticks([])
      else:
        set_ticks(range(n), labels[:n], fontsize=max(3, min(7, 200 // max(n, 1))))
    if col_labels is not None:
      ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
  fig.suptitle(suptitle, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)  # no bbox_inches="tight": the size stays figsize * dpi
  plt.close(fig)
  return path


def _token_labels(tokenizer: Any, tokens: Sequence[int]) -> list[str]:
  if tokenizer is None:
    return [str(t) for t in tokens]
  labels = []
  for t in tokens:
    text = tokenizer.decode([t]) if t >= 3 else ("<bos>" if t == tokenizer.bos_id else f"<{t}>")
    labels.append({" ": "␣", "\n": "\\n", "\t": "\\t"}.get(text, text))
  return labels


def lm_tokens(text: str, config: Any, tokenizer: Any) -> np.ndarray:
  """The token ids [T] of `text`: the byte tokenizer's (after BOS), or whitespace-separated ids of a synthetic run."""
  if tokenizer is None:
    parts = text.split()
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
      raise ValueError(f"seqjax.visualize: the run trains on the token ids of {config.data.name!r}; give --text as "
                       f"whitespace-separated ids in [0, {config.model.vocab_size}), got {text!r}")
    tokens = np.asarray([int(p) for p in parts], np.int32)
    if tokens.max() >= config.model.vocab_size:
      raise ValueError(f"seqjax.visualize: token id {tokens.max()} is outside the run's vocabulary of "
                       f"{config.model.vocab_size}")
  else:
    if not text:
      raise ValueError("seqjax.visualize: --text is empty; give the text whose attention maps you want")
    tokens = np.asarray(tokenizer.encode(text, add_bos=True), np.int32)
  if config.model.positions == "learned" and len(tokens) > config.model.max_len:
    raise ValueError(f"seqjax.visualize: {len(tokens)} tokens exceed the run's model.max_len="
                     f"{config.model.max_len} (learned positions); shorten --text")
  return tokens


def visualize_lm(model: Any, params: Any, config: Any, tokenizer: Any, text: str, outdir: str, *,
                 max_labels: int = 48, columns: int = 4, dpi: int = DPI) -> list[str]:
  """Writes attention_layer_{i}.png for each attention layer of a decoder LM on `text`; returns the paths."""
  if "attention" not in config.model.layer_mixers():
    raise ValueError(f"seqjax.visualize: the run's mixers {config.model.mixer!r} have no attention layer to draw")
  tokens_T = lm_tokens(text, config, tokenizer)
  labels = _token_labels(tokenizer, tokens_T.tolist()) if len(tokens_T) <= max_labels else None
  os.makedirs(outdir, exist_ok=True)
  paths = []
  for layer, weights_BNTS in capture_attention(model, params, tokens_T[None]).items():
    heads = weights_BNTS[0]
    path = os.path.join(outdir, f"attention_layer_{layer}.png")
    plot_heatmaps(path, list(heads), [f"head {n}" for n in range(len(heads))], labels, labels,
                  f"layer {layer}: attention probabilities ({len(tokens_T)} tokens)", columns=columns, dpi=dpi)
    paths.append(path)
  return paths


def seq2seq_alignment(model: Any, params: Any, config: Any, vocab: Any,
                      source: str) -> tuple[str, list[str], np.ndarray]:
  """Greedy translation of one source string and its alignment: (output text, the output tokens up to and with EOS
  (all `decode_max_len` without one), float32 weights [T_out, S])."""
  # pylint: disable=import-outside-toplevel
  from seqjax.data import numbers
  from seqjax.models.seq2seq_lstm import Seq2SeqLSTM
  src = vocab.encode(source)
  max_len = config.seq2seq.decode_max_len or 64
  tokens, lengths, weights = jax.jit(lambda p, s, n: model.apply(
      {"params": p}, s, n, max_len=max_len, bos_id=numbers.BOS_ID, eos_id=numbers.EOS_ID, pad_id=numbers.PAD_ID,
      method=Seq2SeqLSTM.greedy_alignment))(params, jnp.asarray([src], jnp.int32), jnp.asarray([len(src)], jnp.int32))
  length = int(lengths[0])
  labels = [{" ": "␣"}.get(vocab.tokens[i], vocab.tokens[i]) for i in np.asarray(tokens[0, :length]).tolist()]
  return vocab.decode(np.asarray(tokens[0])), labels, np.asarray(weights[0, :length], np.float32)


def visualize_seq2seq(model: Any, params: Any, config: Any, vocab: Any, source: str, outdir: str, *,
                      dpi: int = DPI) -> list[str]:
  """Writes alignment_{j}.png for each number of `source` (digits, separated by spaces or commas)."""
  items = [p for p in re.split(r"[\s,]+", source) if p]
  if not items or not all(p.isdigit() for p in items):
    raise ValueError(f"seqjax.visualize: the seq2seq run translates numbers written in digits; give --source as "
                     f"numbers separated by spaces or commas (e.g. --source='1204 77'), got {source!r}")
  os.makedirs(outdir, exist_ok=True)
  paths = []
  for j, item in enumerate(items):
    output, out_labels, weights_TS = seq2seq_alignment(model, params, config, vocab, item)
    path = os.path.join(outdir, f"alignment_{j}.png")
    plot_heatmaps(path, [weights_TS], [f"{item} -> {output}"], out_labels, list(item),
                  "additive attention (alignment)", columns=1, panel_size=ALIGNMENT_INCHES, dpi=dpi,
                  xlabel="source", ylabel="output")
    paths.append(path)
  return paths


def visualize(workdir: str, *, text: str | None = None, source: str | None = None, outdir: str | None = None,
              step: int | None = None, max_labels: int = 48, columns: int = 4, dpi: int = DPI) -> list[str]:
  """Loads the run and writes its attention maps into `outdir` (default WORKDIR/attention); returns the paths."""
  import seqjax  # pylint: disable=import-outside-toplevel
  if columns < 1 or dpi < 10:
    raise ValueError(f"seqjax.visualize: --columns must be >= 1 and --dpi >= 10, got {columns} and {dpi}")
  model, params, config, tokenizer = seqjax.load(workdir, step)
  outdir = outdir or os.path.join(workdir, "attention")
  if config.task == "seq2seq":
    if source is None:
      raise ValueError("seqjax.visualize: this is a seq2seq run; give --source='1204 77' (numbers to translate)")
    return visualize_seq2seq(model, params, config, tokenizer, source, outdir, dpi=dpi)
  if text is None:
    raise ValueError("seqjax.visualize: give --text (for a decoder LM run; --source is for seq2seq runs)")
  if config.model.remat != "none":  # the same parameters; the capture runs without rematerialisation
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, remat="none"))
    model = type(model)(config.model)
  return visualize_lm(model, params, config, tokenizer, text, outdir, max_labels=max_labels, columns=columns,
                      dpi=dpi)


def define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The training run's --workdir.")
  flags.DEFINE_string("text", None, "Decoder LM runs: the text (token ids for a synthetic task's run).")
  flags.DEFINE_string("source", None, "seq2seq runs: numbers to translate, e.g. '1204 77'.")
  flags.DEFINE_string("outdir", None, "Where the PNGs go (default WORKDIR/attention).")
  flags.DEFINE_integer("step", None, "The checkpoint (default the newest).")
  flags.DEFINE_integer("max_labels", 48, "Token labels on the axes up to this many tokens.")
  flags.DEFINE_integer("columns", 4, "Head panels per row.")
  flags.DEFINE_integer("dpi", DPI, "Pixels per inch; a head panel is 3 x 3 inches.")


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from seqjax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from seqjax.train.checkpoint import CheckpointRestoreError  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if len(argv) > 1 or not f.workdir:
    print("error: give --workdir=RUN and --text=... (or --source=... for a seq2seq run); see --help", file=sys.stderr)
    sys.exit(2)
  try:
    paths = visualize(f.workdir, text=f.text, source=f.source, outdir=f.outdir, step=f.step,
                      max_labels=f.max_labels, columns=f.columns, dpi=f.dpi)
  except (ValueError, FileNotFoundError, ConfigError, CheckpointRestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for path in paths:
    print(path)


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
