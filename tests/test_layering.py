"""Imports only go down the chain of DESIGN.md "Data flow"; no module imports from a layer above it."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lorakern"

# lower number = lower layer; a module may import its own layer or lower ones
LAYERS = {
    "formats": 0,
    "reference": 1,
    "kernels": 2,
    "_C": 2,
    "_cuda": 2,
    "ops": 3,
    "nn": 4,
    "patch": 5,
    "train": 6,
    "cli": 7,
    "env": 7,
    "__main__": 7,
}


def _layer_of(parts: tuple[str, ...]) -> int | None:
    """Layer of lorakern.<parts...>; None for the package root (lazy re-exports only)."""
    return LAYERS.get(parts[0]) if parts else None


def _imported(tree: ast.AST, module_parts: tuple[str, ...], is_pkg: bool):
    """Yield the lorakern-relative parts of every lorakern module imported at any depth."""
    package = module_parts if is_pkg else module_parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lorakern":
                    yield tuple(alias.name.split(".")[1:]), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = base + tuple(node.module.split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == "lorakern":
                mod = tuple(node.module.split(".")[1:])
            else:
                continue
            if not mod:  # "from lorakern import x" / "from .. import x": x names a module
                for alias in node.names:
                    yield (alias.name,), node.lineno
            else:
                yield mod, node.lineno


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = tuple(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield path, parts, is_pkg


def test_layers_cover_every_top_level_module():
    tops = {p[0] for _, p, _ in _modules() if p}
    assert tops <= set(LAYERS), f"add {tops - set(LAYERS)} to LAYERS (and to DESIGN.md's chain)"


@pytest.mark.parametrize("path, parts, is_pkg", list(_modules()), ids=lambda v: str(v) if isinstance(v, Path) else None)
def test_no_upward_imports(path, parts, is_pkg):
    own = _layer_of(parts)
    if own is None:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for target, line in _imported(tree, parts, is_pkg):
        theirs = _layer_of(target)
        if theirs is not None:
            assert theirs <= own, f"{path.relative_to(PKG.parent)}:{line} imports lorakern.{'.'.join(target)} from a higher layer"


def test_the_check_can_fail(tmp_path):
    """The import walker sees relative, absolute and nested imports."""
    code = "from ..train import trainer\nimport lorakern.patch\ndef f():\n    from lorakern.nn import LoRALinear\n"
    found = {t for t, _ in _imported(ast.parse(code), ("ops", "x"), False)}
    assert ("train",) in found and ("patch",) in found and ("nn",) in found
