"""python -m seqjax.conformance NAME... | all [--quick] [--train] [--imports=my.module] [--out=DIR] [--lengths=...]

Runs the conformance checks on each named registered mixer ("all": every one) and prints one table row per mixer;
without --quick it then profiles time and memory against length and writes DIR/conformance_profile.png and .csv.
With --train each row also gets the associative-recall smoke run (`seqjax.conformance.recall`: the mixer in the LM
trained on MQAR for --train_seconds, answer accuracy against chance). Exits with status 1 if any check failed.
Runs on 8 simulated CPU devices unless XLA_FLAGS says otherwise.
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Before JAX starts: the "sharded" check wants several devices (simulated on the CPU).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from absl import app, flags  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Only the checks (no profile against length).")
_OUT = flags.DEFINE_string("out", "results/conformance", "Where the profile's PNG and CSV go.")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024", "2048", "4096"], "Profile lengths.")
_D_MODEL = flags.DEFINE_integer("profile_d_model", 64, "Model width of the profile.")
_TRAIN = flags.DEFINE_bool("train", False, "Also train each mixer in the LM on associative recall (MQAR) and "
                           "report its answer accuracy against chance (about --train_seconds a mixer).")
_TRAIN_SECONDS = flags.DEFINE_float("train_seconds", 120.0, "Wall-clock training budget of --train, per mixer.")
_IMPORTS = flags.DEFINE_list("imports", [], "Modules to import first: ones that register your own mixers.")


def main(argv: list[str]) -> int:
  import importlib  # pylint: disable=import-outside-toplevel
  for module in _IMPORTS.value:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise app.UsageError(f"--imports: cannot import {module!r} ({e})") from e
  from seqjax import conformance  # pylint: disable=import-outside-toplevel
  from seqjax.conformance import profile  # pylint: disable=import-outside-toplevel
  from seqjax.nn.mixers import available_mixers  # pylint: disable=import-outside-toplevel
  names = argv[1:]
  if not names:
    raise app.UsageError(f"name the mixer(s) to check, or 'all'; registered: {', '.join(available_mixers())}")
  if names == ["all"]:
    names = list(available_mixers())
  unknown = [n for n in names if n not in available_mixers()]
  if unknown:
    raise app.UsageError(f"unknown mixer(s) {', '.join(unknown)}; registered: {', '.join(available_mixers())}")
  try:
    lengths = [int(n) for n in _LENGTHS.value]
  except ValueError as e:
    raise app.UsageError(f"--lengths must be integers, got {_LENGTHS.value}") from e
  if _TRAIN_SECONDS.value <= 0:
    raise app.UsageError(f"--train_seconds must be positive, got {_TRAIN_SECONDS.value}")
  reports = []
  for name in names:
    reports.append(conformance.run(name, quick=_QUICK.value))
    if _TRAIN.value:
      from seqjax.conformance import recall  # pylint: disable=import-outside-toplevel
      reports[-1] = conformance.with_recall(reports[-1], recall.train_recall(name, seconds=_TRAIN_SECONDS.value))
    print(conformance.table(reports[-1:]).splitlines()[-1 - len(reports[-1].failures())], flush=True)
  print()
  print(conformance.table(reports))
  if not _QUICK.value:
    os.makedirs(_OUT.value, exist_ok=True)
    curves = {}
    for name in names:
      cfg = conformance.default_config(name, {"d_model": _D_MODEL.value, "max_len": max(lengths)})
      curves[name] = profile.profile(name, cfg, lengths)
    rows = ["mixer,length,seconds,temp_bytes"] + [f"{n},{p.length},{p.seconds:.6f},{p.temp_bytes}"
                                                  for n, points in curves.items() for p in points]
    with open(os.path.join(_OUT.value, "conformance_profile.csv"), "w", encoding="utf-8") as f:
      f.write("\n".join(rows) + "\n")
    profile.plot(curves, os.path.join(_OUT.value, "conformance_profile.png"))
    print("\n" + "\n".join(rows))
    print(f"\nwrote {_OUT.value}/conformance_profile.png and .csv")
  return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
