"""The architecture's rules, read from the source (docs/architecture.md): the layers import only downward (runtime
core <- medical I/O and outputs <- CLI and tools; the exporter on the core's contract), no import cycles in the
runtime or the exporter, no module reaching for another's private names, and the export's model families in one
table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"medsam_rt": REPO / "medsam_rt", "medsam_rt_export": REPO / "export"}


def _modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    return {".".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.py")}


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _imports(package: str, module: str, path: Path, *, lazy: bool) -> list[tuple[str, list[str]]]:
    """(imported module of ``package``, imported names) of ``module``: its module-level imports (``lazy``: also
    those inside functions), never those under ``if TYPE_CHECKING``."""
    base = module.split(".")[:-1] if not path.name == "__init__.py" else module.split(".")
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and (top or lazy):
                if child.level:
                    parts = base[: len(base) - child.level + 1] if child.level > 1 else base
                    target = ".".join([*parts, *(child.module.split(".") if child.module else [])])
                elif child.module == package:  # from medsam_rt import X
                    target = ""
                elif child.module and child.module.startswith(package + "."):
                    target = child.module[len(package) + 1 :]
                else:
                    continue
                found.append((target, [a.name for a in child.names]))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


# What each layer of medsam_rt may import from medsam_rt and medsam_rt_export (module-level or inside functions)
LAYERS = {
    "errors": (),
    "core": ("errors", "core"),
    "io": ("errors", "core", "io"),
    "tools": ("errors", "core", "io", "tools", "__init__", "medsam_rt_export"),
    "__init__": ("errors", "core"),
}
# the exporter builds on the runtime's contract and the validation images of its gates, nothing else
EXPORT_MAY_IMPORT = ("errors", "core", "tools.samples")


def _layer(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def _absolute_imports(path: Path) -> list[str]:
    """The modules ``path`` imports by absolute name (``import x.y``, ``from x.y import z``), anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append(node.module)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_runtime_module_is_in_a_layer():
    """A newcomer finds every module under core/, io/ or tools/ (plus the package's ``__init__`` and ``errors``)."""
    strays = [m for m in _modules("medsam_rt") if _layer(m) not in LAYERS]
    assert not strays, strays


def test_layers_import_only_downward():
    offenders = []
    modules = _modules("medsam_rt")
    for m, path in modules.items():
        allowed = LAYERS[_layer(m)]
        for target, names in _imports("medsam_rt", m, path, lazy=True):
            # `from medsam_rt import x`: the submodule x, or a name of the package's __init__
            layers = {_layer(target)} if target else {_layer(n) if n in modules else "__init__" for n in names}
            if layers - set(allowed):
                offenders.append(f"medsam_rt.{m} imports from medsam_rt.{target or '__init__'}: {', '.join(names)}")
        if "medsam_rt_export" not in allowed and any(_within(n, "medsam_rt_export") for n in _absolute_imports(path)):
            offenders.append(f"medsam_rt.{m} imports the exporter")
    for m, path in _modules("medsam_rt_export").items():
        for name in _absolute_imports(path):
            if _within(name, "medsam_rt") and not any(_within(name, f"medsam_rt.{a}") for a in EXPORT_MAY_IMPORT):
                offenders.append(f"medsam_rt_export.{m} imports {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_import_cycles(package):
    """Module-level imports form no cycle (lazy imports inside functions break none either way)."""
    modules = _modules(package)
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for target, names in _imports(package, m, path, lazy=False):
            for dep in [target, *(f"{target}.{n}" if target else n for n in names)]:
                if dep in modules and dep != m and not m.startswith(dep + "."):
                    graph[m].add(dep)
    done, stack = set(), []

    def walk(m: str) -> None:
        if m in stack:
            cycle = stack[stack.index(m) :] + [m]
            pytest.fail(f"import cycle in {package}: {' -> '.join(cycle)}")
        if m in done:
            return
        stack.append(m)
        for dep in sorted(graph[m]):
            walk(dep)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        walk(m)


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_module_imports_private_names_of_another(package):
    modules = _modules(package)
    offenders = [
        f"{m} imports {target}.{name}"
        for m, path in modules.items()
        for target, names in _imports(package, m, path, lazy=True)
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != m
    ]
    assert not offenders, offenders


def test_model_families_in_one_table():
    pytest.importorskip("torch")
    from medsam_rt_export import checkpoints, hf, lite
    from medsam_rt_export.sources import FAMILIES, family_of

    assert [f.name for f in FAMILIES] == ["litemedsam", "segment-anything-checkpoint", "hf-sam"]
    assert [f.recipe for f in FAMILIES] == [
        lite.LITE_PREPROCESSING["recipe"],
        checkpoints.MEDSAM_ORIGINAL_PREPROCESSING["recipe"],
        hf.RECIPE,
    ]
    cases = {
        "litemedsam": "litemedsam",
        "LiteMedSAM": "litemedsam",
        "medsam_vit_b.pth": "segment-anything-checkpoint",
        "weights.SAFETENSORS": "segment-anything-checkpoint",
        "flaviagiammarino/medsam-vit-base": "hf-sam",
        "./my-sam-dir": "hf-sam",
    }
    assert {model: family_of(model).name for model in cases} == cases
