"""One meaning per name: no module is imported under another module's name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("pipeline", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))
MODULES = {p.stem for p in (ROOT / "pipeline").rglob("*.py") if p.stem != "__init__"}


def test_no_module_is_imported_under_another_modules_name():
    wrong = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    real = alias.name.rsplit(".", 1)[-1]
                    if alias.asname in MODULES and alias.asname != real:
                        wrong.append(f"{path.relative_to(ROOT)}: {real} as {alias.asname}")
    assert wrong == []
