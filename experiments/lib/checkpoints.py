"""Checkpoints that cannot be poisoned: verified on restore, finite on save.

A run keeps, under `--workdir`:

  checkpoints/STEP/      the last `keep_checkpoints` states (orbax), each
                         with `SHA256SUMS` beside its files;
  best/STEP/             what the project keeps of its best evaluation
                         (DeiT: the params of the best top-1; DETR: params
                         and batch_stats of the best AP);
  rejected_checkpoints/  checkpoints a resume found damaged, set aside.

Saving refuses a state with a non-finite value, so NaNs can neither push a
good checkpoint out of the last N nor become `best/`. `SHA256SUMS` is
written once orbax has finalised the step (the format of `sha256sum`, so
`cd checkpoints/STEP && sha256sum -c SHA256SUMS` checks it by hand).
Restoring takes the newest checkpoint whose files match their sums, that
orbax restores, whose step is the one of its folder and whose values are all
finite; newer ones that fail are logged with the reason and moved to
`rejected_checkpoints/`, so that the run saves those steps afresh. Only when
no checkpoint passes does the resume stop, naming each one and why.
"""

import hashlib
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS = 'SHA256SUMS'


class DamagedCheckpointError(ValueError):
  """A checkpoint that does not restore or does not verify."""


class UnwritableWorkdirError(ValueError):
  """The run's folder cannot be created or written."""


def check_writable(workdir: str) -> None:
  """Fails now, not at the first save, if `workdir` cannot be written.

  Args:
    workdir: the run's folder; created if missing.

  Raises:
    UnwritableWorkdirError: naming the folder and the system's reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    handle, probe = tempfile.mkstemp(prefix='.write_probe_', dir=workdir)
    os.close(handle)
    os.remove(probe)
  except OSError as e:
    raise UnwritableWorkdirError(
        f'--workdir {workdir!r} is not writable ({e.strerror or e}): '
        'checkpoints and metrics go there. Choose another folder or fix its '
        'permissions.') from e


def file_digests(directory: str) -> Dict[str, str]:
  """`{relative path: sha256 hex}` of every file under `directory`."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative == CHECKSUMS or relative.startswith(CHECKSUMS + '.'):
        continue
      sha = hashlib.sha256()
      with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          sha.update(chunk)
      digests[relative] = sha.hexdigest()
  return digests


def write_checksums(directory: str) -> None:
  """Writes `directory/SHA256SUMS` (atomically) for the files in it."""
  lines = [f'{digest}  {path}\n'
           for path, digest in sorted(file_digests(directory).items())]
  tmp = os.path.join(directory, CHECKSUMS + '.tmp')
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, os.path.join(directory, CHECKSUMS))


def verify_checksums(directory: str) -> bool:
  """Checks the files of `directory` against its `SHA256SUMS`.

  Returns:
    True if they match; False if there is no `SHA256SUMS` (a checkpoint
    saved without one, or by a run stopped between the save and the sums).

  Raises:
    DamagedCheckpointError: a file is missing, extra or differs, or the
      sums themselves are unreadable.
  """
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.isdir(directory):
    raise DamagedCheckpointError(f'{directory} is not a folder')
  if not os.listdir(directory):
    raise DamagedCheckpointError('the step folder is empty')
  if not os.path.exists(path):
    return False
  expected = {}
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      digest, sep, name = raw.decode('utf-8', 'replace').rstrip('\n').partition(
          '  ')
      if not sep or len(digest) != 64 or not name:
        raise DamagedCheckpointError(f'{CHECKSUMS} line {number} is garbled')
      expected[name] = digest
  actual = file_digests(directory)
  problems = [f'{name} is missing' for name in sorted(set(expected) -
                                                      set(actual))]
  problems += [f'{name} was not saved with it'
               for name in sorted(set(actual) - set(expected))]
  problems += [f'{name} differs from its checksum'
               for name in sorted(set(actual) & set(expected))
               if actual[name] != expected[name]]
  if problems:
    raise DamagedCheckpointError('; '.join(problems[:3]) + (
        f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''))
  return True


@jax.jit
def _finite_leaves(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(
          x.dtype, jnp.inexact) else jnp.asarray(True), tree)


def nonfinite_leaves(tree: Any) -> List[str]:
  """Paths (`a/b/c`) of the leaves of `tree` holding an inf or a NaN."""
  flags = jax.device_get(_finite_leaves(tree))
  return [_path_name(path)
          for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
          if not ok]


def _describe(error: Exception) -> str:
  text = ' '.join(str(error).split())
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(error).__name__}: {text}' if not isinstance(
      error, DamagedCheckpointError) else text


def _check_finite(tree: Any) -> None:
  """Raises `DamagedCheckpointError` naming the leaves that are not finite."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise DamagedCheckpointError(
        f'non-finite values in {", ".join(bad[:3])}'
        + (f' and {len(bad) - 3} more' if len(bad) > 3 else ''))


def _tree_metadata(state_dir: str) -> Any:
  """The saved tree's metadata (shapes, dtypes) of a step's `state/`."""
  metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
  # orbax's step metadata wraps the tree in newer versions.
  metadata = getattr(metadata, 'item_metadata', metadata)
  return getattr(metadata, 'tree', metadata)


class Checkpoints:
  """The checkpoints of one run (see the module docstring).

  Args:
    workdir: the run's folder.
    keep: how many of the latest states to keep.
    async_save: save while training goes on (orbax's async checkpointing);
      the sums of a step are then written when the next save or `close`
      finds it finished.
    best_metric: the eval metric whose highest value `best/` keeps.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool,
               best_metric: str = 'top1'):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.best_directory = os.path.abspath(os.path.join(workdir, 'best'))
    self.rejected_directory = os.path.abspath(
        os.path.join(workdir, 'rejected_checkpoints'))
    self.latest = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))
    self.best = ocp.CheckpointManager(
        self.best_directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[best_metric],
            best_mode='max', enable_async_checkpointing=async_save))
    self._async = async_save
    self._unsummed: List[str] = []

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None."""
    return self.latest.latest_step()

  # --- Restore ---------------------------------------------------------------

  def restore(self, target: Any) -> Optional[Any]:
    """The state of the newest checkpoint that restores and verifies.

    Its data position (saved beside the state) must equal its step: the
    input stream resumes at `state['step']`.

    Args:
      target: a state of the run's structure, shardings and dtypes.

    Returns:
      The restored state, or None if there is no checkpoint.

    Raises:
      DamagedCheckpointError: there are checkpoints, and none passes.
    """
    rejected: Dict[int, str] = {}
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state = self._restore_step(step, target)
      except (DamagedCheckpointError, OSError) as e:
        rejected[step] = _describe(e)
        logging.warning('Skipping checkpoint %d of %s: %s', step,
                        self.directory, rejected[step])
        continue
      if rejected:
        self._set_aside(rejected)
        logging.warning('Resumed from checkpoint %d instead of the newer, '
                        'damaged %s (moved to %s).', step,
                        sorted(rejected, reverse=True),
                        self.rejected_directory)
      return state
    if rejected:
      raise DamagedCheckpointError(
          f'No checkpoint in {self.directory} restores: ' + '; '.join(
              f'step {s}: {r}' for s, r in sorted(rejected.items(),
                                                  reverse=True)) +
          '. Move the folder away to start the run afresh.')
    return None

  def _check_same_model(self, step: int, target: Any) -> None:
    """Raises if checkpoint `step` holds other params than `target`'s.

    A resume with the config of another model is a mistake in the command,
    not damage: it must neither pass for damage (and set good checkpoints
    aside) nor be advised to start afresh. Called once the step's files
    match their sums, so that damaged metadata cannot pass for another
    model; unreadable metadata is left to the restore, which reports it.
    """
    try:
      saved = _tree_metadata(
          os.path.join(self.directory, str(step), 'state'))['params']
    except Exception:  # pylint: disable=broad-except
      return
    problem = misfit(saved, target['params'])
    if problem:
      raise ValueError(
          f'Checkpoint {step} of {self.directory} holds another model than '
          f'the config: it {problem}. Resume with the config of the run, or '
          'give a new --workdir.')

  def _restore_step(self, step: int, target: Any) -> Any:
    folder = os.path.join(self.directory, str(step))
    verified = verify_checksums(folder)
    if verified:
      self._check_same_model(step, target)
    try:
      restored = self.latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore()))
      state, data_position = restored.state, restored.data['data_position']
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise bare `Exception`s for unreadable files.
      raise DamagedCheckpointError(
          f'orbax cannot restore it ({_describe(e)})') from e
    if int(state['step']) != step or data_position != step:
      raise DamagedCheckpointError(
          f'holds step {int(state["step"])} and data position '
          f'{data_position}, not {step}')
    _check_finite(state)
    if not verified:
      logging.warning('Checkpoint %d has no %s (saved before checksums, or '
                      'stopped between its save and its sums): it restores '
                      'and its values are finite, so it is used unverified.',
                      step, CHECKSUMS)
    logging.info('Restored checkpoint %d of %s.', step, self.directory)
    return state

  def _set_aside(self, rejected: Dict[int, str]) -> None:
    """Moves rejected steps out of orbax's sight; process 0, all waiting."""
    multihost_utils.sync_global_devices('checkpoints: chose a step')
    if jax.process_index() == 0:
      os.makedirs(self.rejected_directory, exist_ok=True)
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step, reason in rejected.items():
        target = os.path.join(self.rejected_directory, f'{step}-{stamp}')
        os.replace(os.path.join(self.directory, str(step)), target)
        with open(target + '.reason.txt', 'w') as f:
          f.write(reason + '\n')
    multihost_utils.sync_global_devices('checkpoints: set aside')
    self.latest.reload()

  # --- Save ------------------------------------------------------------------

  def save(self, step: int, state: Any) -> None:
    """Saves `state` as checkpoint `step`, whose data position is `step`.

    Raises:
      FloatingPointError: `state` holds a non-finite value; nothing is saved.
    """
    bad = nonfinite_leaves(state)
    if bad:
      raise FloatingPointError(
          f'Refusing to save step {step}: non-finite values in '
          f'{", ".join(bad[:3])}. The last checkpoints stay as they are.')
    self._finish_pending()
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'data_position': step})), force=True)
    self._unsummed.append(os.path.join(self.directory, str(step)))
    if not self._async:
      self._finish_pending()

  def save_best(self, step: int, params: Any,
                metrics: Dict[str, float]) -> bool:
    """Offers `params` with eval `metrics` as the best; orbax keeps the best.

    Returns:
      False, and saves nothing, if `params` or `metrics` are not finite.
    """
    bad = nonfinite_leaves(params)
    if bad or not all(np.isfinite(v) for v in metrics.values()):
      logging.warning('Step %d is not a candidate for best/: non-finite %s.',
                      step, ', '.join(bad[:3]) or f'eval metrics {metrics}')
      return False
    self._finish_pending()
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(params)), metrics=metrics, force=True)
    self._unsummed.append(os.path.join(self.best_directory, str(step)))
    if not self._async:
      self._finish_pending()
    return True

  def _finish_pending(self) -> None:
    """Waits for saves in flight, then writes the sums of finished steps."""
    if not self._unsummed:
      return
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    if jax.process_index() == 0:
      for folder in self._unsummed:
        if os.path.isdir(folder):  # not already pushed out by max_to_keep.
          write_checksums(folder)
    self._unsummed = []

  def close(self) -> None:
    self._finish_pending()
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


# --- Reading a run without touching it -------------------------------------


def _steps_of(directory: str) -> List[int]:
  """The finished steps of a checkpoint folder, newest first."""
  steps = []
  for name in os.listdir(directory):
    if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
      steps.append(int(name))
  return sorted(steps, reverse=True)


def _read_step(directory: str, step: int) -> Any:
  """The saved state of one step as numpy arrays, verified and finite.

  Read as saved, with no target: the device count of the run does not
  matter, and nothing is dropped (the caller compares it with its model).
  """
  folder = os.path.join(directory, str(step))
  verified = verify_checksums(folder)
  try:
    path = os.path.join(folder, 'state')
    metadata = _tree_metadata(path)
    tree = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)))
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpointError(
        f'orbax cannot restore it ({_describe(e)})') from e
  _check_finite(tree)
  if not verified:
    logging.warning('%s has no %s: it restores and its values are finite, '
                    'so it is used unverified.', folder, CHECKSUMS)
  return tree


def read_run(workdir: str, sources: Sequence[str] = ('best', 'checkpoints')
             ) -> Tuple[Any, str]:
  """The saved tree of a run's newest good checkpoint, the run left as it is.

  For evaluation: nothing is created, moved or written under `workdir`.
  `best/` (its saved params) is tried first, then `checkpoints/` (the whole
  state), each newest step first; a step that fails its checksums, does not
  restore or holds a non-finite value is skipped with a warning naming it
  and why. The tree comes back as it was saved (no target, so no partial
  restore): the caller checks it against its model (`match_params`).

  Args:
    workdir: a run's folder.
    sources: its checkpoint folders to try, in order.

  Returns:
    `(tree, description)`: `tree` as saved, in numpy arrays (params for
    `best/`, the train state for `checkpoints/`), `description` e.g.
    `'best/1200'` or `'checkpoints/1400 (skipped best/1200: ...)'`.

  Raises:
    ValueError: `workdir` holds no checkpoint.
    DamagedCheckpointError: it holds some, and none passes.
  """
  skipped: List[str] = []
  for sub in sources:
    directory = os.path.abspath(os.path.join(workdir, sub))
    if not os.path.isdir(directory):
      continue
    for step in _steps_of(directory):
      try:
        tree = _read_step(directory, step)
      except (DamagedCheckpointError, OSError) as e:
        skipped.append(f'{sub}/{step}: {_describe(e)}')
        logging.warning('Skipping %s/%d of %s: %s', sub, step, workdir,
                        _describe(e))
        continue
      name = f'{sub}/{step}'
      if skipped:
        name += f' (skipped the damaged {"; ".join(skipped)})'
      return tree, name
  if skipped:
    raise DamagedCheckpointError(
        f'No checkpoint of {workdir} restores: {"; ".join(skipped)}.')
  raise ValueError(f'{workdir!r} holds no checkpoint: no step folder under '
                   f'{" or ".join(s + "/" for s in sources)}.')


def _path_name(path: Tuple[Any, ...]) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(
      k, 'name', k)))) for k in path)


def _flat(tree: Any) -> Dict[str, Any]:
  return {_path_name(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape(leaf: Any) -> Tuple[int, ...]:
  # Arrays, ShapeDtypeStructs and orbax's ArrayMetadata all have `.shape`.
  return tuple(getattr(leaf, 'shape', np.shape(leaf)))


def misfit(saved: Any, expected: Any) -> Optional[str]:
  """How the tree `saved` differs from `expected` in names and shapes, or None.

  Names every parameter missing from `saved`, every one `expected` lacks,
  and every one whose shape differs.
  """
  have, want = _flat(saved), _flat(expected)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(want) & set(have)
                  if _shape(have[k]) != _shape(want[k]))
  parts = []
  if missing:
    parts.append(f'lacks {len(missing)} the model has ({", ".join(missing)})')
  if extra:
    parts.append(f'holds {len(extra)} the model has not ({", ".join(extra)})')
  if shapes:
    parts.append(f'{len(shapes)} differ in shape (' + ', '.join(
        f"{k} {_shape(have[k])} vs the model's {_shape(want[k])}"
        for k in shapes) + ')')
  return '; '.join(parts) or None


def match_params(saved: Any, expected: Any, where: str) -> Any:
  """`saved` in the structure of `expected`, or an error naming every misfit.

  Args:
    saved: a tree as restored (nested dicts of arrays).
    expected: the model's tree (arrays or `jax.ShapeDtypeStruct`s).
    where: what `saved` is, for the message (e.g. 'run/best/1200').

  Returns:
    `expected`'s structure with the saved values, cast to its dtypes.

  Raises:
    ValueError: naming every parameter missing from `saved`, every one the
      model does not have, and every one whose shape differs.
  """
  problem = misfit(saved, expected)
  if problem:
    raise ValueError(f'{where} does not fit the model: it {problem}. Is the '
                     'config the one of the run?')
  have = _flat(saved)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  return jax.tree_util.tree_unflatten(treedef, [
      np.asarray(have[_path_name(path)], leaf.dtype) for path, leaf in leaves])
