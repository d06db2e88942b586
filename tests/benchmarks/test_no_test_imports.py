"""The benchmark scripts run without the test suite: none of them may import ``tests``."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def test_benchmarks_do_not_import_the_test_suite():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts
    offenders = {path.name: sorted(m for m in imported_modules(path) if m == "tests" or m.startswith("tests.")) for path in scripts}
    assert {name: modules for name, modules in offenders.items() if modules} == {}
