"""What every command line of the experiments does with a user's mistake.

A mistake the program can name (a bad flag or config value, a file that is
missing or damaged, a run that cannot go on) ends in one line on stderr,
`error: ...`, and exit status 1; with `--log_level=debug` the same error
keeps its traceback. Anything else is a bug and always shows its traceback.

`run_with_config` is `absl.app.run` for the programs that take an
`ml_collections` config (`--config FILE[:ARG]` with `--config.KEY=VALUE`
overrides): the config file is loaded and every override key checked before
absl parses the flags, so that a typo is one line naming the nearest key
rather than three tracebacks from inside ml_collections.

Every command spells its flags alike: `--config` (with `--config.KEY=V`),
`--workdir`, `--checkpoint`, `--log_level`, and for a pod `--distributed`
or `--coordinator_address`, `--num_processes`, `--process_id`
(`define_run_flags`, `define_log_level_flag`); words joined by `_`.
`configure_logging` gives every command the same log lines: the program's
own from `--log_level` on, the libraries' only from warning on.
"""

import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import sys
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence
from typing import Tuple

from absl import flags
from absl import logging
import tqdm

# Errors that describe the user's input or the run's state, not a bug here.
# (KeyError and AttributeError stay out: raised by our code they are bugs.)
EXPECTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError,
                   MemoryError)

LOG_LEVELS = ('debug', 'info', 'warning', 'error')


def define_log_level_flag(flag_values: flags.FlagValues = flags.FLAGS
                          ) -> None:
  """`--log_level`, which every command takes."""
  flags.DEFINE_enum(
      'log_level', 'info', LOG_LEVELS, "Lowest level of this program's log "
      'lines. The libraries (jax, orbax, grain, tfds, absl) log only '
      'warnings and errors, or everything at debug; debug also keeps the '
      'traceback of an error.', flag_values=flag_values)


def define_config_flag(help_text: str, required: bool = True,
                       flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`--config FILE[:ARG]`, overridable with `--config.KEY=VALUE`."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, help_text,
                                  flag_values=flag_values)
  if required:
    flags.mark_flag_as_required('config', flag_values=flag_values)


class Command:
  """The absl flags of one command, parsed from a list of arguments.

  For the commands that are not a training run (evaluate, predict, demos,
  benchmarks, dataset makers): their flags live in their own `FlagValues`,
  so that `main(argv)` can be called again and again (from tests, or one
  program from another) and two commands never clash in one process. Every
  command gets `--log_level` and `--help`; a flag it does not know, a bad
  value or a missing required flag is one line, `error: ...`, exit status 1.

  Args:
    prog: how the command is run, for `--help`.
    doc: its docstring, printed by `--help` above the flags.
    positional: its positional arguments, `(name, count)` pairs: count 1
      for one value, '+' for one or more (the last pair only).
    config: give it `--config FILE[:ARG]` (not required) with
      `--config.KEY=VALUE` overrides, whose keys are checked first; the
      text is the flag's help.
  """

  def __init__(self, prog: str, doc: str,
               positional: Sequence[Tuple[str, Any]] = (),
               config: Optional[str] = None):
    self.prog, self.doc, self.positional = prog, doc, tuple(positional)
    self.flags = flags.FlagValues()
    self._config = config is not None
    if config is not None:
      define_config_flag(config, required=False, flag_values=self.flags)
    define_log_level_flag(self.flags)

  def usage(self) -> str:
    args = ''.join(f' {n.upper()}' + (f' [{n.upper()} ...]' if k == '+'
                                       else '')
                   for n, k in self.positional)
    return (f'usage: {self.prog} [flags]{args}\n\n{self.doc.strip()}\n\n'
            f'flags:\n{self.flags.get_help()}')

  def parse(self, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Sets the flags from `argv` (`sys.argv[1:]` if None), defaults first.

    Returns:
      The positional arguments by name (a list for a '+' one).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if any(a in ('-h', '--help', '--helpfull', '--helpshort') for a in argv):
      print(self.usage())
      sys.exit(0)
    with one_line_errors(debug_requested(argv)):
      spec = flag_value(argv, 'config') if self._config else None
      if spec:
        check_override_keys(argv, load_config(spec), spec)
    self.flags.unparse_flags()
    try:
      rest = self.flags([self.prog] + argv)[1:]
    except Exception as e:  # pylint: disable=broad-except
      # absl's flags.Error, and what a config flag's parser raises.
      if debug_requested(argv):
        raise
      sys.exit(f'error: {one_line(e)}')
    named = {}
    for name, count in self.positional:
      if not rest:
        sys.exit(f'error: {self.prog} needs {name.upper()}; see --help.')
      named[name], rest = (rest, []) if count == '+' else (rest[0], rest[1:])
    if rest:
      sys.exit(f'error: {self.prog} got arguments it does not take: {rest}; '
               'see --help.')
    return named

  def namespace(self, argv: Optional[Sequence[str]] = None
                ) -> types.SimpleNamespace:
    """`parse`, then every flag and positional argument as attributes."""
    named = self.parse(argv)
    return types.SimpleNamespace(**self.flags.flag_values_dict(), **named)

  def run(self, program: Callable[..., Any],
          argv: Optional[Sequence[str]] = None) -> Any:
    """`program(**positional)` with the flags of `argv`, errors one line.

    Logging is configured by `--log_level` first (`configure_logging`).
    """
    named = self.parse(argv)
    configure_logging(self.flags.log_level)
    with one_line_errors(self.flags.log_level == 'debug'):
      return program(**named)


def usage_error(message: str) -> None:
  """Ends a command whose flags do not fit together: `error: ...`, exit 1."""
  sys.stdout.flush()
  sys.exit(f'error: {message}')


def define_run_flags(config_help: str) -> None:
  """The flags of a training command: config, workdir, pod, log level.

  Defined by the command (in its `if __name__ == '__main__'`), never at
  import, so that one process can import every project's trainer.
  """
  define_config_flag(config_help)
  flags.DEFINE_string(
      'workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard logs: a '
      'local path, or on a pod one every host sees (NFS, gcsfuse).')
  flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0, for a '
      'multi-host run outside a managed cluster (Cloud TPU and SLURM need '
      'none).')
  flags.DEFINE_integer('num_processes', None, 'Processes of a multi-host '
                       'run (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'Index of this process (with '
                       '--coordinator_address).')
  flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize() with '
      'automatic cluster detection (Cloud TPU pods, SLURM).')
  define_log_level_flag()
  flags.mark_flag_as_required('workdir')


def initialize_from_flags() -> None:
  """Logging and (for a pod) `jax.distributed`, as `define_run_flags` asked."""
  from experiments.lib import loop  # pylint: disable=g-import-not-at-top
  configure_logging(flags.FLAGS.log_level)
  loop.initialize_distributed(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
      flags.FLAGS.process_id, flags.FLAGS.distributed)


# Log records from files under this folder are the program's own; all
# others are the libraries'.
_OWN_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _TqdmHandler(std_logging.Handler):
  """One line per record, written above the progress bar (`tqdm.write`)."""

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def configure_logging(level: str = 'info') -> std_logging.Handler:
  """Routes all log records through one filtered, bar-safe handler.

  The program's own records (from `experiments/`) show from `level` on;
  the libraries' (orbax, jax, grain, tfds, absl) from warning on, or all
  of them at 'debug'. Each record is one `HH:MM:SS LEVEL message` line
  written with `tqdm.write`, so a progress bar stays whole below it.

  Args:
    level: one of `LOG_LEVELS`.

  Returns:
    The installed handler (the root logger's only one).
  """
  if level not in LOG_LEVELS:
    raise ValueError(f'log level {level!r}; expected one of {LOG_LEVELS}.')
  own = getattr(std_logging, level.upper())
  others = std_logging.DEBUG if level == 'debug' else max(own,
                                                          std_logging.WARNING)

  def keep(record: std_logging.LogRecord) -> bool:
    mine = os.path.abspath(record.pathname).startswith(_OWN_CODE)
    return record.levelno >= (own if mine else others)

  handler = _TqdmHandler()
  handler.addFilter(keep)
  handler.setFormatter(std_logging.Formatter(
      '%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S'))
  root = std_logging.getLogger()
  for old in list(root.handlers):
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(min(own, others))
  # absl's logger (orbax, grain and this program log through it) passes
  # everything to the handler, which decides.
  logging.set_verbosity(min(own, others))
  std_logging.captureWarnings(True)
  return handler


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (its type if it has none)."""
  text = ' '.join(str(error).split())
  if isinstance(error, OSError) and error.filename and (
      str(error.filename) not in text):
    text = f'{error.filename}: {text}'
  return text or type(error).__name__


def debug_requested(argv: Sequence[str]) -> bool:
  """Whether `argv` asks for `--log_level=debug` (read before flags parse)."""
  for i, arg in enumerate(argv):
    if arg in ('--log_level=debug', '--log-level=debug'):
      return True
    if arg in ('--log_level', '--log-level') and i + 1 < len(argv):
      if argv[i + 1] == 'debug':
        return True
  return False


@contextlib.contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
  """Turns an expected error into `error: MESSAGE` and exit status 1.

  Args:
    debug: re-raise instead, so that the traceback shows.
  """
  try:
    yield
  except EXPECTED_ERRORS as e:
    if debug:
      raise
    sys.stdout.flush()
    sys.exit(f'error: {one_line(e)}')


def load_config(spec: str) -> Any:
  """`get_config([ARG])` of a config file given as `FILE[:ARG]`.

  Raises:
    ValueError: the file does not exist or has no `get_config`.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config {spec!r}: no such file {path!r}.')
  module_spec = importlib.util.spec_from_file_location('_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'--config {spec!r}: {path} defines no get_config().')
  return module.get_config(arg) if arg else module.get_config()


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--NAME=V` or `--NAME V` in `argv` (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == '--':
      break
    if arg.startswith(f'--{name}='):
      value = arg[len(name) + 3:]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_paths(config: Any, prefix: str = '') -> List[str]:
  """Every dotted key of `config`: its leaves and the sections above them."""
  paths = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    paths.append(name)
    if hasattr(value, 'items'):
      paths += config_paths(value, name + '.')
  return paths


def nearest(key: str, known: Sequence[str]) -> Optional[str]:
  """The known key most like `key` (its last part weighs most), or None."""
  last = key.rsplit('.', 1)[-1]
  by_last = {k.rsplit('.', 1)[-1]: k for k in known}
  for candidates, word in ((known, key), (list(by_last), last)):
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if match:
      return match[0] if candidates is known else by_last[match[0]]
  return None


def check_override_keys(argv: Sequence[str], config: Any, spec: str,
                        flag: str = 'config') -> None:
  """Every `--config.KEY=...` of `argv` names a key of `config`.

  Raises:
    ValueError: naming the first unknown key and the nearest known one.
  """
  known = config_paths(config)
  for arg in argv:
    if arg == '--':
      break
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].partition('=')[0]
    if key in known:
      continue
    parent = key.rpartition('.')[0]
    if parent and parent in known and config_value(config, parent) is None:
      continue  # a placeholder section (e.g. rpe=None) given a field.
    guess = nearest(key, known)
    hint = f'; did you mean --{flag}.{guess}?' if guess else ''
    raise ValueError(f'--{flag}.{key}: the config {spec} has no key '
                     f'{key!r}{hint}')


def config_value(config: Any, dotted: str) -> Any:
  for part in dotted.split('.'):
    config = config[part]
  return config


def run_with_config(main: Callable[[List[str]], Any],
                    flag: str = 'config') -> None:
  """`absl.app.run(main)`, the config and its overrides checked first.

  The config file of `--FLAG` is loaded once here: a missing file, a
  `get_config` that raises or an override key it lacks ends in one line
  before absl parses the flags. `main` runs inside `one_line_errors`.

  Args:
    main: the program, called with the remaining arguments.
    flag: the name of the config flag.
  """
  from absl import app  # pylint: disable=g-import-not-at-top

  debug = debug_requested(sys.argv)

  def parse(argv: List[str]) -> List[str]:
    with one_line_errors(debug):
      spec = flag_value(argv, flag)
      if spec and not any(a in ('--help', '--helpfull', '--helpshort', '-h')
                          for a in argv):
        check_override_keys(argv, load_config(spec), spec, flag)
      try:
        return app.parse_flags_with_usage(argv)
      except Exception as e:  # pylint: disable=broad-except
        # Whatever a flag's parser raises (ml_collections raises bare
        # AttributeErrors and KeyErrors) is about the command line.
        if debug:
          raise
        sys.exit(f'error: {one_line(e)}')

  def checked_main(argv: List[str]) -> Any:
    with one_line_errors(debug):
      return main(argv)

  app.run(checked_main, flags_parser=parse)
