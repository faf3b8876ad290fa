"""The package's layout, as densenet_jax/__init__.py describes it: folders by role, each
importing only the folders below it, no import cycles and no module over about 400 lines.

Read from the source (no imports run), so it holds for imports inside functions and under
TYPE_CHECKING too: a cycle hidden in a function is still one a reader has to untangle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'densenet_jax'
# From the bottom up; a folder may import its own and lower ones.
LAYERS = ['runtime', 'native', 'models', 'data', 'training', 'experiments', 'tools']
MAX_LINES = 400


def _modules():
  """'densenet_jax.a.b' -> path of every module of the package."""
  found = {}
  for path in sorted(ROOT.rglob('*.py')):
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    found[name] = path
  return found


def _imports(path, modules):
  """The package modules that `path` imports, anywhere in it."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import x`: module pkg.x if it is one, else a name of pkg itself.
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
               else node.module for alias in node.names]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def _folder(module):
  parts = module.split('.')
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_module_is_in_a_folder_of_a_named_role():
  loose = [m for m in _modules() if m != 'densenet_jax' and _folder(m) not in LAYERS]
  assert not loose, f'modules outside the layout {LAYERS}: {loose}'
  described = (ROOT / '__init__.py').read_text()
  assert all(f'{folder}/' in described for folder in LAYERS)


def test_folders_import_only_their_own_and_lower_ones():
  wrong = []
  for module, imported in _graph().items():
    if _folder(module) is None:
      continue
    level = LAYERS.index(_folder(module))
    wrong += [f'{module} imports {other}' for other in sorted(imported)
              if _folder(other) and LAYERS.index(_folder(other)) > level]
  assert not wrong, wrong


def test_no_import_cycles():
  graph = _graph()
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = 'open'
    for other in sorted(graph[module]):
      if other == module or other == module.rsplit('.', 1)[0]:
        continue  # A package's own names (models/__init__ re-exports its modules).
      if state.get(other) == 'open':
        cycles.append(' -> '.join(stack[stack.index(other):] + [other]))
      elif other not in state:
        visit(other, stack + [other])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


@pytest.mark.parametrize('path', sorted(ROOT.rglob('*.py')), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_short(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f'{path.name}: {lines} lines; split it by responsibility'
