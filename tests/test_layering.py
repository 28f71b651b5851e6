"""The package's import layering, function length and private-API reaches, read from the source with `ast`.

Floors, top to bottom (docs/architecture.md): a module imports only its own floor or floors below,
no two modules import each other however indirectly (imports inside functions count: they run), and
models import nothing of the project but models and errors. A dependency's private names are reached
only from the one *_internals.py module per dependency. Each check first proves on a synthetic
package that it can fail.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module-path prefix -> floor; the longest matching prefix decides
FLOORS = {
    "pixeldit.cli": 5, "pixeldit.__main__": 5, "pixeldit.jobs": 5, "pixeldit.launchers": 5,
    "pixeldit.platform": 4,
    "pixeldit.parallel": 3,
    "pixeldit.data_pipelines": 2, "pixeldit.evaluation": 2,
    "pixeldit.models": 1, "pixeldit.diffusion": 1, "pixeldit.distributed": 1, "pixeldit.storage": 1,
    "pixeldit.errors": 1, "pixeldit.host": 1, "pixeldit": 1,  # the last: pixeldit/__init__.py, and any new module
}
# models are plain nn.Modules: of the project they see only themselves and the error types
MODELS, MODELS_MAY_IMPORT = "pixeldit.models", ("pixeldit.models", "pixeldit.errors")

MAX_LINES = 60
# function -> why it is one thing although it is long (kept short: split a function rather than list it)
LONG_BUT_ONE_THING: dict[str, str] = {}


# ------------------------------------------------------------------------------------- the checks


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `root`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the project, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return sorted(set(found), key=lambda edge: edge[1])


def import_graph(root: Path, package: str) -> tuple[dict[str, list[tuple[str, int]]], dict[str, Path]]:
    files = modules(root, package)
    return {name: imports(name, path, set(files)) for name, path in files.items()}, files


def with_package_inits(graph):
    """The graph plus what an import runs first: importing a.b.c from outside a.b runs a.b's __init__
    (a package's own modules find it running already)."""
    full = {}
    for name, edges in graph.items():
        inits = {(package, line) for target, line in edges
                 for package in [target.rsplit(".", n)[0] for n in range(1, target.count(".") + 1)]
                 if package in graph and not within(name, [package])}
        full[name] = sorted(set(edges) | inits, key=lambda edge: edge[1])
    return full


def floor(module: str, floors: dict[str, int]) -> int:
    prefixes = [p for p in floors if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no floor: add its package to FLOORS"
    return floors[max(prefixes, key=len)]


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def upward_imports(graph, files, floors, root: Path, models=MODELS, models_may_import=MODELS_MAY_IMPORT) -> list[str]:
    """Imports of a higher floor, and of anything but models and errors from inside models."""
    found = []
    for name, edges in graph.items():
        for target, line in edges:
            where = f"{files[name].relative_to(root)}:{line}"
            if floor(target, floors) > floor(name, floors):
                found.append(f"{where}: {name} (floor {floor(name, floors)}) imports {target} "
                             f"(floor {floor(target, floors)})")
            elif within(name, [models]) and not within(target, models_may_import):
                found.append(f"{where}: {name} is a model and imports {target}")
    return found


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe_cycle(component: list[str], graph, files, root: Path) -> str:
    inside = set(component)
    arrows = [f"{files[name].relative_to(root)}:{line} -> {target}"
              for name in component for target, line in graph[name] if target in inside]
    return "cycle between " + ", ".join(component) + ": " + "; ".join(arrows)


def long_functions(root: Path, package: str, limit: int) -> dict[str, int]:
    """'path::Class.function' -> lines, for every function longer than `limit` lines (nested ones too)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).as_posix()

        def walk(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = f"{prefix}{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > limit:
                        found[f"{relative}::{qualified}"] = lines
                    walk(child, qualified + ".")
                else:
                    walk(child, prefix)

        walk(ast.parse(path.read_text(), str(path)))
    return found


# ------------------------------------------------------------------------------------- the checks can fail


def write_package(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checks_catch_an_upward_import_a_cycle_and_a_model_import(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/models/__init__.py": "from .net import Net\n",
        "pkg/models/net.py": "from ..errors import Bad\nfrom pkg.models import layers\n\n"
                             "def build():\n    from pkg.diffusion import flow\n",
        "pkg/models/layers.py": "import torch\n",
        "pkg/diffusion/__init__.py": "",
        "pkg/diffusion/flow.py": "from pkg import errors\n\ndef lazy():\n    import pkg.data.loader\n",
        "pkg/data/__init__.py": "",
        "pkg/data/loader.py": "from pkg.diffusion.flow import lazy\nfrom pkg.top import verb\n",
        "pkg/top.py": "from . import data\n",
    })
    floors = {"pkg": 1, "pkg.models": 1, "pkg.diffusion": 1, "pkg.data": 2, "pkg.top": 5}
    graph, files = import_graph(tmp_path, "pkg")
    assert graph["pkg.models.net"] == [("pkg.errors", 1), ("pkg.models.layers", 2), ("pkg.diffusion.flow", 5)]
    assert graph["pkg.diffusion.flow"] == [("pkg.errors", 1), ("pkg.data.loader", 4)]
    assert graph["pkg.top"] == [("pkg.data", 1)]
    assert upward_imports(graph, files, floors, tmp_path, "pkg.models", ("pkg.models", "pkg.errors")) == [
        "pkg/data/loader.py:2: pkg.data.loader (floor 2) imports pkg.top (floor 5)",
        "pkg/diffusion/flow.py:4: pkg.diffusion.flow (floor 1) imports pkg.data.loader (floor 2)",
        "pkg/models/net.py:5: pkg.models.net is a model and imports pkg.diffusion.flow",
    ]
    assert cycles(graph) == [["pkg.data.loader", "pkg.diffusion.flow"]]
    del graph["pkg.data.loader"]
    assert cycles(graph) == []
    # a package's __init__ that imports its way back to the importer is a cycle too
    graph["pkg.diffusion"] = [("pkg.models.net", 1)]
    assert cycles(graph) == []
    assert cycles(with_package_inits(graph)) == [["pkg.diffusion", "pkg.models", "pkg.models.net"]]


def test_long_functions_are_found_nested_and_in_classes(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    write_package(tmp_path, {"pkg/a.py": f"def short():\n{body}\n"
                                         f"class C:\n    def long(self):\n    {body.replace(chr(10), chr(10) + '    ')}"
                                         f"    pass\n"})
    assert long_functions(tmp_path, "pkg", 60) == {"pkg/a.py::C.long": 61}


# ------------------------------------------------------------------------------------- the package


def test_no_import_runs_up_a_floor_and_models_import_only_models_and_errors():
    graph, files = import_graph(ROOT, "pixeldit")
    assert [p for p in FLOORS if not any(within(m, [p]) for m in graph)] == []  # a floor of nothing: drop it
    found = upward_imports(graph, files, FLOORS, ROOT)
    assert not found, "\n".join(found)


def test_no_import_cycles():
    graph, files = import_graph(ROOT, "pixeldit")
    graph = with_package_inits(graph)
    found = [describe_cycle(c, graph, files, ROOT) for c in cycles(graph)]
    assert not found, "\n".join(found)


def test_no_long_functions():
    found = long_functions(ROOT, "pixeldit", MAX_LINES)
    over = [f"{f}: {n} lines" for f, n in found.items() if f not in LONG_BUT_ONE_THING]
    assert not over, f"over {MAX_LINES} lines (split, or list in LONG_BUT_ONE_THING with the reason):\n" + "\n".join(over)
    assert [f for f in LONG_BUT_ONE_THING if f not in found] == []  # an entry outlives its function: drop it


# ------------------------------------------------------------------------------------- private APIs


def private_reaches(root: Path, package: str) -> list[str]:
    """Where a dependency's private name (a `_name` after its top-level package) is imported or reached
    through the dependency's module, outside the modules named *_internals.py that list each with the
    reason it is needed. (A private attribute of an object, `engine._config`, is beyond this check.)"""
    import sys

    found = set()
    for path in sorted((root / package).rglob("*.py")):
        if path.stem.endswith("_internals"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        used = []  # (line, dotted name of a dependency's module or attribute)
        aliases = {}  # local name -> the dotted name it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    used.append((node.lineno, a.name))
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    used.append((node.lineno, f"{node.module}.{a.name}"))
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain a.b._c, once
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.insert(0, value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    used.append((node.lineno, ".".join([aliases[value.id], *chain])))
        for line, name in used:
            top, *rest = name.split(".")
            if top in sys.stdlib_module_names | {package, "__future__"}:
                continue
            if any(part.startswith("_") and not part.startswith("__") for part in rest):
                found.add(f"{path.relative_to(root)}:{line}: {name}")
    return sorted(found, key=lambda text: (text.split(":")[0], int(text.split(":")[1])))


def test_private_reaches_are_found_outside_the_internals_modules(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "import torch\nimport torch.distributed as dist\nfrom deepspeed.utils import zero_to_fp32\n"
                           "import os\n\ntorch.cpu._is_amx()\ndist._functional.x\nzero_to_fp32._get_fp32()\n"
                           "os._exit(0)\ntorch.nn.Linear\nself._own\n",
        "pkg/b.py": "from torch.distributed._shard import Shard\nfrom torch.utils import _pytree\n",
        "pkg/torch_internals.py": "from torch._utils import x\ntorch._foreach_lerp_\n",
    })
    assert private_reaches(tmp_path, "pkg") == [
        "pkg/__init__.py:6: torch.cpu._is_amx", "pkg/__init__.py:7: torch.distributed._functional.x",
        "pkg/__init__.py:8: deepspeed.utils.zero_to_fp32._get_fp32",
        "pkg/b.py:1: torch.distributed._shard.Shard", "pkg/b.py:2: torch.utils._pytree"]


def test_private_apis_of_dependencies_are_reached_only_from_the_internals_modules():
    found = private_reaches(ROOT, "pixeldit")
    assert not found, "\n".join(found)
