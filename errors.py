"""The errors archlab reports to its user in one line.

Bad input is a `UserError`: a config field (`ConfigError`), a data file or corpus
(`DataError`), a checkpoint or workdir (`CheckpointError`). Its message is one line that names
the field, file or step, and the entry points (`train.py`, `experiments.*`) print it as
`PROGRAM: error: MESSAGE` without a traceback. Anything else that escapes is a bug: the entry
points print its traceback and ask for a report (`report_bug`).

They subclass ValueError, so `except ValueError` (and `pytest.raises(ValueError)`) still
catches them.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

class UserError(ValueError):
  """Bad input; the message is one line naming what is wrong."""


class ConfigError(UserError):
  """A config field (or a flag) has a value archlab cannot use."""


class DataError(UserError):
  """A corpus, data file or tokenizer cannot be read as configured."""


class CheckpointError(UserError):
  """A checkpoint or workdir cannot be used as asked (missing, damaged, another model)."""


class Preempted(Exception):
  """A run stopped on SIGTERM / SIGINT after writing a checkpoint (trainer/preemption.py);
  its message says how to resume. Entry points print it as `PROGRAM: preempted: MESSAGE` and
  exit with 75 (EX_TEMPFAIL), which a scheduler can requeue on."""
  exit_code = 75


def run_main(program: str, fn, *args, **kwargs):
  """`fn(*args, **kwargs)` as an entry point runs it: a `UserError` (or a FloatingPointError: a
  loss that turned NaN) exits with its one line, anything else with its traceback and
  `report_bug`'s line; `Preempted` exits with its line and code 75. `ARCHLAB_DEBUG=1` lets
  every exception through."""
  debug = bool(os.environ.get('ARCHLAB_DEBUG'))
  try:
    return fn(*args, **kwargs)
  except Preempted as e:
    print(f'{program}: preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(Preempted.exit_code)
  except (UserError, FloatingPointError) as e:
    if debug:
      raise
    sys.exit(f'{program}: error: {e}')
  except Exception as e:  # pylint: disable=broad-except
    if debug:
      raise
    sys.exit(report_bug(program, e))


def flags_parser(program: str, moved: dict[str, str] | None = None):
  """A `flags_parser` for `absl.app.run`: absl's parsing, with a bad flag or config field
  reported as one line (`flag_error_line`) instead of a traceback and the usage text."""

  def parse(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      if os.environ.get('ARCHLAB_DEBUG'):
        raise
      sys.exit(f'{program}: error: {flag_error_line(e, argv, moved)}')

  return parse


def report_bug(program: str, error: BaseException) -> str:
  """Prints `error`'s traceback to stderr and returns the line an entry point exits with."""
  traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
  return (f'{program}: internal error: {type(error).__name__}: '
          f'{str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"}\n'
          f'This is a bug in archlab, not in your input: please report it with the traceback '
          f'above and the command you ran.')


def flag_error_line(error: BaseException, argv: list[str], moved: dict[str, str] | None = None) -> str:
  """One line for an error absl or ml_collections raised while parsing flags.

  A `--config.a.b=...` override of a field the config lacks names the flag, the field and
  the suggestion ml_collections makes ("did you mean"); a field in `moved` (old dotted name ->
  new one) says the new spelling. Any other error keeps its flag and its last line.
  """
  missing = isinstance(error, (AttributeError, KeyError))
  while missing and error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps the KeyError in an AttributeError
  message = str(error.args[0]) if missing and error.args else str(error)
  if missing:
    field = (re.match(r'Key "([^"]+)" does not exist', message.strip())
             or re.match(r"""['"]?([^'"\s]+)['"]?""", message.strip()))
    field = field.group(1) if field else message.strip()
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    flag = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.')
                 and field in a.split('=')[0].split('.')), None)
    dotted = flag[len('--config.'):] if flag else field
    line = _moved_line(flag or f'--config.{dotted}', dotted, moved)
    if line:
      return line
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ''
    return f'{flag or "--config"}: the config has no field {field!r}{hint}'
  flag = re.match(r'flag (--config\.[\w.]+)=', message)
  line = flag and _moved_line(flag.group(1), flag.group(1)[len('--config.'):], moved)
  if line:
    return line
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0].split(": ")[0]}: {lines[-1]}'


def _moved_line(flag: str, dotted: str, moved: dict[str, str] | None) -> str | None:
  """'FLAG: the field moved: use --config.NEW' when `dotted` (or a field under it) moved."""
  for old, new in (moved or {}).items():
    if dotted == old:
      return f'{flag}: the field moved: use --config.{new}'
    if dotted.startswith(old + '.') and not new.startswith(old + '.'):
      return f'{flag}: the field moved: use --config.{new}{dotted[len(old):]}'
  return None
