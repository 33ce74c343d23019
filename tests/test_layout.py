"""The boundaries the layout promises, checked on the source: the gateway reaches the engine only through the
names engine/__init__.py exports."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine_imports(path: Path) -> list[tuple[int, str]]:
    """(line, what) for each import of the engine in a file: 'engine.x' for a submodule, 'engine:X' for a name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "engine"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
            if node.module == "engine":
                found += [(node.lineno, f"engine:{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_the_gateway_uses_only_what_the_engine_exports():
    import engine

    exported = set(engine.__all__)
    wrong = []
    for path in sorted((ROOT / "gateway").glob("*.py")):
        for line, what in engine_imports(path):
            name = what.partition(":")[2]
            if not name or name not in exported:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {what.replace(':', ' import ')}")
    assert not wrong, "the gateway reaches past engine/__init__.py:\n" + "\n".join(wrong)


def test_every_exported_name_resolves():
    import engine

    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
