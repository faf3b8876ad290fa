"""Every flag the README and docs/ show on a command line exists: the documentation cannot drift
from the code. Read statically (no program is started): each `python train.py`, `python -m
densenet_jax.X` and `python benchmarks/X.py` command in a code block, its `--flags` against the
absl flags its program and the package modules it imports define, and its `--config.a.b`
overrides against the config file it names."""

import ast
import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
# absl's own flags, which every program has.
ABSL = {'help', 'helpshort', 'helpfull', 'helpxml', 'flagfile', 'undefok', 'logtostderr',
        'alsologtostderr', 'log_dir', 'v', 'verbosity', 'stderrthreshold', 'showprefixforinfo',
        'only_check_args', 'pdb', 'pdb_post_mortem', 'run_with_pdb', 'run_with_profiling',
        'use_cprofile_for_profiling', 'logger_levels'}


def _commands(text: str):
  """Commands of the code blocks and inline code of a markdown text, continuation lines
  joined."""
  blocks, lines, fence = [], None, None
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      if lines is None:
        lines, fence = [], line.strip()[3:]
      else:
        if fence in ('', 'bash', 'sh', 'shell'):
          blocks.append('\n'.join(lines))
        lines = None
    elif lines is not None:
      lines.append(line)
  # Inline code spans that hold a whole command count as one line each.
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  blocks += [' '.join(span.split()) for span in re.findall(r'`(python3? [^`]+)`', prose)]
  for block in blocks:
    for line in block.replace('\\\n', ' ').splitlines():
      for part in re.split(r'&&|;|\|', line):
        words = part.strip().split()
        while words and ('=' in words[0] and not words[0].startswith('-')):
          words = words[1:]   # VAR=value prefixes
        if len(words) >= 2 and words[0] in ('python', 'python3'):
          yield ' '.join(words)


def _program(words):
  """(source file, the rest of the words) of a `python ...` command, or None."""
  if words[1] == '-m' and words[2].startswith('densenet_jax.'):
    path = ROOT / (words[2].replace('.', '/') + '.py')
    return path, words[3:]
  if words[1] == 'train.py' or words[1].startswith('benchmarks/'):
    return ROOT / words[1], words[2:]
  return None


def _defined_flags(path: pathlib.Path, seen=None) -> set:
  """Flags defined by the module at `path` and the package modules it imports."""
  seen = set() if seen is None else seen
  if path in seen or not path.exists():
    return set()
  seen.add(path)
  source = path.read_text()
  names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
  for node in ast.walk(ast.parse(source)):
    modules = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
        ('densenet_jax', 'harness')):
      modules = [f'{node.module}.{alias.name}' for alias in node.names] + [node.module]
    elif isinstance(node, ast.Import):
      modules = [alias.name for alias in node.names if alias.name.startswith('densenet_jax')]
    for module in modules:
      for candidate in (ROOT / (module.replace('.', '/') + '.py'),
                        ROOT / 'benchmarks' / (module + '.py')):
        names |= _defined_flags(candidate, seen)
  return names


def _config_fields(config_arg: str):
  """The field paths of the config a `--config=FILE[:ARG]` names, or None if the file is not a
  config of this repository."""
  path, _, arg = config_arg.partition(':')
  path = ROOT / path
  if not path.exists():
    return None
  spec = importlib.util.spec_from_file_location('documented_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      yield prefix + key
      if hasattr(value, 'keys'):
        yield from walk(value, prefix + key + '.')
  return set(walk(config, ''))


def _documented():
  for document in DOCUMENTS:
    for command in _commands(document.read_text()):
      try:
        words = shlex.split(command)
      except ValueError:
        words = command.split()
      program = _program(words)
      if program:
        yield document.relative_to(ROOT), command, program


DOCUMENTED = list(_documented())


def test_the_documents_show_commands():
  """The reader finds at least the main commands (the scan itself works)."""
  programs = {str(path.relative_to(ROOT)) for _, _, (path, _) in DOCUMENTED}
  assert {'train.py', 'densenet_jax/experiments/sweep.py',
          'densenet_jax/tools/summary.py'} <= programs, programs


@pytest.mark.parametrize('document, command, program', DOCUMENTED,
                         ids=[f'{d}:{c[:60]}' for d, c, _ in DOCUMENTED])
def test_every_documented_flag_exists(document, command, program):
  path, args = program
  assert path.exists(), f'{document}: `{command}`: no {path.relative_to(ROOT)}'
  defined = _defined_flags(path) | ABSL
  config = None
  for arg in args:
    if not arg.startswith('--'):
      continue
    name, _, value = arg[2:].partition('=')
    if name == 'config' and value:
      config = _config_fields(value)
    if name.startswith('config.'):
      field = name[len('config.'):]
      assert config is None or field in config, (
          f'{document}: `{command}`: --{name}: no such config field')
      continue
    name = name[2:] if name.startswith('no') and name[2:] in defined else name
    assert name in defined, f'{document}: `{command}`: --{name} is not a flag of {path.name}'
