"""The package's layers point one way (docs/ARCHITECTURE.md): no module imports one above it, and
every module can be imported first, on its own, without an import cycle."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "palstream"

# Lowest first. A module may import its own layer and the layers below, never one above.
# Every `cli` and `__main__` module is the command-line layer, above all the others.
LAYERS = [
    {"palstream", "errors", "frames"},
    {"storage", "quality", "palettes"},
    {"codec"},
    {"learned", "io"},
    {"writers"},
    {"archive"},
    {"pipeline", "metrics"},
    {"tuner"},
    {"batch"},
    {"catalogue"},
    {"cli"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[-1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if len(parts) > 1 else "palstream"


def _imports(path: Path, module: str):
    """Every palstream module this file imports, at top level or inside a function (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
        else:
            continue
        for target in targets:
            if target == "palstream" or target.startswith("palstream."):
                yield node.lineno, target


MODULES = sorted(_module_name(path) for path in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LEVEL), "add the new package to LAYERS (and to docs/ARCHITECTURE.md)"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, target in _imports(path, module):
            if LEVEL[_layer(target)] > LEVEL[_layer(module)]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} imports {target}")
    assert not upward, "lower layers must not import higher ones:\n" + "\n".join(upward)


def test_every_module_imports_first_in_a_fresh_process():
    """No import cycle: each module, imported first in its own interpreter, loads."""

    def import_alone(module: str) -> str | None:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
        return None if result.returncode == 0 else f"{module}: {result.stderr.strip().splitlines()[-1]}"

    with ThreadPoolExecutor(max_workers=4) as pool:  # each interpreter mostly waits on imports of torch and numba
        failures = [failure for failure in pool.map(import_alone, MODULES) if failure]
    assert not failures, "\n".join(failures)
