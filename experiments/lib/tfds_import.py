"""tensorflow_datasets, imported once its undeclared dependencies are found."""

import importlib.util


def import_tfds():
  """`tensorflow_datasets`, after checking what it imports but does not declare.

  tensorflow-datasets imports `importlib_resources` whenever it prepares a
  dataset (`DatasetBuilder.code_path`) but lists it as a dependency only on
  Python < 3.9; without it the first `tfds.data_source` of an unprepared
  dataset fails deep inside tfds.

  Raises:
    ImportError: naming the missing package and how to install it.
  """
  for module, package in (('importlib_resources', 'importlib_resources'),
                          ('array_record', 'array_record')):
    if importlib.util.find_spec(module) is None:
      raise ImportError(
          f'The tfds data path needs the {package!r} package, which '
          f'tensorflow-datasets imports without installing it: pip install '
          f'{package} (or pip install "irpe_jax[experiments]").')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
