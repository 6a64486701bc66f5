"""The wheel as a user installs it: `irpe_jax` only, and it runs on its own.

The wheel is built offline (`python -m build --no-isolation`, from a copy of
the files it is made of) and installed with `pip --no-deps --no-index` into
a fresh venv. That venv reuses this interpreter's installed dependencies
through a path entry (a `.pth` line adds a directory but runs none of the
`.pth` files in it, so the editable install of the repository is not seen),
and the README's Flax example then runs there from an empty folder.
"""

import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ('irpe_jax', 'setup.cfg', 'pyproject.toml', 'README.md', 'LICENSE')


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, check=False,
                          timeout=300, **kwargs)
  assert result.returncode == 0, (
      f'{" ".join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  source = tmp_path_factory.mktemp('source')
  for name in SOURCES:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name,
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(REPO / name, source / name)
  out = tmp_path_factory.mktemp('dist')
  _run([sys.executable, '-m', 'build', '--wheel', '--no-isolation',
        '--outdir', str(out), str(source)])
  (path,) = out.glob('irpe_jax-*.whl')
  return path


def test_wheel_holds_irpe_jax_only_with_py_typed(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split('/')[0] for n in names}
  assert {t for t in top if not t.endswith('.dist-info')} == {'irpe_jax'}
  assert 'irpe_jax/py.typed' in names
  assert not [n for n in names if n.startswith(('experiments', 'tests'))]


def test_version_is_in_one_place(wheel):
  init = (REPO / 'irpe_jax' / '__init__.py').read_text()
  (version,) = re.findall(r"^__version__ = '([^']+)'$", init, re.M)
  assert wheel.name.startswith(f'irpe_jax-{version}-')
  assert 'version = attr: irpe_jax.__version__' in (
      REPO / 'setup.cfg').read_text()


def _readme_flax_example():
  text = (REPO / 'README.md').read_text()
  blocks = re.findall(r'^```python\n(.*?)^```', text, re.M | re.S)
  (block,) = [b for b in blocks if 'irpe_jax.IRPEAttention(num_heads=6' in b
              and 'nnx' not in b]
  return block


def test_wheel_runs_the_readme_example_in_a_fresh_venv(wheel, tmp_path):
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
  python = venv / 'bin' / 'python'
  purelib = _run([str(python), '-c',
                  'import sysconfig; print(sysconfig.get_path("purelib"))']
                 ).stdout.strip()
  # The dependencies (jax, flax, ...) from this interpreter's site-packages,
  # after the venv's own: the editable finder there is never started.
  dependencies = [p for p in site.getsitepackages() if os.path.isdir(p)]
  pathlib.Path(purelib, '_dependencies.pth').write_text(
      '\n'.join(dependencies) + '\n')
  _run([sys.executable, '-m', 'pip', '--python', str(python), 'install',
        '--quiet', '--no-deps', '--no-index', str(wheel)])
  script = tmp_path / 'example.py'
  script.write_text(_readme_flax_example() + (
      '\nimport importlib.util\n'
      'print(irpe_jax.__file__)\n'
      'print(y.shape)\n'
      'print(importlib.util.find_spec("experiments"))\n'))
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'XLA_FLAGS')}
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = _run([str(python), str(script)], cwd=empty, env=env).stdout.split(
      '\n')
  location, shape, experiments = out[-4:-1]
  assert pathlib.Path(location).resolve().is_relative_to(venv.resolve()), (
      location)
  assert shape == '(2, 197, 384)'
  assert experiments == 'None'
