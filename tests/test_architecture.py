"""Imports point down the layers (docs/ARCHITECTURE.md): hardware and model facts -> budget -> llama.cpp
loading and the engine's settings -> quantize pipeline | launch | engine -> gateway | load test -> CLI.

Each module belongs to the group with the longest matching prefix. A module may import its own group and any
group of a lower layer; groups on one layer never import each other, nor do launch and gateway, and no chain
of imports comes back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "quantize", "loadtest")

# Bottom to top; each layer is a tuple of groups, each group a tuple of module prefixes.
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("server.hardware", "quantize.model", "quantize.bundled", "server"),),  # hardware and model facts
    (("quantize.budget",),),  # memory models, auto level
    (("server.llama",), ("server.engine.config",)),  # llama.cpp loading | the engine's settings
    (("quantize",), ("server.launch",), ("server.engine",)),  # quantize pipeline | launch | engine
    # gateway | load test | operator checks | offline bundle
    (("server.gateway",), ("loadtest",), ("server.ops",), ("server.bundle",)),
    (("server.cli",),),  # the command line
)
# Not next to each other in the layers, and still never to meet: they meet in settings the CLI builds.
APART = {("server.gateway", "server.launch"), ("server.launch", "server.gateway")}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The edgeserve modules a file imports (at the top or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def group_of(module: str) -> tuple[int, str]:
    """(layer, prefix) of the group whose prefix matches `module` longest."""
    matches = [(len(prefix), layer, prefix) for layer, groups in enumerate(LAYERS) for group in groups
               for prefix in group if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is on no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    _, layer, prefix = max(matches)
    return layer, next(g[0] for g in LAYERS[layer] if prefix in g)


def test_imports_point_down_the_layers() -> None:
    known = modules()
    wrong = []
    for module, path in sorted(known.items()):
        layer, group = group_of(module)
        for target in sorted(imports(path, known)):
            t_layer, t_group = group_of(target)
            if t_layer > layer or (t_layer == layer and t_group != group) or (group, t_group) in APART:
                wrong.append(f"{module} ({group}) imports {target} ({t_group})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_layers_are_the_ones_documented() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("<!-- layers -->")[1]
    for groups in LAYERS:
        for group in groups:
            for prefix in group:
                assert f"`{prefix}`" in block, f"docs/ARCHITECTURE.md does not place {prefix}"
