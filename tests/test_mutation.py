"""The mutation probe's list stays usable: every snippet occurs exactly once, every named test exists.

The probe itself (`python -m tests.mutation`, one pytest process per mutant) is the slow test below.
"""

import pytest

from tests import mutation


@pytest.mark.parametrize("mutant", mutation.MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_to_the_current_tree(mutant):
  assert mutation.check_mutant(mutant) == []


def test_mutant_names_are_unique():
  names = [m.name for m in mutation.MUTANTS]
  assert len(names) == len(set(names))


@pytest.mark.slow
def test_the_suite_catches_every_mutant():
  assert mutation.main([]) == 0
