"""The experiments' layout: DeiT and DETR are peers over `experiments.lib`.

As scenic keeps `train_lib/` apart from its projects, and a project never
imports another project's modules: `lib/` imports neither project, neither
project imports the other, and the two trainers share no run of code (what
they share lives in `lib/loop.py`).
"""

import ast
import pathlib

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
# Statements of at least this many lines, in a row, may not appear in both.
RUN = 6


def imported_modules(path: pathlib.Path):
  """Every module `path` imports, at any depth (lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return found


@pytest.mark.parametrize('package,forbidden', [
    ('lib', ('experiments.deit', 'experiments.detr',
             'experiments.benchmarks')),
    ('deit', ('experiments.detr', 'experiments.benchmarks')),
    ('detr', ('experiments.deit', 'experiments.benchmarks')),
])
def test_no_project_imports_another(package, forbidden):
  for path in sorted((EXPERIMENTS / package).rglob('*.py')):
    bad = sorted(m for m in imported_modules(path)
                 if m.startswith(forbidden))
    assert not bad, f'{path.relative_to(EXPERIMENTS)} imports {bad}'


def _code_lines(path: pathlib.Path):
  """The file's lines without comments, docstrings' insides or blanks."""
  lines = []
  for line in path.read_text().splitlines():
    text = line.split('#')[0].strip()
    if text:
      lines.append(text)
  return lines


def test_the_two_trainers_share_no_run_of_six_lines():
  deit = _code_lines(EXPERIMENTS / 'deit' / 'trainer.py')
  detr = _code_lines(EXPERIMENTS / 'detr' / 'trainer.py')
  runs = {tuple(deit[i:i + RUN]) for i in range(len(deit) - RUN + 1)}
  shared = [detr[i:i + RUN] for i in range(len(detr) - RUN + 1)
            if tuple(detr[i:i + RUN]) in runs]
  assert not shared, shared[0]
