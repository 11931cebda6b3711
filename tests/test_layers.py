"""The package's layers: no module imports from a layer above its own, and train and tools never import each other.

Every ``import`` in ``ifsq_jax/`` counts, those inside functions too (read with
``ast``, nothing is imported). The layers, lowest first; a module may import
from its own layer and from the layers below:

0. base: ``paths``, ``parallel``, ``config_lib``, ``flops``, ``shapes_only``,
   ``multihost``, ``checkpoint``, ``topology``, ``quantizers``, ``kernels``
1. ``data``, ``nets``, ``models``: inputs and networks
2. ``objectives``, ``eval``: pure losses and metrics of what layer 1 makes
3. ``sampling``: drawing samples of the generators (``sampling.draw``, the
   one path of in-training evaluation, ``tools.sample`` and the benches)
4. ``convert``: checkpoints of other frameworks -> params of layer 1's models
5. ``train`` and ``tools``: peers that neither may import the other (what
   both need lives below them: ``parallel``, ``sampling``, ``eval``)
6. ``main``, ``__init__`` (the public API) and ``study``

One module sits above its folder: ``tools.input_bench`` runs a training config's input
pipeline and compiles its step as ``main --compile_only`` does, so it is an entry point of
training, placed with ``main`` (see ``PLACED``); nothing imports it.

``from ifsq_jax import name`` imports the submodule ``name`` when there is one,
else a name of ``__init__`` (layer 6).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ifsq_jax"

LAYERS = (
    ("paths", "parallel", "config_lib", "flops", "shapes_only", "multihost", "checkpoint", "topology", "quantizers",
     "kernels"),
    ("data", "nets", "models"),
    ("objectives", "eval"),
    ("sampling",),
    ("convert",),
    ("train", "tools"),
    ("main", "__init__", "study"),
)
PLACED = {"ifsq_jax.tools.input_bench": "main"}  # modules in a layer other than their folder's (docstring)
PEERS_APART = ({"train", "tools"},)  # same layer, yet neither may import the other
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
  """The top-level part of a module of the package: ``ifsq_jax.train.dit`` -> ``train``; the package -> ``__init__``."""
  if module in PLACED:
    return PLACED[module]
  names = module.split(".")
  return names[1] if len(names) > 1 else "__init__"


def _exists(module: str) -> bool:
  path = PACKAGE.parent.joinpath(*module.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  names = list(rel.parts)
  return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported module of the package) of every import in the file at ``path``."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ifsq_jax"]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      if source.split(".")[0] != "ifsq_jax":
        continue
      for alias in node.names:
        # `from ifsq_jax.x import y`: y is the submodule x.y when there is one, else a name defined in x.
        child = f"{source}.{alias.name}"
        out.append((node.lineno, child if _exists(child) else source))
  return out


def test_every_part_of_the_package_has_a_layer():
  parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists())}
  assert parts - set(LAYER) == set(), "give these parts of ifsq_jax a layer in LAYERS"


def test_no_module_imports_from_a_layer_above_its_own():
  problems = []
  for path in sorted(PACKAGE.rglob("*.py")):
    module = _module_name(path)
    mine = _part(module) if path != PACKAGE / "__init__.py" else "__init__"
    for line, imported in _imports(path):
      theirs = _part(imported)
      if theirs == mine:
        continue
      if LAYER[theirs] > LAYER[mine]:
        problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({mine}, layer {LAYER[mine]}) imports "
                        f"{imported} ({theirs}, layer {LAYER[theirs]})")
      elif any({mine, theirs} <= peers for peers in PEERS_APART):
        problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {imported}: {mine} and "
                        f"{theirs} are peers that never import each other")
  assert not problems, "imports against the layers (see this test's docstring):\n" + "\n".join(problems)
