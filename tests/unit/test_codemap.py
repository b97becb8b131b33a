"""The package explains itself: a code map with one line per module (in pipeline/__init__.py
and the README, the same), no import cycles, and pure packages that read nothing of the host.
The tests share only tests/support/: no test file or benchmark imports (or runs) a test file."""

import ast
import re
from pathlib import Path

import pipeline

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
ENTRY = re.compile(r"^  (\S+\.py) +(\S.*)$", re.M)


def modules() -> list[str]:
    """Every module but the package's own __init__.py, which holds the map."""
    paths = (str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    return sorted(path for path in paths if path != "__init__.py")


def code_map(text: str) -> list[tuple[str, str]]:
    return ENTRY.findall(text)


def readme_map() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Code map", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]


def test_the_code_map_names_every_module_once():
    mapped = [path for path, _ in code_map(pipeline.__doc__)]
    assert sorted(mapped) == modules()


def test_the_readme_shows_the_same_code_map():
    assert code_map(readme_map()) == code_map(pipeline.__doc__)


# ------------------------------------------------------------------ imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules path imports, at any depth (function-level imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            levels = package.split(".")
            base = levels[: len(levels) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def unit(module: str) -> str:
    """A subpackage counts as one unit (pipeline.policy), a root module as itself."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                other = stack.pop()
                group.append(other)
                if other == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_no_package_imports_one_that_imports_it_back():
    """policy/ must not import dns/, which imports policy/ (and so on for every package)."""
    units: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        units.setdefault(unit(module), set()).update(
            unit(other) for other in imported if unit(other) != unit(module))
    assert cycles(units) == []


def test_the_pure_packages_import_nothing_that_reads_the_host():
    impure = {"pipeline.kernel", "pipeline.stages", "pipeline.loop", "pipeline.livepolicy",
              "pipeline.startup", "pipeline.audit.store"}
    for module, imported in import_graph().items():
        if unit(module) in ("pipeline.policy", "pipeline.dns"):
            assert not {unit(other) for other in imported} & impure, module


# ------------------------------------------------------------------ the tests' own imports

TEST_MODULE = re.compile(r"^tests(\.\w+)*\.test_\w+$")  # a test file run by name: python -m


def uses_of_test_files(path: Path) -> list[str]:
    """The test files path imports (any form, at any depth) or names for `python -m`."""
    used = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if TEST_MODULE.match(node.value) else []
        else:
            continue
        used += [name for name in names if name.rpartition(".")[2].startswith("test_")]
    return sorted(set(used))


def test_no_test_file_or_benchmark_uses_a_test_file():
    """What tests share lives in tests/support/; a test file is a leaf, so moving or
    renaming one breaks nothing else."""
    paths = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
    offenders = [f"{p.relative_to(ROOT)} uses {', '.join(used)}"
                 for p in paths if (used := uses_of_test_files(p))]
    assert not offenders, "\n".join(offenders)
