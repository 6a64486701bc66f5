"""Every code block of README.md and of every page in docs/ runs as written.

Python blocks run each in a fresh namespace (so each must be
self-contained), in page order; bash blocks run with `bash -e` from the
repository root, `python` being this interpreter. A block that cannot run
here (it needs a download, ImageNet, or minutes) carries the HTML comment
`<!-- not-tested: REASON -->` on the line before it, and is listed, not run.
Blocks tagged `text` (or `bibtex`) are printed output, listings or
citations; MyST directives (`{toctree}`, `{eval-rst}`) are not code.
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
from typing import List, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
CODE = ('python', 'bash')
NOT_CODE = ('text', 'bibtex')  # output, listings, citations.
DIRECTIVE = re.compile(r'^\{[\w-]+\}$')  # MyST: {toctree}, {eval-rst}.
MARKER = re.compile(r'^<!--\s*not-tested:\s*(.*?)\s*-->$')


@dataclasses.dataclass
class Block:
  page: str             # relative to the repository root.
  line: int             # 1-based line of the opening fence.
  lang: str
  code: str
  not_tested: Optional[str]  # the marker's reason, if any.


  @property
  def where(self) -> str:
    return f'{self.page}:{self.line}'


def page_blocks(page: pathlib.Path) -> List[Block]:
  name = str(page.relative_to(REPO))
  blocks, lines = [], page.read_text().splitlines()
  i = 0
  while i < len(lines):
    fence = re.match(r'^```\s*(\{[\w-]+\}|[\w+-]*)\s*$', lines[i])
    if not fence:
      i += 1
      continue
    previous = next((l.strip() for l in reversed(lines[:i]) if l.strip()), '')
    marker = MARKER.match(previous)
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(
        '```'))
    blocks.append(Block(name, i + 1, fence.group(1),
                        '\n'.join(lines[i + 1:end]),
                        marker.group(1) if marker else None))
    i = end + 1
  return blocks


BLOCKS = [b for page in PAGES for b in page_blocks(page)]
RUN = [b for b in BLOCKS if b.lang in CODE and b.not_tested is None]


def test_every_block_is_known_code_or_output_and_skips_say_why():
  for block in BLOCKS:
    assert (block.lang in CODE + NOT_CODE or DIRECTIVE.match(block.lang)), (
        f'{block.where}: block language {block.lang!r} is none of '
        f'{CODE + NOT_CODE} nor a MyST directive (tag output as text)')
    if block.not_tested is not None:
      assert block.lang in CODE, (
          f'{block.where}: a not-tested marker on a non-code block')
      assert len(block.not_tested) >= 10, (
          f'{block.where}: say why the block is not tested')
  for page in PAGES:
    name = str(page.relative_to(REPO))
    assert page.read_text().count('not-tested:') == sum(
        b.not_tested is not None for b in BLOCKS if b.page == name), (
            f'{name}: a not-tested marker that is not right before a code '
            'block')
  assert [b for b in RUN if b.lang == 'python'], 'no Python block runs'
  assert {b.page for b in BLOCKS} >= {'README.md', 'docs/blockwise.md'}


@pytest.mark.parametrize('block', [b for b in RUN if b.lang == 'python'],
                         ids=lambda b: b.where)
def test_python_block_runs(block):
  code = compile(block.code, block.where, 'exec')
  exec(code, {'__name__': '__readme__'})  # pylint: disable=exec-used


@pytest.fixture(scope='module')
def python_on_path(tmp_path_factory):
  """A PATH whose `python` is this interpreter (with its packages)."""
  folder = tmp_path_factory.mktemp('bin')
  # A wrapper, not a symlink: a link to a venv's python outside the venv's
  # bin/ would start the base interpreter, without the venv's packages.
  wrapper = folder / 'python'
  wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  wrapper.chmod(0o755)
  return f'{folder}{os.pathsep}{os.environ["PATH"]}'


@pytest.mark.parametrize('block', [b for b in RUN if b.lang == 'bash'],
                         ids=lambda b: b.where)
def test_shell_block_runs(block, python_on_path):
  env = dict(os.environ, PATH=python_on_path)
  env.pop('XLA_FLAGS', None)  # as a user's shell: one CPU device.
  result = subprocess.run(['bash', '-e', '-c', block.code], cwd=REPO,
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, (
      f'{block.where} failed:\n{result.stdout}\n{result.stderr}')
