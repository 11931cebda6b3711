"""The README and docs/ name only what the code has.

Every ``--config.FIELD`` names a field of the config its command loads (``--config=configs/X.py[:variant]`` or a
``configs/X.py[:variant]`` argument of a launch script; with none in the command, one named elsewhere in its code
block; with none there either, any config in ``configs/``), and every ``config.FIELD`` of the prose a field of some
config. Every ``configs/X.py:VARIANT`` loads. Every flag of a ``python -m ifsq_jax...`` command is one the module
defines, and so is a flag written alone in prose that names the module: argparse modules are asked in this process
(their parser is caught at ``parse_args``), absl modules (``ifsq_jax.main``, ``tools.input_bench``) in a subprocess
each, since they define the same absl flag names. Every relative link resolves, to a file and, with ``#anchor``, to
a heading of it. Each test reports every unknown name with its file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_PY_MODULE = re.compile(r"python3?\s+-m\s+(ifsq_jax(?:\.\w+)+)")
_FLAG = re.compile(r"(?<![\w./-])--([A-Za-z][\w-]*)((?:\.[\w<>*]+)+)?")
_CONFIG_FILE = re.compile(r"^(?:--config=)?(configs/\w+\.py)(?::(\S*))?$")
_CONFIG_VARIANT = re.compile(r"(?<![\w/])(configs/\w+\.py):([\w=.,-]+)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_PROSE_FIELD = re.compile(r"(?<![\w.<-])config\.([A-Za-z_]\w*(?:\.\w+)*)")
_SEPARATORS = re.compile(r"&&|\|\||;|\|")


@dataclasses.dataclass
class Command:
  """One shell command (or one inline code span) of a doc: its text, where it starts, and its code block."""
  path: pathlib.Path
  line: int
  text: str
  block: int | None  # index of the fenced code block, None for inline code
  section: int = 0  # index of the heading it is under
  paragraph: str = ""  # the prose paragraph (or list) of an inline code span

  def where(self) -> str:
    return f"{self.path.relative_to(REPO)}:{self.line}"


def _commands(path: pathlib.Path) -> list[Command]:
  """The shell commands of the fenced code blocks and the inline code spans of the prose."""
  lines = path.read_text().split("\n")
  out: list[Command] = []
  block, fence, para, para_start, section = 0, None, [], 0, 0

  def flush_paragraph():
    text = "\n".join(para)
    items = [m.start() for m in re.finditer(r"^\s*(?:[*-]|\d+\.) ", text, re.M)]  # list items: their own context
    for m in re.finditer(r"(`+)(.+?)\1", text, re.S):
      start = max([i for i in items if i <= m.start()], default=0)
      end = min([i for i in items if i > m.start()], default=len(text))
      out.append(Command(path, para_start + text.count("\n", 0, m.start()) + 1, m.group(2), None, section,
                         text[start:end]))

  logical, logical_start = "", 0
  for number, line in enumerate(lines, 1):
    stripped = line.strip()
    if fence is None and stripped.startswith("```"):
      flush_paragraph()
      para = []
      fence, block = stripped[3:].strip(), block + 1
      continue
    if fence is not None:
      if stripped.startswith("```"):
        fence = None
        continue
      if fence in ("python", "py"):  # code, not commands; its names are the tests' business
        continue
      if not logical:
        logical_start = number
      logical += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
      if not line.rstrip().endswith("\\"):
        hash_mark = re.search(r"\s#", logical)
        code, comment = (logical[:hash_mark.start()], logical[hash_mark.end():]) if hash_mark else (logical, "")
        segments = _SEPARATORS.split(code)
        segments[-1] += " " + comment  # flags in a trailing comment belong to the last command
        for segment in segments:
          if segment.strip():
            out.append(Command(path, logical_start, segment, block, section))
        logical = ""
      continue
    if not stripped or re.match(r"#{1,6} ", line):
      flush_paragraph()
      para = []
      section += bool(stripped)
    else:
      if not para:
        para_start = number - 1
      para.append(line)
  flush_paragraph()
  return out


def _named_configs(text: str) -> list[str]:
  """``configs/X.py[:variant]`` loaded by a command: ``--config=...`` or a bare argument (launch scripts)."""
  names = []
  for token in text.split():
    m = _CONFIG_FILE.match(token)
    if m:
      names.append(m.group(1) + (f":{m.group(2)}" if m.group(2) else ""))
  return names


@functools.lru_cache(maxsize=None)
def _load_config(name: str):
  """The config a command loads, through the loader the entry points share (``FILE.py[:variant]``)."""
  from ifsq_jax import shapes_only  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    return shapes_only.load_config_file(name)
  finally:
    os.chdir(cwd)


def _has_field(config, field: str) -> bool:
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node.keys():  # a leaf value has no sub-fields
      return False
    node = node[part]
  return True


def test_config_fields_exist():
  """Every ``--config.FIELD`` of the docs is a field of the config it is given to; every ``config.FIELD`` of the
  prose a field of some config."""
  all_configs = sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.py"))
  problems, checked = [], 0
  for path in DOCS:
    commands = _commands(path)
    block_configs: dict[int, list[str]] = {}
    for c in commands:
      if c.block is not None:
        block_configs.setdefault(c.block, []).extend(_named_configs(c.text))
    for c in commands:
      for m in _FLAG.finditer(c.text):
        if m.group(1) != "config" or not m.group(2):
          continue
        field = m.group(2)[1:]
        if "<" in field or "*" in field:  # a placeholder such as --config.<field>
          continue
        names = _named_configs(c.text) or (block_configs.get(c.block) if c.block is not None else None)
        names = names or all_configs
        checked += 1
        try:
          found = any(_has_field(_load_config(n), field) for n in names)
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{c.where()}: {' / '.join(names)} does not load: {type(e).__name__}: {e}")
          continue
        if not found:
          problems.append(f"{c.where()}: --config.{field}: no such field in {' / '.join(names)}")
      if c.block is None:  # prose: `config.loss.disc_start` is a field of some config too
        for m in _PROSE_FIELD.finditer(c.text):
          field = m.group(1)
          if field.rsplit(".", 1)[-1] in ("json", "yaml", "py"):  # config.json, a file
            continue
          checked += 1
          if not any(_has_field(_load_config(n), field) for n in all_configs):
            problems.append(f"{c.where()}: config.{field}: no such field in {' / '.join(all_configs)}")
  assert checked > 60, f"found only {checked} config fields; is the parser broken?"
  assert not problems, "Config fields named in the docs that the configs do not have:\n" + "\n".join(problems)


def test_config_variants_load():
  """Every ``configs/X.py:VARIANT`` of the docs loads (an unknown variant is an error in ``parse_variant``)."""
  problems, checked = [], 0
  for path in DOCS:
    for number, line in enumerate(path.read_text().split("\n"), 1):
      for m in _CONFIG_VARIANT.finditer(line):
        name = f"{m.group(1)}:{m.group(2).rstrip('.,')}"
        checked += 1
        try:
          _load_config(name)
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{path.relative_to(REPO)}:{number}: {name}: {type(e).__name__}: {e}")
  assert checked > 3
  assert not problems, "Config variants named in the docs that do not load:\n" + "\n".join(problems)


class _Parser(Exception):

  def __init__(self, parser: argparse.ArgumentParser):
    super().__init__()
    self.parser = parser


def _main_module(module_name: str) -> str:
  """The module ``python -m module_name`` runs: the module, or a package's ``__main__``."""
  spec = importlib.util.find_spec(module_name)
  if spec is None:
    raise ModuleNotFoundError(module_name)
  return module_name + ".__main__" if spec.submodule_search_locations is not None else module_name


def _is_argparse_module(module_name: str) -> bool:
  """Read, not imported: an absl module would define its flags in this process's registry."""
  spec = importlib.util.find_spec(_main_module(module_name))
  return "ArgumentParser(" in pathlib.Path(spec.origin).read_text()


def _argparse_flags(module_name: str) -> set[str]:
  """The option names of an argparse module's ``main``, caught at ``parse_args``."""
  module = importlib.import_module(_main_module(module_name))

  def catch(self, *args, **kwargs):
    raise _Parser(self)

  saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
  argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = catch
  try:
    module.main([])
  except _Parser as caught:
    return {o[2:] for o in caught.parser._option_string_actions if o.startswith("--")}  # pylint: disable=protected-access
  finally:
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
  raise AssertionError(f"{module_name}.main() did not parse its arguments")


_ABSL_FLAGS = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(flags.FLAGS)))
"""


def _start_absl_flags(module_names: list[str]) -> dict[str, subprocess.Popen]:
  """Asks for the absl flags each module defines (with absl's own), one subprocess per module, side by side."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return {name: subprocess.Popen([sys.executable, "-c", _ABSL_FLAGS, name], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in module_names}


def _absl_flags(procs: dict[str, subprocess.Popen]) -> dict[str, set[str]]:
  result = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"importing {name} failed:\n{stderr[-3000:]}"
    result[name] = set(json.loads(stdout.strip().split("\n")[-1]))
  return result


def _module_mentions(text: str, modules: list[str]) -> set[str]:
  """The command-line modules a prose paragraph names: ``ifsq_jax.tools.sample``, ``tools.sample``, ..."""
  found = set()
  for module in modules:
    short = module[len("ifsq_jax."):] if module.startswith("ifsq_jax.tools.") else module
    if re.search(rf"(?<![\w.])(?:ifsq_jax\.)?{re.escape(short)}(?![\w])", text.replace("\n", " ")) or \
        re.search(rf"python3?\s+-m\s+{re.escape(module)}(?![\w.])", text):
      found.add(module)
  return found


def test_module_flags_exist():
  """Every flag of a ``python -m ifsq_jax...`` command in the docs is defined by that module.

  A flag written on its own in the prose (`--png`) is checked too where its paragraph names a command-line module
  (`tools.sample`) or its section shows ``python -m`` commands in a code block: it must be a flag of one of them.
  XLA's flags (``--xla_...``) and flags of prose with no such module around (launch scripts, benchmarks) are not
  checked.
  """
  uses: list[tuple[Command, tuple[str, ...], str]] = []  # (command, modules that may define it, flag)
  prose: list[Command] = []
  section_modules: dict[tuple[pathlib.Path, int], set[str]] = {}
  for path in DOCS:
    for c in _commands(path):
      m = _PY_MODULE.search(c.text)
      if not m:
        if c.block is None and c.text.lstrip().startswith("--"):
          prose.append(c)
        continue
      if c.block is not None:
        section_modules.setdefault((path, c.section), set()).add(m.group(1))
      for f in _FLAG.finditer(c.text, m.end()):
        flag = "config" if f.group(1) == "config" and f.group(2) else f.group(1)
        uses.append((c, (m.group(1),), flag))
  modules = sorted({module for _, ms, _ in uses for module in ms})
  prose_checked = 0
  for c in prose:
    context = _module_mentions(c.paragraph, modules) | section_modules.get((c.path, c.section), set())
    if not context:
      continue
    for f in _FLAG.finditer(c.text):
      if f.group(1).startswith("xla_") or (f.group(1) == "config" and f.group(2)):
        continue
      uses.append((c, tuple(sorted(context)), f.group(1)))
      prose_checked += 1
  argparse_modules = [module for module in modules if _is_argparse_module(module)]
  absl = _start_absl_flags([module for module in modules if module not in argparse_modules])
  flags_of = {module: _argparse_flags(module) for module in argparse_modules}
  flags_of.update(_absl_flags(absl))
  problems = []
  for c, candidates, flag in uses:
    known = set().union(*(flags_of[module] for module in candidates))
    if flag in known or (flag.startswith("no") and flag[2:] in known and not set(candidates) & set(argparse_modules)):
      continue
    problems.append(f"{c.where()}: {' / '.join(f'python -m {m}' for m in candidates)} has no flag --{flag}")
  assert len(uses) > 30 and "ifsq_jax.main" in modules, f"found only {len(uses)} flags; is the parser broken?"
  assert prose_checked > 10, f"checked only {prose_checked} flags in prose; is the parser broken?"
  assert not problems, "Flags named in the docs that the modules do not define:\n" + "\n".join(problems)


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  anchors, fence = set(), False
  for line in path.read_text().split("\n"):
    if line.strip().startswith("```"):
      fence = not fence
    elif not fence and re.match(r"#{1,6} ", line):
      anchors.add(_slug(line.lstrip("#")))
  return anchors


def test_relative_links_resolve():
  """Relative links of the README and docs/ reach an existing file (and heading); README links every page."""
  problems = []
  for path in DOCS:
    fence = False
    for number, line in enumerate(path.read_text().split("\n"), 1):
      if line.strip().startswith("```"):
        fence = not fence
      if fence:
        continue
      for m in _LINK.finditer(line):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
          continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(REPO)}:{number}"
        if not dest.exists():
          problems.append(f"{where}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
          problems.append(f"{where}: link to {target}: no heading with that anchor in {file or path.name}")
  readme = (REPO / "README.md").read_text()
  for page in DOCS[1:]:
    if f"(docs/{page.name}" not in readme:
      problems.append(f"README.md: no link to docs/{page.name}")
  assert not problems, "Broken links:\n" + "\n".join(problems)


def test_readme_is_short_and_keeps_the_test_command():
  lines = (REPO / "README.md").read_text().split("\n")
  assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
  assert any(line.startswith('pip install -e ".[test]"') for line in lines[:10])
