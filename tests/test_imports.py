"""The import graph of psld_fast is a DAG: no module imports one that (directly or not) imports it.

Read from the source with ``ast``, counting every import, at module level or inside a function
(a function-level import is how a cycle usually hides).  A cycle means neither module can be read or
tested alone.
"""
from __future__ import annotations

import ast
import pathlib

import psld_fast

PKG_DIR = pathlib.Path(psld_fast.__file__).parent
# Cycles another change removes; each entry must name why it is tolerated here.
KNOWN_CYCLES: set = set()

#: The architecture as layers (README "Layout"): a module imports only from its own layer or lower
#: ones; the package facade ``psld_fast/__init__.py`` re-exports the public names and is left out.
LAYERS = {
    0: "util", 1: "core", 2: "kernels", 3: "models", 4: "runner", 5: "workflows", 6: "cli",
}
LAYER_OF = {
    **dict.fromkeys(["_io", "guards", "peers"], 0),
    **dict.fromkeys(["sde", "grids", "rng", "program", "conjugate", "multistep", "samplers", "reference", "exact"], 1),
    **dict.fromkeys(["ops", "triton_step"], 2),
    **dict.fromkeys(["models", "datasets", "nets", "nets.ncsnpp", "nets.small", "checkpoint", "lift"], 3),
    **dict.fromkeys(["runner", "graphs", "api", "k_sampling"], 4),
    **dict.fromkeys(["generate", "distributed", "fid", "sweep", "metrics", "images", "plotting", "train",
                     "learned", "tune"], 5),
    **dict.fromkeys(["cli", "cli_common", "cli_generate", "cli_train", "__main__"], 6),
}


def _module_name(path: pathlib.Path) -> str:
    parts = ["psld_fast", *path.relative_to(PKG_DIR).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    # compiled extensions (psld_fast._C): leaves, not names of their package
    extensions = {_module_name(p.with_name(p.name.split(".")[0] + ".py"))
                  for p in list(PKG_DIR.rglob("*.so")) + list(PKG_DIR.rglob("*.pyd"))}

    def resolve(name: str) -> str | None:
        if name in extensions:
            return None
        while name and name not in modules:  # psld_fast.a.b where b is a name in module a
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "psld_fast"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "psld_fast":
                    root = node.module
                else:
                    continue
                targets = [f"{root}.{a.name}" for a in node.names]  # a name, else its module
            for target in targets:
                dep = resolve(target)
                if dep is not None and dep != name:
                    graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert {"psld_fast.api", "psld_fast.graphs", "psld_fast.runner"} <= set(graph)
    cycles = [c for c in _cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_runner_layer_imports_downwards():
    """sample() (api) and the CUDA-graph runner (graphs) share runner.py; runner imports neither."""
    graph = _import_graph()
    assert "psld_fast.runner" in graph["psld_fast.api"]
    assert "psld_fast.runner" in graph["psld_fast.graphs"]
    assert not graph["psld_fast.runner"] & {"psld_fast.api", "psld_fast.graphs"}
    assert "psld_fast.api" not in graph["psld_fast.graphs"]


def test_the_detector_sees_a_function_level_cycle(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = _import_graph()
    short = {m: m[len("psld_fast."):] for m in graph if m != "psld_fast"}
    missing = sorted(v for v in short.values() if v not in LAYER_OF)
    assert not missing, f"modules without a layer in LAYER_OF (and the README's Layout): {missing}"
    upward = []
    for m, deps in graph.items():
        if m == "psld_fast":
            continue
        for d in deps - {"psld_fast"}:
            if LAYER_OF[short[d]] > LAYER_OF[short[m]]:
                upward.append(f"{short[m]} ({LAYERS[LAYER_OF[short[m]]]}) -> {short[d]} ({LAYERS[LAYER_OF[short[d]]]})")
    assert not upward, "imports against the layering: " + "; ".join(sorted(upward))
