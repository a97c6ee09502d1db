"""Benchmark dispatcher: `python -m seqjax.bench <name> [flags]`, e.g. `python -m seqjax.bench attention --help`.

A benchmark is a module exposing `main(argv: list[str]) -> None`; add it to `BENCHMARKS` to make it a subcommand.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "attention": "seqjax.bench.attention",
    "claims": "seqjax.bench.claims",
    "decode": "seqjax.bench.decode",
    "lstm": "seqjax.bench.recurrent",
    "recurrent": "seqjax.bench.recurrent",
    "ring": "seqjax.bench.ring",
    "ssm": "seqjax.bench.ssm",
    "linear": "seqjax.bench.linear",
    "moe": "seqjax.bench.moe",
    "sparse": "seqjax.bench.sparse",
    "ssm_context": "seqjax.bench.ssm_context",
}


def main(argv: list[str]) -> None:
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
    known = ", ".join(sorted(BENCHMARKS))
    print(f"usage: python -m seqjax.bench <benchmark> [flags]\nbenchmarks: {known}", file=sys.stderr)
    if argv and argv[0] not in ("-h", "--help"):
      print(f"unknown benchmark {argv[0]!r}", file=sys.stderr)
      sys.exit(2)
    sys.exit(0 if argv else 2)
  importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
