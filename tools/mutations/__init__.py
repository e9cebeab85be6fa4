"""Mutation lists, one module per part of the code: `MUTATIONS = [Mutation(...), ...]`.

A mutation is a small realistic bug written as an exact text replacement in one file, with the
tests that must catch it, fastest first (the runner stops at the first failure). Add the
mutations of a new feature to the list of the module it lives in, or a new module here.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str  # Unique within its module.
  path: str  # Repository-relative file the bug goes into.
  old: str  # Exact text; must occur exactly once in `path`.
  new: str
  tests: tuple[str, ...]  # pytest node ids or files, fastest first.
  bug: str  # The realistic mistake it stands for, in a few words.
  # Why no test can catch it, for a mutant found to be equivalent: it still runs and still
  # counts as survived in the score, with this reason next to it.
  equivalent: str = ""
