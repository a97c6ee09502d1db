"""`python -m seqjax.cpu_kernels`: builds every CPU kernel (cached per machine) and prints which ones are available.

A kernel that does not build is reported with the first line of the reason; seqjax then runs the JAX code in its
place (tests/cpu_kernels/test_build.py fails on a machine with a compiler where a kernel does not build).
"""

import logging

from seqjax import cpu_kernels


def main() -> None:
  logging.disable(logging.WARNING)  # the reasons are printed below
  for kernel, reason in cpu_kernels.status().items():
    print(f"CPU kernel {kernel}: {'built' if reason is None else 'unavailable (' + reason.splitlines()[0] + ')'}")


if __name__ == "__main__":
  main()
