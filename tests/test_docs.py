"""The documentation against the code: what the docs name must exist.

Fast by design: it reads text, loads the configs and imports modules; it never
trains, traces or compiles.

The rules, precisely:

1. Every config key is documented. Each config in configs/ (fold, quick, tpu,
   predict, segment) is loaded with `get_config()` and flattened to dotted keys
   (`optimizer.learning_rate`). A key is documented when one of these holds:
   a. the dotted key is a token of a code span (`...` or a fenced block) of
      README.md or docs/*.md, a leading `config.` or `--config.` removed: e.g.
      `optimizer.learning_rate=3e-4` or `--config.segment.input=line.sgy`;
   b. the key's leaf name is the first cell of a table row in docs/*.md, written
      as a code span, under a heading whose code spans name the key's section:
      `learning_rate` in a table under "### `optimizer`" (a top-level key needs
      no section: rule a covers it);
   c. the statement of a configs/*.py file that sets the key carries a comment:
      a comment on one of its lines, or a comment line right above it. A key is
      set by `config.a.b = ...`, or as `b=...` inside a `ConfigDict(dict(...))`
      assigned to `config.a` (directly, or through a function of the same file
      that returns it).
2. Every `saltjax.<dotted.name>` mentioned in README.md, docs/*.md,
   benchmarks/README.md, and the comments and docstrings of main.py and of the
   Python files under configs, saltjax, benchmarks, tools and tests resolves:
   the longest importable module prefix is imported, then the rest is looked
   up attribute by attribute.
3. Every repository path mentioned in those same places exists: a word that
   starts with one of the folders saltjax, tests, benchmarks, tools or configs
   and a slash. Where it holds a placeholder (`*`, `<...>`, `{a,b}`), the
   folder before the first placeholder must exist; a path without a suffix
   also counts when it names a module (`configs/tpu` for configs/tpu.py).
4. Every figure docs/*.png is shown by README.md or a guide in docs/, and every
   guide docs/*.md is linked from README.md.
5. Every relative link of README.md, docs/*.md and benchmarks/README.md leads
   to a file that exists and, with a `#anchor`, to one of its headings (the
   anchor GitHub makes of it).
6. README.md is at most 250 lines.
"""

from __future__ import annotations

import ast
import importlib
import io
import pathlib
import re
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("fold", "quick", "tpu", "predict", "segment")
README_MAX_LINES = 250

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_SALTJAX_NAME = re.compile(rf"(?<![\w./-])saltjax(?:\.{_NAME})+")
_PATH = re.compile(r"(?<![\w./~<>-])(?:saltjax|tests|benchmarks|tools|configs)/[\w./*<>{},-]*")
_PLACEHOLDER = re.compile(r"[*<{]")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_HEADING = re.compile(r"^#+\s")


# ------------------------------------------------------------------ sources ---


def _markdown_files() -> list[pathlib.Path]:
  return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _read(path: pathlib.Path) -> str:
  return path.read_text(encoding="utf-8")


def _python_prose(path: pathlib.Path) -> str:
  """The comments and docstrings of a Python file, one block per line."""
  source = _read(path)
  parts = [
      tok.string
      for tok in tokenize.generate_tokens(io.StringIO(source).readline)
      if tok.type == tokenize.COMMENT
  ]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        parts.append(doc)
  return "\n".join(parts)


def _prose_sources() -> dict[str, str]:
  """Relative path -> the text in it that names code: rules 2 and 3."""
  texts = {str(p.relative_to(REPO)): _read(p) for p in _markdown_files()}
  texts["benchmarks/README.md"] = _read(REPO / "benchmarks" / "README.md")
  python = [REPO / "main.py"]
  for folder in ("configs", "saltjax", "benchmarks", "tools", "tests"):
    python += sorted((REPO / folder).glob("**/*.py"))
  for path in python:
    texts[str(path.relative_to(REPO))] = _python_prose(path)
  return texts


# ------------------------------------------------------------- config keys ---


def _flatten(config, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    if hasattr(value, "items"):
      keys += _flatten(value, f"{prefix}{name}.")
    else:
      keys.append(prefix + name)
  return keys


def _config_keys() -> list[str]:
  keys = set()
  for name in CONFIGS:
    keys.update(_flatten(importlib.import_module(f"configs.{name}").get_config()))
  return sorted(keys)


def _code_tokens(markdown: str) -> set[str]:
  """Dotted names in code spans and fenced blocks, without a `config.` prefix."""
  code = _FENCE.findall(markdown) + _CODE_SPAN.findall(_FENCE.sub("", markdown))
  tokens = set()
  for text in code:
    for token in _DOTTED.findall(text):
      tokens.add(token.removeprefix("config."))
  return tokens


def _table_leaves(markdown: str) -> set[str]:
  """'section.leaf' for each table row whose first cell is `leaf`, by heading."""
  found, sections = set(), []
  for line in _FENCE.sub("", markdown).splitlines():
    if _HEADING.match(line):
      sections = _CODE_SPAN.findall(line)
    elif line.startswith("|") and sections:
      first = line.strip("|").split("|")[0].strip()
      leaf = re.fullmatch(r"`(\w+)`", first)
      if leaf:
        found.update(f"{section}.{leaf.group(1)}" for section in sections)
  return found


def _attribute_chain(node) -> str | None:
  """`config.a.b` -> 'a.b'; None for anything else."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == "config" and names:
    return ".".join(reversed(names))
  return None


def _dict_keywords(call):
  """The keywords of `ConfigDict(dict(k=v, ...))`, or []."""
  if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Call):
    inner = call.args[0]
    if isinstance(inner.func, ast.Name) and inner.func.id == "dict":
      return inner.keywords
  return []


def _commented_keys(path: pathlib.Path) -> set[str]:
  """The keys this config file sets with a comment (rule 1c)."""
  source = _read(path)
  lines = source.splitlines()
  comment_lines = {
      tok.start[0]
      for tok in tokenize.generate_tokens(io.StringIO(source).readline)
      if tok.type == tokenize.COMMENT
  }

  def commented(node) -> bool:
    if comment_lines & set(range(node.lineno, node.end_lineno + 1)):
      return True
    above = node.lineno - 1
    return above in comment_lines and lines[above - 1].lstrip().startswith("#")

  tree = ast.parse(source)
  returned = {}  # function name -> the ConfigDict call it returns
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef):
      for child in ast.walk(node):
        if isinstance(child, ast.Return) and _dict_keywords(child.value):
          returned[node.name] = child.value
  keys = set()
  for node in ast.walk(tree):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    key = _attribute_chain(node.targets[0])
    if key is None:
      continue
    if commented(node):
      keys.add(key)
    value = node.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
      value = returned.get(value.func.id, value)
    for keyword in _dict_keywords(value):
      if commented(keyword):
        keys.add(f"{key}.{keyword.arg}")
  return keys


def test_every_config_key_is_documented():
  tokens, leaves, commented = set(), set(), set()
  for path in _markdown_files():
    text = _read(path)
    tokens |= _code_tokens(text)
    if path.parent.name == "docs":
      leaves |= _table_leaves(text)
  for path in sorted((REPO / "configs").glob("*.py")):
    commented |= _commented_keys(path)
  keys = _config_keys()
  assert len(keys) > 50, keys  # the configs were read
  missing = [k for k in keys if k not in tokens and k not in leaves and k not in commented]
  assert not missing, (
      "config keys documented nowhere (README.md, docs/*.md, or a comment where the config"
      f" sets them): {missing}"
  )


# ------------------------------------------------------ names and paths ---


def _resolves(dotted: str) -> bool:
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def test_every_saltjax_name_mentioned_exists():
  bad = []
  for source, text in _prose_sources().items():
    for name in sorted(set(_SALTJAX_NAME.findall(text))):
      if not _resolves(name):
        bad.append(f"{source}: {name}")
  assert not bad, "names that do not resolve:\n  " + "\n  ".join(bad)


def _path_exists(mentioned: str) -> bool:
  placeholder = _PLACEHOLDER.search(mentioned)
  if placeholder:
    mentioned = mentioned[: placeholder.start()].rpartition("/")[0]
  path = REPO / mentioned.rstrip("./,")
  return path.exists() or (not path.suffix and path.with_suffix(".py").exists())


def test_every_repository_path_mentioned_exists():
  bad = []
  for source, text in _prose_sources().items():
    for mentioned in sorted(set(_PATH.findall(text))):
      if not _path_exists(mentioned):
        bad.append(f"{source}: {mentioned}")
  assert not bad, "paths that do not exist:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("`saltjax.data.rle.decode`", ["saltjax.data.rle.decode"]),
        ("see saltjax.metrics.", ["saltjax.metrics"]),
        ("~/.cache/saltjax/jax_cache and /x/saltjax.y", []),
    ],
)
def test_name_pattern(text, ok):
  assert _SALTJAX_NAME.findall(text) == ok


@pytest.mark.parametrize(
    "mentioned, exists",
    [
        ("saltjax/data/rle.py", True),
        ("saltjax/data/", True),
        ("configs/fold.py.", True),
        ("benchmarks/results/gpu_*_<RUN_ID>.json", True),
        ("tests/<package>/test_*.py", True),
        ("configs/tpu", True),
        ("saltjax/nothing_here.py", False),
        ("tools/nothing/<x>.py", False),
    ],
)
def test_path_rule(mentioned, exists):
  assert _path_exists(mentioned) == exists


# ------------------------------------------------------- figures, guides ---


def test_every_figure_is_shown_and_every_guide_linked():
  readme = _read(REPO / "README.md")
  shown = readme + "".join(_read(p) for p in (REPO / "docs").glob("*.md"))
  figures = sorted(p.name for p in (REPO / "docs").glob("*.png"))
  assert figures
  unshown = [
      f for f in figures if not re.search(rf"!\[[^\]]*\]\((?:docs/)?{re.escape(f)}\)", shown)
  ]
  assert not unshown, f"figures no guide shows: {unshown}"
  guides = sorted(p.name for p in (REPO / "docs").glob("*.md"))
  unlinked = [g for g in guides if f"](docs/{g})" not in readme]
  assert not unlinked, f"guides README.md does not link: {unlinked}"


def _anchors(markdown: str) -> set[str]:
  """GitHub's anchors of a file's headings: lower case, punctuation dropped, '-' for ' '."""
  anchors, seen = set(), {}
  for line in _FENCE.sub("", markdown).splitlines():
    if _HEADING.match(line):
      slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
      anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
      seen[slug] = seen.get(slug, 0) + 1
  return anchors


def test_every_relative_link_leads_somewhere():
  bad = []
  for path in [*_markdown_files(), REPO / "benchmarks" / "README.md"]:
    for target in re.findall(r"\]\(([^)\s]+)\)", _FENCE.sub("", _read(path))):
      if re.match(r"[a-z]+:", target):
        continue  # a URL
      file, _, anchor = target.partition("#")
      linked = (path.parent / file).resolve() if file else path
      if not linked.exists():
        bad.append(f"{path.relative_to(REPO)}: {target} (no such file)")
      elif anchor and anchor not in _anchors(_read(linked)):
        bad.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
  assert not bad, "broken links:\n  " + "\n  ".join(bad)


def test_readme_is_a_front_door():
  lines = _read(REPO / "README.md").splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
  assert "python -m pytest -q tests" in "\n".join(lines)  # the command CI runs
