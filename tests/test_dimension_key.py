"""The dimension key: written once in models/__init__.py's docstring, followed under models/.

Reads source files only (nothing is imported or run). Every name whose last `_`-part holds an
uppercase letter (after a part with a lowercase one, so CONSTANTS like `GPT_OSS` are not
suffixes) must end in key letters or `1` (a broadcast axis); so must every einsum subscript
string. Lowercase-only endings (`inv_freq_h`) cannot be told from words (`k_b`, `dtype_of`)
and are not checked.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / 'models'

_KEY_LINE = re.compile(r'^    (\S+) (\S.*)$')  # a letter and its meaning, under a group
_GROUP_LINE = re.compile(r'^  (\S.*):$')        # 'Attention:' etc.
_WORD = re.compile(r'\b\w+\b')


def parse_key(docstring: str) -> list[tuple[str, str, str]]:
  """(group, letter, meaning) for each entry of the docstring's `Dimension key.` paragraph.

  Raises ValueError for an entry that is not one uppercase letter, for a letter listed twice,
  or when there is no key.
  """
  lines = docstring.splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('Dimension key.')]
  if not starts:
    raise ValueError('no "Dimension key." paragraph')
  entries, group, seen = [], None, {}
  for line in lines[starts[0] + 1:]:
    if _GROUP_LINE.match(line):
      group = _GROUP_LINE.match(line).group(1)
      continue
    m = _KEY_LINE.match(line)
    if group is None or (not m and not line.startswith('      ')):  # prose, or the key's end
      if entries and not line.strip():
        break
      continue
    if not m:  # a meaning's continuation line
      continue
    letter, meaning = m.groups()
    if not re.fullmatch('[A-Z]', letter):
      raise ValueError(f'key entry {letter!r} ({meaning}) is not one uppercase letter')
    if letter in seen:
      raise ValueError(f'{letter} is listed twice in the key: {seen[letter]!r} and {meaning!r}')
    seen[letter] = meaning
    entries.append((group, letter, meaning))
  if not entries:
    raise ValueError('the "Dimension key." paragraph lists no letters')
  return entries


def key_letters() -> set[str]:
  docstring = ast.get_docstring(ast.parse((MODELS / '__init__.py').read_text()))
  return {letter for _, letter, _ in parse_key(docstring)}


def bad_suffix(suffix: str, letters: set[str]) -> str | None:
  """Why `suffix` (the dimensions a name ends with) breaks the key, or None."""
  for char in suffix:
    if char.islower():
      return f'lowercase {char!r}'
    if char.isdigit() and char != '1':
      return f'digit {char!r} (only 1, a broadcast axis)'
    if char.isupper() and char not in letters:
      return f'{char!r} is not in the key'
  return None


def bad_names(source: str, letters: set[str]) -> list[str]:
  """'line: name (why)' for each name in `source` (code, strings, comments) whose dimension
  suffix breaks the key."""
  problems = []
  for number, line in enumerate(source.splitlines(), 1):
    for word in _WORD.findall(line):
      if '_' not in word.strip('_'):
        continue
      prefix, suffix = word.rsplit('_', 1)
      if not re.search('[a-z]', prefix) or not re.search('[A-Z]', suffix):
        continue  # a CONSTANT, or no dimension suffix
      why = bad_suffix(suffix, letters)
      if why:
        problems.append(f'{number}: {word} ({why})')
  return problems


def bad_einsums(source: str, letters: set[str]) -> list[str]:
  """'line: subscripts (why)' for each einsum call whose literal subscripts break the key."""
  problems = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call) or not node.args:
      continue
    name = getattr(node.func, 'attr', None) or getattr(node.func, 'id', None)
    spec = node.args[0]
    if name != 'einsum' or not (isinstance(spec, ast.Constant) and isinstance(spec.value, str)):
      continue
    why = bad_suffix(re.sub(r'[\s,.>-]', '', spec.value), letters)
    if why:
      problems.append(f'{node.lineno}: {spec.value!r} ({why})')
  return problems


def _sources():
  return sorted(MODELS.rglob('*.py'))


def test_the_key_lists_each_letter_once_in_its_groups():
  docstring = ast.get_docstring(ast.parse((MODELS / '__init__.py').read_text()))
  entries = parse_key(docstring)
  groups = {group for group, _, _ in entries}
  assert groups == {'Every array', 'Attention', 'MLP and MoE', 'Reserved for the sublayers to come'}
  letters = [letter for _, letter, _ in entries]
  assert len(letters) == len(set(letters))
  # The letters the issue reserved, and the ones whose meaning moved (R, Z, P).
  assert {'C', 'A', 'P', 'Y', 'I', 'O'} <= set(letters)
  meanings = {letter: meaning for _, letter, meaning in entries}
  assert 'latent rank' in meanings['R'] and 'routed slots' in meanings['Z']
  assert 'state dim' in meanings['P']


@pytest.mark.parametrize('path', _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_names_and_einsums_follow_the_key(path):
  letters = key_letters()
  source = path.read_text()
  problems = bad_names(source, letters) + bad_einsums(source, letters)
  assert not problems, f'{path.relative_to(ROOT)} breaks the dimension key:\n' + '\n'.join(problems)


def test_the_checkers_catch_planted_names():
  letters = key_letters()
  small = letters - {'R'}
  assert bad_names('q_BKrH = x', letters) == ["1: q_BKrH (lowercase 'r')"]
  assert bad_names('angle_BTh', letters) and bad_names('s_BKtGs', letters)
  assert bad_names('y = 1\nrot_BTNR = 2', small) == ["2: rot_BTNR ('R' is not in the key)"]
  assert bad_names("cache['q_BTN2']  # x_BTd", letters) == [
      "1: q_BTN2 (digit '2' (only 1, a broadcast axis))", "1: x_BTd (lowercase 'd')"]
  assert bad_names('sinks_N', small) == [] and bad_names('sinks_R', small)  # a lone letter too
  # Not suffixes: constants, private names, lowercase words, broadcast axes.
  assert bad_names('GPT_OSS = DEEPSEEK_V3; _Static; dtype_of; max_BKGT1; sink_1KG11', letters) == []
  assert bad_einsums("jnp.einsum('BTNH,BSNH->BNTS', q, k)", letters) == []
  assert bad_einsums("jnp.einsum('BTNh,BSNh->BNTS', q, k)", letters) == [
      "1: 'BTNh,BSNh->BNTS' (lowercase 'h')"]
  assert bad_einsums("einsum('...R,RNH->...NH', q, w)", small) == [
      "1: '...R,RNH->...NH' ('R' is not in the key)"]


def test_parse_key_refuses_a_letter_listed_twice():
  key = 'Dimension key. Letters:\n\n  Every array:\n    B batch\n    T query length\n'
  assert [letter for _, letter, _ in parse_key(key)] == ['B', 'T']
  with pytest.raises(ValueError, match='listed twice'):
    parse_key(key + '  Attention:\n    B blocks\n')
  with pytest.raises(ValueError, match='not one uppercase letter'):
    parse_key(key + '    Tq query block\n')
  with pytest.raises(ValueError, match='no "Dimension key."'):
    parse_key('Shapes.\n')
