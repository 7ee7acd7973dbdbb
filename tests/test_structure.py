"""The shape of the package: module imports form no cycle, and no module or function outgrows a reader
(400 lines a module, 80 a function)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxrlhf"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def top_level_imports(name: str) -> set[str]:
    """The jaxrlhf modules `name` imports when it is imported (imports inside functions run later)."""
    tree = ast.parse(MODULES[name].read_text())
    targets = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {target for target in targets if target in MODULES and target != name}


def test_the_import_graph_has_no_cycle():
    graph = {name: top_level_imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            if not (name.startswith(target + ".") and MODULES[target].name == "__init__.py"):  # a package's own init
                visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_readable(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {length} lines"


def test_the_packages_import_each_other_in_one_direction():
    """rl/ (step 3) and steps/ (steps 1, 2, DPO) share code only through modules below both."""

    def package(name):
        parts = name.split(".")
        return parts[1] if len(parts) > 2 or MODULES[name].name == "__init__.py" and len(parts) == 2 else None

    edges = {
        (package(name), package(target))
        for name in MODULES
        for target in top_level_imports(name)
        if package(name) and package(target) and package(name) != package(target)
    }
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not cycles, f"packages importing each other: {cycles}"
