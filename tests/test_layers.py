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


@pytest.mark.parametrize("path", sorted((SRC / "tasks").rglob("*.py")), ids=lambda p: p.name)
def test_tasks_import_nothing_above_them(path):
    assert upward_imports(path) == []


def test_spec_imports_nothing_from_thinkscale():
    assert [m for m, _, _ in imports(SRC / "spec.py") if m[0] == "thinkscale"] == []


@pytest.mark.parametrize("relative", [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))])
def test_no_private_name_crosses_a_package(relative):
    assert private_crossings(SRC / relative) == []
