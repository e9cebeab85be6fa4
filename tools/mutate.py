"""Mutation testing: put each listed bug into a copy of the repository, run the tests that
should catch it, and report caught / survived per module. Not part of CI (minutes per module).

    python tools/mutate.py                       # every mutation (runs at nice 10)
    python tools/mutate.py --module optim,plan   # the lists of some modules
    python tools/mutate.py --only gn_eps,ws_axes
    python tools/mutate.py --check               # every mutation still applies; runs no test
    python tools/mutate.py --list

The lists are in tools/mutations/<module>.py. Each mutation is an exact text replacement with
the tests that must catch it, fastest first; its tests run in one `pytest -x -n 0` (stopping
at the first failure). Before any mutation the union of the selected tests runs once on the
unmodified copy: a mutation only counts as caught by tests that pass without it.

Why a list of patches rather than mutmut or cosmic-ray: those generate every operator swap in
every file (thousands of mutants here, most of them in logging and error messages, many
equivalent) and would run a suite of JAX compiles for each; on two shared cores that is days.
A reviewed list of realistic bugs (a wrong epsilon, a dropped mask, a centre crop) runs in
well under an hour, names the test expected to catch each, and grows with each feature.
"""

import argparse
import dataclasses
import importlib
import os
import pathlib
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import mutations  # pylint: disable=g-import-not-at-top,wrong-import-position

NICENESS = 10


@dataclasses.dataclass
class Result:
  module: str
  mutation: mutations.Mutation
  outcome: str  # caught, survived or error.
  detail: str  # The first failing test, or why it is an error.
  seconds: float


def load(modules: list[str] | None) -> dict[str, list[mutations.Mutation]]:
  names = [m.name for m in pkgutil.iter_modules(mutations.__path__)]
  unknown = set(modules or []) - set(names)
  if unknown:
    sys.exit(f"error: unknown module(s) {', '.join(sorted(unknown))}; valid: {', '.join(names)}")
  lists = {name: importlib.import_module(f"mutations.{name}").MUTATIONS
           for name in names if not modules or name in modules}
  for name, items in lists.items():
    duplicates = {m.name for m in items if [x.name for x in items].count(m.name) > 1}
    if duplicates:
      sys.exit(f"error: {name}: duplicate mutation names {', '.join(sorted(duplicates))}")
  return lists


def copy_repository(target: pathlib.Path) -> None:
  """Tracked and untracked-but-not-ignored files: the working tree as `git status` sees it."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split("\0")
  for name in filter(None, files):
    source = ROOT / name
    if source.is_file():
      (target / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, target / name)


def check_applies(copy: pathlib.Path, mutation: mutations.Mutation) -> str | None:
  """None, or why the mutation no longer applies (the code moved on: update the list)."""
  path = copy / mutation.path
  if not path.is_file():
    return f"{mutation.path} does not exist"
  count = path.read_text().count(mutation.old)
  if count != 1:
    return f"its text occurs {count} times in {mutation.path} (must be once)"
  if mutation.old == mutation.new:
    return "old and new are the same"
  if path.suffix == ".py":
    try:
      compile(path.read_text().replace(mutation.old, mutation.new), str(path), "exec")
    except SyntaxError as e:
      return f"the mutant is not valid Python: {e}"
  return None


def run_pytest(copy: pathlib.Path, tests, timeout: float) -> tuple[int | None, str]:
  """(exit code or None on timeout, output) of `pytest -x -n 0 tests` in the copy."""
  # The copy sits elsewhere: point the tests at the data the checkout sees. CI=true: a test
  # that skips for missing data would count every mutation it should catch as survived, so
  # missing data fails the baseline instead (conftest.require_data).
  env = {**os.environ, "PYTHONPATH": str(copy), "CI": "true"}
  env.setdefault("BIT_CIFAR10", str(ROOT.parent / "shared" / "data" / "cifar10"))
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-rf", "--no-header",
         "-p", "no:cacheprovider", *tests]
  # A session of its own, so that a timeout or Ctrl-C also ends the trainer subprocesses the
  # tests start.
  proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = proc.communicate(timeout=timeout)
  except BaseException as e:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    if isinstance(e, subprocess.TimeoutExpired):
      return None, ""
    raise
  return proc.returncode, output


def first_failure(output: str) -> str:
  match = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - |$)", output, re.MULTILINE)
  return match.group(1) if match else "?"


def mutate_and_test(copy: pathlib.Path, module: str, mutation: mutations.Mutation,
                    timeout: float) -> Result:
  path = copy / mutation.path
  original = path.read_text()
  start = time.monotonic()
  try:
    path.write_text(original.replace(mutation.old, mutation.new))
    code, output = run_pytest(copy, mutation.tests, timeout)
  finally:
    path.write_text(original)
  seconds = time.monotonic() - start
  if code is None:
    return Result(module, mutation, "caught", f"timed out after {timeout:.0f} s", seconds)
  if code == 1:
    return Result(module, mutation, "caught", first_failure(output), seconds)
  if code == 2 and re.search(r"errors? during collection", output):
    return Result(module, mutation, "caught", "tests fail to import", seconds)
  if code == 0:
    return Result(module, mutation, "survived", "", seconds)
  tail = " | ".join(output.strip().splitlines()[-3:])
  return Result(module, mutation, "error", f"pytest exit {code}: {tail}", seconds)


def summary(results: list[Result]) -> str:
  lines, modules = [], sorted({r.module for r in results})
  for module in modules + ["all"]:
    group = [r for r in results if module in ("all", r.module)]
    caught = sum(r.outcome == "caught" for r in group)
    survived = sum(r.outcome == "survived" for r in group)
    errors = len(group) - caught - survived
    lines.append(f"{module:12} {caught:3} caught  {survived:3} survived  {errors:3} errors  "
                 f"of {len(group):3}  ({100 * caught / max(len(group), 1):.1f}% caught)")
  for r in results:
    if r.outcome != "caught":
      lines.append(f"{r.outcome.upper()}: {r.module}/{r.mutation.name}: {r.mutation.bug}"
                   + (f" ({r.detail})" if r.detail else "")
                   + (f"; equivalent: {r.mutation.equivalent}" if r.mutation.equivalent
                      else "; add a test that catches it"))
  return "\n".join(lines)


def markdown(results: list[Result]) -> str:
  rows = ["| module | mutation | bug | result | first failing test | s |",
          "|---|---|---|---|---|---|"]
  for r in results:
    test = r.detail.replace("tests/", "").replace("|", "\\|")
    if r.outcome == "survived" and r.mutation.equivalent:
      test = f"equivalent: {r.mutation.equivalent}"
    rows.append(f"| {r.module} | `{r.mutation.name}` | {r.mutation.bug} | {r.outcome} | "
                f"{test} | {r.seconds:.0f} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--module", help="comma-separated modules (default: all)")
  parser.add_argument("--only", help="comma-separated mutation names")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--check", action="store_true", help="check that every mutation applies")
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip the run of the selected tests on the unmutated copy")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
  parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
  args = parser.parse_args()

  lists = load(args.module.split(",") if args.module else None)
  only = set(args.only.split(",")) if args.only else None
  selected = [(module, m) for module, items in lists.items() for m in items
              if only is None or m.name in only]
  missing = (only or set()) - {m.name for _, m in selected}
  if missing:
    sys.exit(f"error: no mutation named {', '.join(sorted(missing))}")
  if args.list:
    for module, m in selected:
      print(f"{module}/{m.name}: {m.bug}  [{m.path}]  tests: {' '.join(m.tests)}")
    print(f"{len(selected)} mutations")
    return

  os.nice(max(0, NICENESS - os.nice(0)))  # Shared machine: at least nice 10.
  copy = pathlib.Path(tempfile.mkdtemp(prefix="bit_mutants_"))
  try:
    copy_repository(copy)
    stale = [(module, m, why) for module, m in selected
             if (why := check_applies(copy, m)) is not None]
    for module, m, why in stale:
      print(f"STALE {module}/{m.name}: {why}")
    if stale:
      sys.exit(f"error: {len(stale)} mutation(s) no longer apply; update tools/mutations/.")
    tests = list(dict.fromkeys(t for _, m in selected for t in m.tests))
    if args.check:
      code, output = run_pytest(copy, ["--collect-only", *tests], timeout=600)
      if code != 0:
        sys.exit(f"error: some listed tests do not exist (exit {code}):\n{output[-3000:]}")
      print(f"All {len(selected)} mutations apply; their {len(tests)} test selections exist.")
      return
    if not args.no_baseline:
      print(f"Baseline: {len(tests)} test selections on the unmutated code...", flush=True)
      code, output = run_pytest(copy, tests, timeout=len(tests) * args.timeout)
      if code != 0:
        sys.exit(f"error: the selected tests fail without any mutation (exit {code}); fix "
                 f"that first:\n{output[-3000:]}")
    results = []
    for i, (module, m) in enumerate(selected, 1):
      print(f"[{i}/{len(selected)}] {module}/{m.name} ... ", end="", flush=True)
      result = mutate_and_test(copy, module, m, args.timeout)
      results.append(result)
      print(f"{result.outcome} ({result.detail + ', ' if result.detail else ''}"
            f"{result.seconds:.0f} s)", flush=True)
  finally:
    shutil.rmtree(copy, ignore_errors=True)
  print()
  print(summary(results))
  if args.markdown:
    print()
    print(markdown(results))


if __name__ == "__main__":
  main()
