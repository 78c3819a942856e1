"""The package layout rules: no import cycle among our modules; importing the library leaves the
process environment alone, and the `faceid` command sets TensorFlow's flags before importing it."""
import ast
import pathlib
import sys

from helpers import REPO, run_code

PACKAGES = ("faceid_keras", "tfds_ms1m", "callbacks")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements that run when the module is imported (not in functions or TYPE_CHECKING)."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):
            pending.extend(getattr(node, "body", []) + getattr(node, "orelse", []) +
                           [n for h in getattr(node, "handlers", []) for n in h.body])
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name, set())
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
            elif node.module and node.level == 0 and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    edges.add(target if target in files else node.module)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_and_the_runtime_context_does_not_import_callbacks():
    graph = _import_graph()
    assert "callbacks.placement" in graph and "faceid_keras.placement" in graph["callbacks.placement"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert not any(target.startswith("callbacks") for target in graph["faceid_keras.placement"])
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself finds cycles


def test_importing_the_library_leaves_the_environment_alone():
    out = run_code(
        """
        import os
        for name in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND"):
            os.environ.pop(name, None)
        import keras, tensorflow, tensorflow_datasets  # what they change is theirs
        before = dict(os.environ)
        import callbacks, faceid_keras, tfds_ms1m
        from faceid_keras import cli, training
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print("changed:", changed)
        """,
        cwd=REPO,
    )
    assert "changed: []" in out


def test_the_faceid_command_sets_tensorflow_flags_first_and_keeps_exported_ones(tmp_path):
    out = run_code(
        f"""
        import os, runpy, sys
        os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
        sys.argv = ["faceid", "--help"]
        try:
            runpy.run_path({str(REPO / "scripts" / "faceid")!r}, run_name="__main__")
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        print("flags:", os.environ["TF_ENABLE_ONEDNN_OPTS"], os.environ["TF_CPP_MIN_LOG_LEVEL"])
        """,
        cwd=tmp_path,
    )
    assert "usage: faceid" in out and "flags: 1 1" in out
    installed = pathlib.Path(sys.executable).parent / "faceid"  # where pip installs scripts
    assert installed.is_file() and "TF_ENABLE_ONEDNN_OPTS" in installed.read_text(), installed
