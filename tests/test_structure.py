"""The package's shape: no import cycles (between modules or between subpackages, counting
imports inside functions too), the kernels below everything, and no import that changes the
process (umask) or switches modes behind the caller's back."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import moekit

ROOT = Path(moekit.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The moekit modules ``name`` imports anywhere in its file (``from A import b`` counts as
    ``A.b`` where that is a module, else as ``A``)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    graph = {k: v for k, v in GRAPH.items() if k != "moekit"}  # the root only re-exports
    assert _cycles(graph) == []


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_subpackages():
    units: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        if name in ("moekit", "moekit.__main__"):
            continue
        units.setdefault(_unit(name), set()).update(_unit(d) for d in deps if _unit(d) != _unit(name))
    assert _cycles(units) == []


def test_the_kernels_import_nothing_of_moekit_above_them():
    for name, deps in GRAPH.items():
        if name.startswith("moekit.kernels"):
            assert all(d.startswith("moekit.kernels") for d in deps), (name, deps)
        if name.startswith("moekit.ops"):  # autograd over the kernels, nothing above
            assert all(d.startswith(("moekit.kernels", "moekit.ops")) for d in deps), (name, deps)
    for name in ("moekit.layers", "moekit.models", "moekit.inference", "moekit.ops"):
        assert not any(d.startswith(name) for m, deps in GRAPH.items() if m.startswith("moekit.kernels") for d in deps)


def test_the_registry_imports_no_layer():
    assert GRAPH["moekit.registry"] == set()


def test_importing_moekit_leaves_the_umask_and_environment_alone():
    code = ("import os\n"
            "def refuse(*a): raise AssertionError('os.umask called at import')\n"
            "os.umask = refuse\n"
            "import moekit, moekit.checkpoint, moekit.interop, moekit.training, moekit.cli\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": "2"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
