"""The layering, read from the source with `ast`: tasks imports nothing above it, spec nothing of
thinkscale, and no private name crosses a package boundary (imported from another package, in any file;
an attribute reached through a module, `sft._name`, is not seen)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "thinkscale"
ABOVE_TASKS = {"reflect", "serve", "train", "commands", "bench", "pipeline"}


def imports(path: Path, src: Path = SRC) -> list[tuple[tuple[str, ...], str | None, int]]:
    """(absolute module path, imported name or None, line) of every import in the file, function bodies
    included; relative imports are resolved against the file's package (`src` is the thinkscale folder)."""
    package = path.relative_to(src.parent).with_suffix("").parts[:-1]  # ("thinkscale", "tasks")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(tuple(alias.name.split(".")), None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = base + (tuple(node.module.split(".")) if node.module else ())
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def package_of(parts: tuple[str, ...], src: Path = SRC) -> str | None:
    """The thinkscale package of a module path ("tasks" for thinkscale.tasks.gym), "" for thinkscale itself
    and its top-level modules, None outside thinkscale."""
    if not parts or parts[0] != "thinkscale":
        return None
    return parts[1] if len(parts) > 1 and (src / parts[1]).is_dir() else ""


def upward_imports(path: Path, src: Path = SRC) -> list[str]:
    return [f"{'.'.join(m)} {name or ''}".strip() for m, name, _ in imports(path, src)
            if package_of(m, src) in ABOVE_TASKS or (package_of(m, src) == "" and name in ABOVE_TASKS)]


def private_crossings(path: Path, src: Path = SRC) -> list[str]:
    own = package_of(path.relative_to(src.parent).with_suffix("").parts, src)
    crossing = []
    for module, name, line in imports(path, src):
        target = package_of(module, src)
        if target is None or target == own:
            continue
        if any(part.startswith("_") and not part.startswith("__") for part in module + ((name,) if name else ())):
            crossing.append(f"{path.name}:{line} {'.'.join(module)} {name or ''}".strip())
    return crossing


def test_the_checks_find_what_they_look_for(tmp_path):
    src = tmp_path / "thinkscale"
    for package in ("tasks", "reflect", "serve"):
        (src / package).mkdir(parents=True)
    bad = src / "tasks" / "bad.py"
    bad.write_text("import os\nfrom . import grading\nfrom ..spec import parse_spec\n"
                   "def f():\n    from ..reflect.generate import _eos_ids\n    import thinkscale.serve.app\n"
                   "    from thinkscale import reflect\n    from ._verify_worker import main\n")
    assert upward_imports(bad, src) == ["thinkscale.reflect.generate _eos_ids", "thinkscale.serve.app",
                                        "thinkscale reflect"]
    assert private_crossings(bad, src) == ["bad.py:5 thinkscale.reflect.generate _eos_ids"]
    (src / "spec.py").write_text("")
    assert imported_packages("tasks", src) == {"spec": ["tasks/bad.py:3"], "reflect": ["tasks/bad.py:5", "tasks/bad.py:7"],
                                               "serve": ["tasks/bad.py:6"]}


@pytest.mark.parametrize("path", sorted((SRC / "tasks").rglob("*.py")), ids=lambda p: p.name)
def test_tasks_import_nothing_above_them(path):
    assert upward_imports(path) == []


def test_spec_imports_nothing_from_thinkscale():
    assert [m for m, _, _ in imports(SRC / "spec.py") if m[0] == "thinkscale"] == []


@pytest.mark.parametrize("relative", [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))])
def test_no_private_name_crosses_a_package(relative):
    assert private_crossings(SRC / relative) == []


# ----------------------------------------------------------------------------- the package graph

BELOW_ALL = {"tasks", "relax"}  # the two foundations: neither imports the model, serving, training or tools
TOOLS = {"reflect", "serve", "train", "commands", "bench", "pipeline"}


def runtime_imports(path: Path, src: Path = SRC) -> list[tuple[tuple[str, ...], str | None, int]]:
    """`imports` without those under `if TYPE_CHECKING:` (annotations only: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
    kept = {node.lineno for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only}
    return [item for item in imports(path, src) if item[2] in kept]


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """thinkscale module -> the thinkscale modules it imports at run time (function bodies included; a
    package's own __init__ is not counted as a dependency of its submodules)."""
    modules = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, alias, _ in runtime_imports(path, src):
            full = ".".join(module)
            if alias and f"{full}.{alias}" in modules:
                deps.add(f"{full}.{alias}")
            elif full in modules:
                deps.add(full)
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_checks_find_what_they_look_for(tmp_path):
    src = tmp_path / "thinkscale"
    (src / "reflect").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "reflect" / "__init__.py").write_text("from .a import f\n")
    (src / "reflect" / "a.py").write_text("def f():\n    from .b import g\n")
    (src / "reflect" / "b.py").write_text("from .a import f\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from .c import h\n")
    (src / "reflect" / "c.py").write_text("from .b import g\n")
    graph = module_graph(src)
    assert graph["thinkscale.reflect.b"] == {"thinkscale.reflect.a"}  # the TYPE_CHECKING import is not run
    assert circles(graph) == [["thinkscale.reflect.a", "thinkscale.reflect.b"]]


def test_no_import_circle():
    assert circles(module_graph()) == []


@pytest.mark.parametrize("package", sorted(BELOW_ALL))
def test_the_foundations_import_no_tool(package):
    upward = [f"{path.relative_to(SRC)}:{line} {'.'.join(module)}"
              for path in sorted((SRC / package).rglob("*.py")) for module, name, line in imports(path)
              if package_of(module) in TOOLS or (package_of(module) == "" and name in TOOLS)]
    assert upward == []


def test_only_the_bench_command_reaches_bench():
    """Only `thinkscale bench` (commands/bench.py, by module name) and bench itself use bench."""
    users = sorted({str(path.relative_to(SRC)) for path in SRC.rglob("*.py") if path.parent.name != "bench"
                    for module, name, _ in imports(path)
                    if package_of(module) == "bench" or (package_of(module) == "" and name == "bench")})
    assert users == []


# the README's Layout table: what each package may import ("" = the top-level modules spec.py and cli.py)
ALLOWED = {
    "relax": {"spec"},
    "tasks": {"spec"},
    "reflect": {"tasks", "spec"},
    "train": {"reflect", "relax", "tasks", "spec"},
    "serve": {"reflect", "tasks", "spec"},
    "pipeline": {"train", "reflect", "relax", "tasks", "spec"},
    "commands": {"pipeline", "serve", "train", "reflect", "relax", "tasks", "spec", "cli"},
    "bench": {"commands", "pipeline", "serve", "train", "reflect", "relax", "tasks", "spec", "cli"},
}


def imported_packages(package: str, src: Path = SRC) -> dict[str, list[str]]:
    """Each thinkscale package (or top-level module: spec, cli) `package` imports -> where."""
    found: dict[str, list[str]] = {}
    for path in sorted((src / package).rglob("*.py")):
        for module, name, line in imports(path, src):
            target = package_of(module, src)
            if target is None or target == package:
                continue
            if target == "":  # thinkscale itself: a top-level module or a package named by `from thinkscale import X`
                target = name if name is not None and ((src / name).is_dir() or (src / f"{name}.py").is_file()) \
                    else (module[1] if len(module) > 1 else "thinkscale")
            found.setdefault(target, []).append(f"{path.relative_to(src)}:{line}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_the_layout_allows(package):
    extra = {target: where for target, where in imported_packages(package).items() if target not in ALLOWED[package]}
    assert extra == {}


def test_algorithm_runtimes_use_the_engine_only_through_its_protocol():
    """Every `engine.X` / `self.engine.X` an algorithm reads is a member of `algorithms.base.Engine`."""
    from thinkscale.relax.algorithms.base import Engine

    members = set(Engine.__annotations__) | {n for n in vars(Engine) if not n.startswith("_")}
    used = {}
    for path in sorted((SRC / "relax" / "algorithms").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("engine", "self.engine"):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
    assert len(used) >= 8  # the check reads what it should
    assert {name: where for name, where in used.items() if name not in members} == {}
