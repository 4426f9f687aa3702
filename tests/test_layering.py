"""Layering of talr: experiments -> sft -> theory, imports only point down, no import cycle.

The graph is built from the source (`ast`), module by module, with every import counted:
top-level and function-local (deferred) ones alike, as `/work/shared/tools/import_cycles.py
--deferred` does, plus two edges that Python adds and a plain import list hides:

* importing ``a.b.c`` from outside package ``a.b`` first runs ``a/b/__init__.py`` (an edge to
  every package of the target that the importer does not live in);
* a package ``__init__`` that re-exports lazily (``import_module`` in a module ``__getattr__``)
  depends on every submodule it names in a string.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("theory", "sft", "experiments")  # bottom to top


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, pkg: str, mods: set[str]) -> list[str]:
    """The project modules an import statement loads (the longest known prefix of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" if base else a.name for a in node.names] + [base]
    out = []
    for t in names:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t:
            out.append(t)
    return out


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(roots=LAYERS, root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(f, root): f for r in roots for f in sorted((root / r).rglob("*.py"))}
    mods = set(files)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in files.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        own = set(_packages_of(m)) | ({m} if f.name == "__init__.py" else set())
        lazy = False
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(node, pkg, mods):
                    graph[m] |= {p for p in (t, *_packages_of(t)) if p in mods and p not in own}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "import_module":
                lazy = True
        if lazy and f.name == "__init__.py":
            names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            graph[m] |= {f"{m}.{s}" for s in names if f"{m}.{s}" in mods}
        graph[m].discard(m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_cycle_finder_on_a_hand_made_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(cycles(g)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_deferred_package_and_lazy_imports(tmp_path):
    """A cycle through a function-local import, a package ``__init__`` and a lazy re-export is found."""
    (tmp_path / "p" / "sub").mkdir(parents=True)
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "a.py").write_text("def f():\n    from .sub import leaf\n")
    (tmp_path / "p" / "sub" / "__init__.py").write_text(
        "from importlib import import_module\n_PUBLIC = {'g': 'back'}\n"
        "def __getattr__(n):\n    return getattr(import_module(f'{__name__}.{_PUBLIC[n]}'), n)\n")
    (tmp_path / "p" / "sub" / "leaf.py").write_text("X = 1\n")
    (tmp_path / "p" / "sub" / "back.py").write_text("from ..a import f\n")
    g = import_graph(("p",), tmp_path)
    assert g["p.a"] == {"p.sub", "p.sub.leaf"}
    assert g["p.sub"] == {"p.sub.back"}
    assert cycles(g) == [["p.a", "p.sub", "p.sub.back"]]


def test_imports_point_down():
    g = import_graph()
    up = [(m, t) for m, ts in g.items() for t in ts
          if LAYERS.index(t.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert up == [], "imports pointing up:\n" + "\n".join(f"  {m} -> {t}" for m, t in sorted(up))


def test_no_import_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


STUDIES = "experiments.studies."
# The commands that run studies, and which (a study is the group of modules named `<study>` or
# `<study>_*` in experiments/studies). Every other command uses sft/theory, never a study.
RUNS_STUDIES = {"experiments.commands.demo_cmd": {"demo"}, "experiments.commands.compare": {"compare"},
                "experiments.commands.study": None}  # `talr study NAME`: any study


def study_of(module: str) -> str | None:
    if not module.startswith(STUDIES):
        return None
    return module[len(STUDIES):].split(".")[0].split("_")[0]


def test_no_study_is_another_study_s_library():
    """A study's modules import no module of another study (shared pieces live in sft or experiments.outputs)."""
    g = import_graph()
    bad = [(m, t) for m, ts in g.items() for t in ts
           if study_of(m) and study_of(t) and study_of(m) != study_of(t)]
    assert bad == [], "a study imports another study:\n" + "\n".join(f"  {m} -> {t}" for m, t in sorted(bad))


def test_commands_import_only_the_studies_they_run():
    g = import_graph()
    bad = []
    for m, ts in g.items():
        if m.startswith("experiments.commands."):
            allowed = RUNS_STUDIES.get(m, set())
            bad += [(m, t) for t in ts if study_of(t) and allowed is not None and study_of(t) not in allowed]
        elif study_of(m):
            bad += [(m, t) for t in ts if t.startswith("experiments.commands") or t == "experiments.cli"]
    assert bad == [], "imports of a study it does not run (or of a command by a study):\n" + "\n".join(
        f"  {m} -> {t}" for m, t in sorted(bad))
