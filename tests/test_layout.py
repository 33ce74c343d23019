"""The boundaries the layout promises, checked on the source: the gateway reaches the engine only through the
names engine/__init__.py exports."""
from __future__ import annotations

import ast
import subprocess
import sys
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


# What each part may import of the others, as the layout shows it (DESIGN.md): an arrow points one way only.
MAY_NOT_IMPORT = {
    "batching": {"engine", "gateway", "telemetry", "tokenization", "torch"},
    "tokenization": {"engine", "gateway", "telemetry", "torch"},
    "telemetry": {"batching", "engine", "gateway", "tokenization", "torch"},
    "engine": {"gateway"},
    "engine/model": {"engine.pipeline"},
    "engine/placement": {"engine.pipeline"},
}
# The placement package's face and the modules it gathers import no torch, so `strata plan` and its tests start fast;
# the probe, the torch side of a device and the plan built on this machine are imported by name.
TORCH_FREE_PLACEMENT = ["__init__.py", "cost.py", "devices.py", "plan.py", "render.py", "search.py"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _reaches(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


def test_each_part_imports_only_what_sits_below_it():
    wrong = []
    for part, forbidden in MAY_NOT_IMPORT.items():
        for path in sorted((ROOT / part).rglob("*.py")):
            for line, module in imported_modules(path):
                if _reaches(module, forbidden):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(set(wrong)))


def test_the_placement_face_imports_no_torch():
    wrong = [f"engine/placement/{name}:{line}: {module}"
             for name in TORCH_FREE_PLACEMENT
             for line, module in imported_modules(ROOT / "engine" / "placement" / name)
             if _reaches(module, {"torch", "engine.model", "engine.pipeline", "engine.placement.probe",
                                  "engine.placement.local_device", "engine.placement.planning"})
             and not _reaches(module, {"engine.model.weight_formats"})]  # the format table, torch-free
    assert not wrong, "\n".join(wrong)
    code = "import sys, engine.placement, telemetry.tracing; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_strata_command_starts_stages_before_it_imports_torch():
    """`strata` reads its flags and `strata serve` starts its stage processes without torch (engine.pipeline.launch),
    so that the stages' start-up overlaps the server's own import of it; `strata bench` never needs it."""
    code = ("import sys, gateway.cli, engine; engine.start_ahead, engine.add_stage_args; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'engine')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
