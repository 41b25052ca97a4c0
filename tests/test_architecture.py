"""The package keeps its rooms: who may import whom, and the one place for each thing.

Read from the source with ``ast`` (no import runs), so a forbidden arrow fails here with
the file and line that adds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ore"


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _offenders(folder: Path, forbidden) -> list[str]:
    return [f"{p.relative_to(REPO)}:{line} imports {name}"
            for p in _modules(folder) for line, name in _imports(p) if forbidden(name)]


def test_argparse_lives_only_in_the_command_line():
    found = [o for o in _offenders(PACKAGE, lambda n: n == "argparse")
             if not o.startswith("ore/cli/")]
    assert found == []


def test_contrastive_imports_nothing_of_ours_outside_itself():
    assert _offenders(PACKAGE / "contrastive", lambda n: n.startswith("ore.")
                      and not n.startswith("ore.contrastive")) == []


@pytest.mark.parametrize("room", ["modeling", "data", "evaluation", "contrastive", "vis"])
def test_lower_rooms_never_import_the_engine_cli_or_demo(room):
    assert _offenders(PACKAGE / room, lambda n: n.split(".")[:2] in
                      (["ore", "engine"], ["ore", "cli"], ["ore", "demo"])) == []


@pytest.mark.parametrize("room, forbidden", [
    ("data", ("modeling",)),
    ("evaluation", ("modeling",)),
    ("engine", ("demo",)),
])
def test_data_flows_one_way(room, forbidden):
    assert _offenders(PACKAGE / room, lambda n: n.split(".")[:2] in
                      [["ore", f] for f in forbidden]) == []


def test_library_modules_import_at_the_top():
    """Imports inside function bodies hide what depends on what; only the command line's
    dispatcher imports a command's module when it is chosen."""
    found = []
    for path in _modules(PACKAGE):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(node)
                          if isinstance(n, ast.Import | ast.ImportFrom)]
    assert found == []


def test_weights_are_read_in_one_module():
    readers = sorted({str(p.relative_to(REPO)) for p in _modules(PACKAGE)
                      if "torch.load(" in p.read_text()})
    assert readers == ["ore/engine/checkpoint.py"]


def test_no_code_runs_the_ore_command_as_a_subprocess():
    pattern_hits = []
    for folder in (PACKAGE, REPO / "tools", REPO / "datasets"):
        for path in _modules(folder):
            text = path.read_text()
            if '"-m", "ore"' in text or "'-m', 'ore'" in text or "subprocess" in text and \
                    '"ore",' in text:
                pattern_hits.append(str(path.relative_to(REPO)))
    assert pattern_hits == []


def test_every_package_folder_says_its_job():
    folders = [d for d in PACKAGE.rglob("*") if d.is_dir() and any(d.glob("*.py"))]
    missing = [str(d.relative_to(REPO)) for d in [PACKAGE, *folders]
               if not (d / "__init__.py").is_file()
               or ast.get_docstring(ast.parse((d / "__init__.py").read_text())) is None]
    assert missing == []
