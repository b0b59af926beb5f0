"""The house rules of the layout, read from the source: project files import each other at the top only, and the
imports between them form no circle (model <- l0 <- checkpoint <- convert <- report <- train; data, dro apart).

    pytest -q tests/test_layout.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {p.stem for p in ROOT.glob("*.py")}


def imports(path: Path, project=PROJECT) -> tuple[set, list]:
    """(project modules imported at module level, [(line, module)] imported inside a function or class)."""
    tree = ast.parse(path.read_text())

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name.split(".")[0] for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return [node.module.split(".")[0]]
        return []

    top = {n for node in tree.body for n in names(node) if n in project}
    nested = sorted({(inner.lineno, n) for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     for inner in ast.walk(node) for n in names(inner) if n in project})
    return top, nested


def find_circle(graph: dict) -> list | None:
    """A path m -> ... -> m in {module: modules it imports}, or None."""
    state = {}  # "open" while on the depth-first stack, "done" after

    def visit(m, path):
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        if state.get(m) is None:
            state[m] = "open"
            for dep in sorted(graph.get(m, ())):
                if found := visit(dep, path + [m]):
                    return found
            state[m] = "done"
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_no_function_level_imports_between_project_files():
    found = {p.name: imports(p)[1] for p in ROOT.glob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_import_circles():
    graph = {p.stem: imports(p)[0] - {p.stem} for p in ROOT.glob("*.py")}
    assert {"model", "l0", "checkpoint", "convert", "report", "train", "data", "prepare", "dro"} <= graph.keys()
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
    assert "convert" not in graph["model"] and "train" not in graph["report"]


def test_the_checks_find_what_they_look_for(tmp_path):
    (tmp_path / "a.py").write_text("import b\nfrom c import x\n\n\ndef f():\n    import b\n")
    assert imports(tmp_path / "a.py", project={"a", "b", "c"}) == ({"b", "c"}, [(6, "b")])
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
