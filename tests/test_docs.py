"""The README and docs/ name only what the code has.

Every ``--config.FIELD`` names a field of the config its command loads (``--config=configs/X.py[:variant]`` or a
``configs/X.py[:variant]`` argument of a launch script; with none in the command, one named elsewhere in its code
block; with none there either, any config in ``configs/``). Every ``configs/X.py:VARIANT`` loads. Every flag of a
``python -m ifsq_jax...`` command is one the module defines: argparse modules are asked in this process (their
parser is caught at ``parse_args``), absl modules (``ifsq_jax.main``, ``tools.input_bench``) in a subprocess each,
since they define the same absl flag names. Every relative link resolves, to a file and, with ``#anchor``, to a
heading of it. Each test reports every unknown name with its file and line.
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

_PY_MODULE = re.compile(r"python3?\s+-m\s+(ifsq_jax(?:\.\w+)*)")
_FLAG = re.compile(r"(?<![\w./-])--([A-Za-z][\w-]*)((?:\.[\w<>*]+)+)?")
_CONFIG_FILE = re.compile(r"^(?:--config=)?(configs/\w+\.py)(?::(\S*))?$")
_CONFIG_VARIANT = re.compile(r"(?<![\w/])(configs/\w+\.py):([\w=.,-]+)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_SEPARATORS = re.compile(r"&&|\|\||;|\|")


@dataclasses.dataclass
class Command:
  """One shell command (or one inline code span) of a doc: its text, where it starts, and its code block."""
  path: pathlib.Path
  line: int
  text: str
  block: int | None  # index of the fenced code block, None for inline code

  def where(self) -> str:
    return f"{self.path.relative_to(REPO)}:{self.line}"


def _commands(path: pathlib.Path) -> list[Command]:
  """The shell commands of the fenced code blocks and the inline code spans of the prose."""
  lines = path.read_text().split("\n")
  out: list[Command] = []
  block, fence, para, para_start = 0, None, [], 0

  def flush_paragraph():
    text = "\n".join(para)
    for m in re.finditer(r"(`+)(.+?)\1", text, re.S):
      out.append(Command(path, para_start + text.count("\n", 0, m.start()) + 1, m.group(2), None))

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
            out.append(Command(path, logical_start, segment, block))
        logical = ""
      continue
    if not stripped:
      flush_paragraph()
      para = []
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
  """Every ``--config.FIELD`` of the docs is a field of the config it is given to."""
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
  assert checked > 20, f"found only {checked} --config fields; is the parser broken?"
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


def _argparse_flags(module_name: str) -> set[str] | None:
  """The option names of an argparse module's ``main``, caught at ``parse_args``; None if it is not one."""
  spec = importlib.util.find_spec(module_name)
  if spec is None:
    raise ModuleNotFoundError(module_name)
  if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
    module_name += ".__main__"
    spec = importlib.util.find_spec(module_name)
  # Only argparse modules are imported here: an absl module defines flags in the process-wide registry.
  if spec is None or "ArgumentParser(" not in pathlib.Path(spec.origin).read_text():
    return None
  module = importlib.import_module(module_name)

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
  return None


_ABSL_FLAGS = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(flags.FLAGS)))
"""


def _absl_flags(module_names: list[str]) -> dict[str, set[str]]:
  """The absl flags each module defines (with absl's own), one subprocess per module, run side by side."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = {name: subprocess.Popen([sys.executable, "-c", _ABSL_FLAGS, name], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in module_names}
  result = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"importing {name} failed:\n{stderr[-3000:]}"
    result[name] = set(json.loads(stdout.strip().split("\n")[-1]))
  return result


def test_module_flags_exist():
  """Every flag of a ``python -m ifsq_jax...`` command in the docs is defined by that module."""
  uses: list[tuple[Command, str, str]] = []  # (command, module, flag)
  for path in DOCS:
    for c in _commands(path):
      m = _PY_MODULE.search(c.text)
      if not m:
        continue
      for f in _FLAG.finditer(c.text, m.end()):
        flag = "config" if f.group(1) == "config" and f.group(2) else f.group(1)
        uses.append((c, m.group(1), flag))
  modules = sorted({module for _, module, _ in uses})
  flags_of: dict[str, set[str]] = {}
  absl_modules = []
  for module in modules:
    found = _argparse_flags(module)
    if found is None:
      absl_modules.append(module)
    else:
      flags_of[module] = found
  flags_of.update(_absl_flags(absl_modules))
  problems = []
  for c, module, flag in uses:
    known = flags_of[module]
    if flag in known or (flag.startswith("no") and flag[2:] in known):
      continue
    problems.append(f"{c.where()}: python -m {module} has no flag --{flag}")
  assert len(uses) > 30 and "ifsq_jax.main" in modules, f"found only {len(uses)} flags; is the parser broken?"
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
