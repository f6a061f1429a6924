"""One-way imports, checked on the source (AST): the library never imports its adapters or experiments,
the light modules stay light, and module-level imports among fedmeta's modules form no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedmeta"
UPWARD = ("clients", "server", "experiments")


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imported(module: str, path: Path, node: ast.AST) -> list[str]:
    """The absolute module names an import statement names (``from a import b`` -> ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def all_imports(module: str, path: Path) -> list[str]:
    return [name for node in ast.walk(ast.parse(path.read_text())) for name in imported(module, path, node)]


def module_level_imports(module: str, path: Path) -> list[str]:
    """Imports that run when the module is imported: top level, and inside top-level if/try (not ``if TYPE_CHECKING``)."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            out += imported(module, path, inner)
    return out


def test_fedmeta_never_imports_its_adapters_or_experiments():
    bad = [(m, name) for m, p in modules().items() for name in all_imports(m, p) if name.split(".")[0] in UPWARD]
    assert not bad, bad


def test_errors_imports_nothing_and_config_no_torch():
    assert module_level_imports("fedmeta.errors", PKG / "errors.py") == all_imports("fedmeta.errors", PKG / "errors.py") == []
    heavy = {"torch", "numpy", "flwr"}
    for m in ("fedmeta.config", "fedmeta.population", "fedmeta.registry"):
        names = all_imports(m, modules()[m])
        assert not [n for n in names if n.split(".")[0] in heavy], (m, names)
    # and at run time: building and checking a config's sections loads neither torch nor numpy
    code = ("import sys; from fedmeta.config import build_config; build_config(None, ['meta.algorithm=ditto', 'meta.params.lam=0.1']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'flwr'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def enter(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)

    for root in edges:
        if root in index:
            continue
        enter(root)
        work = [(root, iter(edges[root]))]
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
            elif w not in index:
                enter(w)
                work.append((w, iter(edges[w])))
            elif w in on:
                low[v] = min(low[v], index[w])
    return found


def test_no_cycle_among_module_level_imports():
    mods = modules()
    edges = {m: sorted({n for n in module_level_imports(m, p) if n in mods and n != m}) for m, p in mods.items()}
    assert not cycles(edges), cycles(edges)
    assert len(mods) > 40 and sum(map(len, edges.values())) > 80  # the graph is real, not empty


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fedmeta import b\nimport clients.app\n")
    b.write_text("import fedmeta.a\n")
    assert module_level_imports("fedmeta.a", a) == ["fedmeta", "fedmeta.b", "clients.app"]
    assert module_level_imports("fedmeta.b", b) == ["fedmeta.a"]
    assert cycles({"fedmeta.a": ["fedmeta.b"], "fedmeta.b": ["fedmeta.a"], "fedmeta.c": ["fedmeta.a"]}) == [["fedmeta.a", "fedmeta.b"]]
    assert cycles({"x": ["y"], "y": ["z"], "z": []}) == []


def test_the_round_loop_has_no_privacy_branch():
    """DP wraps the server hook (``privacy.server.PrivateServer``): the round loop never asks whether a run is private.

    An AST check of fedmeta/federation.py: no comparison of anything named ``privacy`` (or ``….privacy``) with None.
    """
    tree = ast.parse((ROOT / "fedmeta" / "federation.py").read_text())

    def named_privacy(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "privacy") or (isinstance(node, ast.Attribute) and node.attr == "privacy")

    found = [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops)
        and any(isinstance(c, ast.Constant) and c.value is None for c in node.comparators)
        and named_privacy(node.left)
    ]
    assert found == []
    bad = ast.parse("if self.privacy is not None and privacy is None:\n    pass\n")
    assert sum(isinstance(n, ast.Compare) and named_privacy(n.left) for n in ast.walk(bad)) == 2  # the check sees both forms
