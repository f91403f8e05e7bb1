"""The package's structure, checked: no import cycle among pidkern's modules (function-
level imports count), and no comment or docstring citing a file outside the repository."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pidkern"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set) -> set:
    """The pidkern modules `path` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            cands = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in modules and c != name}
    return out


def test_no_import_cycle():
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: imports_of(p, set(files)) for m, p in files.items()}
    graph = {m: {d for d in deps if d != "pidkern"} for m, deps in graph.items()}  # the package's own re-exports
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# a file outside the repository: the session's shared notes, a sibling checkout, SPEC §N
OUTSIDE = re.compile(r"SPEC(?:\.md| ?§)|\.\./|/work/|shared/|PERF\.md")


def comments_and_docstrings(path: Path):
    text = path.read_text()
    for i, line in enumerate(text.splitlines(), 1):
        if "#" in line:
            yield i, line[line.index("#"):]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "lineno", 1), doc


def test_comments_cite_only_the_repository():
    bad = [f"{p.relative_to(PKG.parent)}:{line}: {OUTSIDE.search(t).group(0)!r}"
           for p in sorted(PKG.rglob("*.py")) for line, t in comments_and_docstrings(p) if OUTSIDE.search(t)]
    assert not bad, "comments citing files outside the repository:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The two rules above fire on a planted cycle and a planted citation."""
    assert OUTSIDE.search("# see SPEC §3") and OUTSIDE.search("# ../shared/PERF.md")
    assert not OUTSIDE.search("# docs/design.md, \"The plan\"")
    pkg = tmp_path / "pidkern"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    mods = {"pidkern", "pidkern.a", "pidkern.b"}
    global PKG
    old, PKG = PKG, pkg
    try:
        assert imports_of(pkg / "a.py", mods) == {"pidkern.b"}
        assert "pidkern.a" in imports_of(pkg / "b.py", mods)
    finally:
        PKG = old
