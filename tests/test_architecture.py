"""The package's layers (docs/architecture.md) as a test: every import inside cssl_ray points down.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts
as much as one at the top of a file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cssl_ray"

# Lowest first. A module may import from its own layer and from any layer below it, never above.
LAYERS: list[tuple[str, ...]] = [
    ("config",),
    ("data", "models"),
    ("method", "baselines"),
    ("evaluation",),
    ("run",),
    ("tracking",),
    ("distributed",),
    ("experiments",),
    ("train", "tune", "ablate", "report", "predict", "demo"),  # the python -m entry points
]
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}
MAX_LINES = 400


def _part(module: str) -> str:
    """``cssl_ray.run.loop`` -> ``run``; ``cssl_ray.config`` -> ``config``."""
    return module.split(".")[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every cssl_ray import in one file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "cssl_ray":  # from cssl_ray import x: x is the module
                found += [(node.lineno, f"cssl_ray.{a.name}") for a in node.names]
            elif module.startswith("cssl_ray."):
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cssl_ray.")]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_has_a_layer():
    parts = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert parts == set(LEVEL), f"parts without a layer: {sorted(parts - set(LEVEL))}; layers without a part: {sorted(set(LEVEL) - parts)}"


def test_imports_point_down():
    upward = []
    for path in _sources():
        own = LEVEL[_part(_module_name(path))]
        for line, module in _imports(path):
            if LEVEL[_part(module)] > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} (layer {LEVEL[_part(module)]} > {own})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {_module_name(p): {m for _, m in _imports(p)} for p in _sources()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_files_fit_in_a_head():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split by responsibility):\n" + "\n".join(long)
