"""The layering of docs/architecture.md, checked on the source: the package's import graph has no circle,
nothing below ``cli/`` imports ``cli/``, and the core imports nothing of the package but itself and the
typed-section machinery (no NeMo, Lightning, Hydra, no config)."""
import ast
import os
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "nemo_aligner_draft"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph():
    """module -> the package modules it imports (module-level and inside functions: both are dependencies)."""
    modules = {}
    for root, dirs, files in os.walk(os.path.join(REPO, PACKAGE)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                modules[_module_name(path)] = path
    graph = defaultdict(set)
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import a.b.c` depends on the deepest module that exists
                    t = t.rpartition(".")[0]
                if t.startswith(PACKAGE) and t != module:
                    graph[module].add(t)
    return modules, graph


def _cycles(nodes, graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def _within(module: str, part: str) -> bool:
    prefix = f"{PACKAGE}.{part}"
    return module == prefix or module.startswith(prefix + ".")


def test_the_import_graph_has_no_circle():
    modules, graph = import_graph()
    assert len(modules) > 40 and sum(len(v) for v in graph.values()) > 60, "the scan sees the package"
    # a package's __init__ re-exporting its own modules is not a circle of design: leave those edges out
    edges = {m: {t for t in ts if not (modules[t].endswith("__init__.py") and m.startswith(t + "."))}
             for m, ts in graph.items()}
    assert _cycles(modules, edges) == []


def test_nothing_below_cli_imports_cli():
    _, graph = import_graph()
    offenders = sorted((m, t) for m, ts in graph.items() for t in ts if _within(t, "cli") and not _within(m, "cli"))
    assert offenders == []


def test_the_core_imports_only_itself_and_the_typed_sections():
    modules, graph = import_graph()
    allowed = {f"{PACKAGE}.typed", f"{PACKAGE}.core"}
    offenders = sorted((m, t) for m, ts in graph.items() if _within(m, "core") for t in ts
                       if not (_within(t, "core") or t in allowed))
    assert offenders == []
    foreign = []
    for m, path in modules.items():
        if _within(m, "core"):
            for node in ast.walk(ast.parse(open(path).read())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                foreign += [(m, n) for n in names if n.split(".")[0] in ("nemo", "lightning", "pytorch_lightning",
                                                                          "hydra", "omegaconf", "megatron")]
    assert foreign == []


def test_the_check_can_fail():
    """The cycle finder finds a planted circle (so an empty result above means something)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph.keys(), graph) == [["a", "b", "c"]]
