"""The package's imports form no cycle: calls go downward (modeling -> engine/model/sharding -> config), and
nothing below the user-facing class imports it back. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("internvl_jax", "convert")


def module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}


def imports_of(file: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that `file` imports anywhere (top level or inside functions)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(file, name, set(mods)) for name, file in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_below_the_user_facing_class_imports_it():
    edges = graph()
    users = sorted(m for m, deps in edges.items() if "internvl_jax.modeling" in deps)
    below = [m for m in users if m.startswith(("internvl_jax.engine", "internvl_jax.model.", "internvl_jax.sharding",
                                                 "internvl_jax.planner", "internvl_jax.source", "internvl_jax.export",
                                                 "internvl_jax.checkpoint", "internvl_jax.config", "convert"))]
    assert not below, f"these import internvl_jax.modeling but sit below it: {below}"


def test_the_cycle_finder_finds_cycles():
    """Guard on the test itself: a made-up graph with a cycle is caught, one without is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    edges = graph()
    assert "internvl_jax.engine.generate" in edges["internvl_jax.modeling"]  # the walk sees real imports
    assert "internvl_jax.modeling" in edges["internvl_jax.cli"]  # ... also those inside functions
