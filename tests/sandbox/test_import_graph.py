"""The import graphs of sandbox_service and fr_jax, read from the source with `ast`: no circles, and the service
imports nothing from fr_jax (fr_jax reaches it over HTTP only)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of `package` (and of fr_jax) it imports, anywhere in its source: under TYPE_CHECKING or
    in a function too, since such an import still ties the two modules together."""
    files = {_module_name(path, root): path for path in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package, up node.level - 1 packages
                    anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            edges.update(target for target in targets if target.split(".")[0] in (package, "fr_jax"))
    return graph


def test_the_reader_resolves_absolute_relative_and_submodule_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import thing\n")
    (package / "a.py").write_text("import os\nfrom pkg.sub import b\n\ndef f():\n    from pkg import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import c\nfrom ..a import f\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import x\n")
    graph = import_graph("pkg", tmp_path)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b", "pkg.c"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c", "pkg.a"},
        "pkg.c": {"pkg.sub.b"},
    }
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


@pytest.mark.parametrize("package", ["sandbox_service", "fr_jax"])
def test_no_import_circle(package):
    graph = {
        module: {t for t in targets if t.split(".")[0] == package} for module, targets in import_graph(package).items()
    }
    assert len(graph) > 10
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"{package} has an import circle: {' -> '.join(error.args[1])}")


def test_sandbox_service_imports_nothing_from_fr_jax():
    reaching = {
        module: sorted(t for t in targets if t.split(".")[0] == "fr_jax")
        for module, targets in import_graph("sandbox_service").items()
    }
    assert {module: targets for module, targets in reaching.items() if targets} == {}
