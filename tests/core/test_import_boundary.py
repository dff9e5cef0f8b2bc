"""``core`` is the bottom layer: it imports neither ``sweeps`` nor ``analysis`` (nor Ray, nor the
``diffcom`` command that joins them), at run time or in its source."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABOVE_CORE = ("sweeps", "analysis", "ray", "diffcom")


def test_importing_core_loads_no_package_above_it():
    code = (
        "import argparse, sys\n"
        "import core, core.cli, core.train.trainer, core.data, core.features, core.evaluation\n"
        # Adding the core subcommands imports what their arguments need (core.data.mkgformer).
        "core.cli.add_core_commands(argparse.ArgumentParser().add_subparsers())\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ABOVE_CORE!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` runs only when the module is the program, never on import."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def _imported_modules(tree: ast.AST):
    """(line, module) of every import, outside ``__main__`` guards; relative imports skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        stack.extend(ast.iter_child_nodes(node))


def test_no_core_source_imports_a_package_above_core():
    sources = sorted((REPO / "core").rglob("*.py"))
    assert len(sources) > 20  # the walk found the package, not an empty folder
    offending = [
        f"{path.relative_to(REPO)}:{line}: imports {module}"
        for path in sources
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)))
        if module.split(".")[0] in ABOVE_CORE
    ]
    assert offending == []


def test_the_static_check_sees_nested_imports_and_skips_main_guards():
    source = (
        "def f():\n"
        "    from sweeps.study import load_study\n"
        "try:\n"
        "    import analysis.report as report\n"
        "except ImportError:\n"
        "    pass\n"
        "if __name__ == '__main__':\n"
        "    from diffcom.cli import main\n"
    )
    assert sorted(_imported_modules(ast.parse(source))) == [
        (2, "sweeps.study"),
        (4, "analysis.report"),
    ]


def test_the_store_imports_the_standard_library_only():
    # analysis imports runstore on machines without torch: the format must cost nothing more.
    tree = ast.parse((REPO / "runstore" / "__init__.py").read_text())
    modules = {module.split(".")[0] for _, module in _imported_modules(tree)}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules
    code = (
        "import sys, runstore\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy', 'yaml', 'ray', 'pandas', 'core', 'sweeps', 'analysis'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
