"""The house rules on imports (../shared/DESIGN.md): curate/ and train/ never import each other or
pipelines/; no import circle inside pipelines/; stage runners import the framework, never each
other, run.py or the entry points. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("curate", "pipelines", "train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (a name imported from a package resolves to its
    submodule when there is one)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES and name != me:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import circle among `nodes`, or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour and (found := visit(m)):
                return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(nodes):
        if n not in colour and (found := visit(n)):
            return found
    return None


def test_library_packages_never_import_the_wiring_or_each_other():
    graph = _graph()
    bad = [(m, i) for m, imps in graph.items() for i in imps
           if (m.startswith("curate") and i.split(".")[0] in ("pipelines", "train"))
           or (m.startswith("train") and i.split(".")[0] in ("curate", "pipelines"))]
    assert bad == []


def test_no_import_circle_inside_pipelines():
    graph = _graph()
    assert _cycle(graph, {m for m in graph if m.startswith("pipelines")}) is None


def test_stage_runners_import_only_the_framework():
    graph = _graph()
    runners = {m for m in graph if m.startswith("pipelines.stages.")}
    assert {m.rpartition(".")[2] for m in runners} >= {
        "ingest", "hashdedup", "embed", "dedup", "decontaminate", "calibrate", "cluster", "balance", "shards",
        "report", "train", "evaluate"}
    framework = {"pipelines." + n for n in ("framework", "manifest", "aligned", "embedding", "copy_images",
                                            "copy_verify", "executors", "config", "synth", "synth_pool")}
    allowed = framework | {"pipelines", "pipelines.stages"}
    bad = {m: sorted(i for i in graph[m] if i.startswith("pipelines") and i not in allowed) for m in runners}
    assert {m: b for m, b in bad.items() if b} == {}
    entry = {m: sorted(graph[m] & {"pipelines.cli", "pipelines.demo"}) for m in ("pipelines.cli", "pipelines.demo")}
    assert entry == {"pipelines.cli": ["pipelines.demo"], "pipelines.demo": []}  # the CLI starts the demo


def test_the_checker_sees_a_circle():
    """The cycle finder itself: a planted circle is found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    graph["c"] = set()
    assert _cycle(graph, set(graph)) is None
