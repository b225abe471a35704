"""The layout's walls, read from the source: the platform never imports a task, io/ needs
neither Ray nor torch, only data/ builds Ray datasets, no module imports itself in a circle, and
every import deferred into a function says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "medhier"
PLATFORM = ("io", "data", "train", "infer")
TASKS = ("classify", "plaque")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file (absolute names)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            # `from medhier import storage` imports the module medhier.storage
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return found


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == f"medhier.{p}" or module.startswith(f"medhier.{p}.") for p in packages)


@pytest.mark.parametrize("module", [m for m in MODULES if _in(m, PLATFORM)])
def test_the_platform_never_imports_a_task(module):
    bad = [(line, name) for line, name in _imports(MODULES[module]) if _in(name, TASKS)]
    assert not bad, f"{module} imports a task package: {bad}"


@pytest.mark.parametrize("module", [m for m in MODULES if _in(m, ("io",))])
def test_io_imports_neither_ray_nor_torch(module):
    bad = [(line, name) for line, name in _imports(MODULES[module]) if name.split(".")[0] in ("ray", "torch", "torchvision")]
    assert not bad, f"{module} imports {bad}"


def test_importing_the_platform_loads_no_task_and_io_loads_no_ray_or_torch():
    """What the source says, checked on the interpreter: transitive imports included."""
    code = (
        "import sys, importlib\n"
        f"for m in {[m for m in MODULES if _in(m, ('io',))]!r}: importlib.import_module(m)\n"
        "heavy = sorted({'ray', 'torch'} & set(sys.modules))\n"
        f"for m in {[m for m in MODULES if _in(m, PLATFORM)]!r}: importlib.import_module(m)\n"
        "tasks = sorted(m for m in sys.modules if m.startswith(('medhier.classify', 'medhier.plaque')))\n"
        "print(heavy, tasks)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[] []", out.stdout


def test_a_scoring_run_loads_no_training_or_plotting_libraries():
    """Every model actor (and the ``medhier score`` driver) imports what it unpickles: the task
    object and its modules. Plotting (matplotlib), fitting (scipy.optimize, sklearn) and Ray Train
    cost ~3 s of a nightly run's start-up there (issue 24) and are only needed after training."""
    code = (
        "import sys\n"
        "import medhier.infer.actor, medhier.classify.task, medhier.classify.score, medhier.infer.batch\n"
        "print(sorted({'matplotlib', 'sklearn', 'scipy.optimize', 'ray.train', 'medhier.train.loop'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


RAY_DATASET_MAKERS = ("from_items", "from_arrow", "from_numpy", "from_pandas", "read_parquet", "read_binary_files", "read_images", "range")


@pytest.mark.parametrize("module", [m for m in MODULES if not _in(m, ("data",))])
def test_only_data_builds_ray_datasets(module):
    tree = ast.parse(MODULES[module].read_text())
    calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in RAY_DATASET_MAKERS and ast.unparse(node.func.value) in ("ray.data", "data")]
    assert not calls, f"{module} builds a Ray dataset at lines {calls}: ask medhier.data for it"


def test_no_import_circles():
    graph = {m: {name for _, name in _imports(p, top_level_only=True) if name in MODULES and name != m} for m, p in MODULES.items()}
    # a package's __init__ runs before its modules: importing medhier.x.y imports medhier.x
    for m in MODULES:
        graph[m] |= {parent for parent in (m.rsplit(".", 1)[0],) if parent in MODULES and parent != m}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def _deferred_imports() -> list[tuple[str, int, list[str]]]:
    """Blocks of imports inside functions: (file, first line, the lines around it)."""
    blocks = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            previous = None
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno != previous:
                    if previous is None or node.lineno > previous + 1:
                        blocks.append((module, node.lineno, lines[max(0, node.lineno - 4) : node.lineno]))
                    previous = node.lineno
    return blocks


def test_every_import_deferred_into_a_function_says_why():
    """Imports belong at the top; a heavy one deliberately deferred carries its reason in a
    comment on its line or just above its block."""
    silent = [f"{module}:{line}" for module, line, context in _deferred_imports() if not any("#" in text for text in context)]
    assert not silent, f"deferred imports without a reason: {silent}"


LONG = 60  # lines; a longer function says why in its docstring ("Long: ...")


def test_every_function_over_sixty_lines_says_why_it_is_long():
    unexplained = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LONG:
                if "Long:" not in (ast.get_docstring(node) or ""):
                    unexplained.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not unexplained, f"functions over {LONG} lines without a 'Long:' reason in their docstring: {unexplained}"


def test_the_readme_module_table_names_every_module():
    """The architecture table is the newcomer's map: a module missing from it is invisible."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| package / module | what it owns |"):readme.index("The walls, each kept by")]
    named = set()
    for row in table.strip().splitlines()[2:]:
        cell = row.split("|")[1]
        folder = ""
        for item in (c.strip(" `") for c in cell.split(",")):
            folder = item.rsplit("/", 1)[0] + "/" if "/" in item else folder
            named.add(item if "/" in item else folder + item)
    missing = [m for m, p in MODULES.items() if p.name != "__init__.py"
               and str(p.relative_to(PACKAGE)) not in named and f"{p.parent.name}/" not in named]
    assert not missing, f"README's module table lacks {missing}"
