"""The package's shape, checked on its source: imports only go down (the import graph of `circuits` has no
cycle), `circuits` never imports `tasks`, and TransformerLens / Hugging Face internals (the bridge's,
and every import of transformers) stay in `circuits/models/`. Run alone:
`python -m pytest tests/test_layering.py`."""

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "circuits"
# The rows of docs/design.md, section 1: a module may import its own row or the rows before it.
LAYERS = [
    ["errors", "textfiles", "folders", "quadrature", "distributed", "settings"],
    ["models"],
    ["data", "metrics", "spans", "task", "baseline"],
    ["selection", "graph", "span_graph"],
    ["sources"],
    ["intervention"],
    ["attribution"],
    ["evaluation", "pictures"],
    ["neurons", "steering", "testing"],
    ["pipeline", "cli", "__main__"],
]
INTERNALS = re.compile(r"_original_component|original_model|component_mapping|\.bridge\.|hook_dict")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Modules of this repository that `path` imports at run time (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if _is_module(full) else node.module)
    return {name for name in found if name.split(".")[0] in ("circuits", "tasks", "circuits_tasks")}


def _import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        graph.add_node(_module(path))
        for target in _imports(path):
            if target != _module(path):
                graph.add_edge(_module(path), target)
    return graph


def _row(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__ re-exports the public API
        return len(LAYERS)
    return next(i for i, row in enumerate(LAYERS) if parts[1] in row)


def test_imports_only_go_down():
    graph = _import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:3]}"
    upward = [(a, b) for a, b in graph.edges if b.startswith("circuits") and _row(b) > _row(a)]
    assert not upward, f"imports from a higher layer: {upward}"


def test_circuits_never_imports_tasks():
    graph = _import_graph()
    assert not [(a, b) for a, b in graph.edges if b.startswith(("tasks", "circuits_tasks"))]


def test_transformers_is_imported_only_by_the_models_package():
    """Hugging Face internals (attention registries, caches, modules) stay behind the adapter; outside it
    only `circuits/testing.py` imports transformers, for the config classes of its tiny models."""
    allowed = {PACKAGE / "testing.py"}
    leaks = [
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if "models" not in path.relative_to(PACKAGE).parts and path not in allowed
        if re.search(r"^\s*(from|import) transformers\b", path.read_text(), re.M)
    ]
    assert not leaks


def test_bridge_internals_stay_in_the_models_package():
    leaks = [
        f"{path.relative_to(ROOT)}:{i}"
        for folder in ("circuits", "tasks", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if "models" not in path.relative_to(ROOT).parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert not leaks


def test_the_installed_packages_are_the_folders():
    """pyproject.toml lists the packages (tasks/ is installed as circuits_tasks): every folder of the
    package with an __init__.py is listed, and nothing else."""
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    assert block is not None
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    folders = {_module(init) for init in PACKAGE.rglob("__init__.py")} | {"circuits_tasks"}
    assert listed == folders
