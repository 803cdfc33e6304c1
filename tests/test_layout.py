"""The layout's rules, read from the source: the library imports neither Streamlit nor the
app helpers, no module edits ``sys.path``, and ``visattn.paths`` resolves and overrides."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import visattn
from visattn import paths, sites, tracing

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted(p for p in (ROOT / "visattn").rglob("*.py") if "app" not in p.relative_to(ROOT / "visattn").parts[:1])
APP = sorted((ROOT / "visattn" / "app").glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_imports_neither_streamlit_nor_the_app():
    assert len(LIBRARY) > 20 and len(APP) >= 7
    for path in LIBRARY:
        bad = {n for n in imported(path) if n.split(".")[0] in ("streamlit", "pages") or n.startswith("visattn.app")}
        assert not bad, (path.name, bad)
    for path in APP:
        assert not {n for n in imported(path) if n.split(".")[0] in ("streamlit", "pages")}, path.name


def test_no_module_edits_sys_path():
    files = [p for d in ("visattn", "pages", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    files.append(ROOT / "dashboard.py")
    assert len(files) > 40
    offenders = [p.name for p in files if "sys.path." + "insert" in p.read_text() or "sys.path." + "append" in p.read_text()]
    assert offenders == []


def module_graph() -> dict[str, set[str]]:
    """``{module: modules of this repository it imports}`` over visattn, pages and benchmarks, lazy
    (function-level) imports included, a page's script guard not (it runs only as a script)."""
    files = {}
    for package in ("visattn", "pages", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module in files:
                # ``from package import module`` imports the module (and the package's __init__ first, by
                # Python's rules, not by design); ``from package import name`` needs the package itself
                subs = {f"{node.module}.{a.name}" for a in node.names}
                deps |= (subs & files.keys()) | ({node.module} if subs - files.keys() else set())
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = module_graph()
    assert "visattn.intercept" in graph["visattn.tracing"] and "visattn.layers" in graph["visattn.cams"]
    assert cycles(graph) == []


def test_capture_is_the_function_and_tracing_the_module():
    assert visattn.capture is tracing.capture and callable(visattn.capture)
    assert sites.attend.__module__ == "visattn.sites"


def test_paths_follow_the_environment(monkeypatch, tmp_path):
    for var in ("VISATTN_ROOT", "VISATTN_CHECKPOINTS", "VISATTN_RUNS", "VISATTN_DATA", "VISATTN_CACHE"):
        monkeypatch.delenv(var, raising=False)
    assert paths.root() == ROOT
    assert paths.checkpoints() == ROOT / "checkpoints" and paths.runs() == ROOT / "runs"
    assert paths.data() == (ROOT / "../shared/datasets/cifar10").resolve()
    assert paths.cache() == Path.home() / ".cache" / "visattn"
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path / "r"))
    monkeypatch.setenv("VISATTN_DATA", "data/here")  # relative: from the root, not the working directory
    monkeypatch.setenv("VISATTN_CACHE", "~/elsewhere")
    monkeypatch.chdir(tmp_path)
    assert paths.runs() == tmp_path / "r"
    assert paths.data() == ROOT / "data" / "here"
    assert paths.cache() == Path.home() / "elsewhere"
    monkeypatch.setenv("VISATTN_ROOT", str(tmp_path))
    assert paths.checkpoints() == tmp_path / "checkpoints" and paths.default_checkpoint().parent == tmp_path / "checkpoints"


def test_paths_outside_a_checkout_use_the_working_directory(monkeypatch, tmp_path):
    """After a non-editable install ``visattn/`` sits in site-packages, no pyproject.toml beside it."""
    installed = tmp_path / "site-packages" / "visattn"
    installed.mkdir(parents=True)
    (installed / "paths.py").write_text((ROOT / "visattn" / "paths.py").read_text())
    spec = importlib.util.spec_from_file_location("installed_paths", installed / "paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.delenv("VISATTN_ROOT", raising=False)
    monkeypatch.delenv("VISATTN_CHECKPOINTS", raising=False)
    monkeypatch.chdir(work)
    assert module.root() == work and module.checkpoints() == work / "checkpoints"



def test_every_page_hands_a_fresh_servers_first_request_to_the_dashboard():
    """Streamlit runs ``pages/<url>.py`` as a script for a fresh server's first request (its v1
    pages folder): each page module must then run the whole dashboard, not draw itself alone."""
    import pages

    for spec in pages.PAGES:
        tree = ast.parse((ROOT / "pages" / f"{spec.url_path}.py").read_text())
        guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
        assert len(guards) == 1, spec.url_path
        body = ast.unparse(guards[0])
        assert "from pages import main" in body and "dashboard()" in body, body
