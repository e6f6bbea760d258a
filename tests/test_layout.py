"""The house: four stages on top, one package beneath, arrows that only go down, and a package that installs.

Floors, from the top: the scripts (experiments/, bench/) over the four stages and the ports (ports/, beside
them) over the package safesteer/. An import may go down or stay in its group (a stage may call another
stage's function), never up or across, and never round in a circle, not even under TYPE_CHECKING. The
package's core, what a port lifts, imports torch, transformers and the standard library, and of the project
only the core itself.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"extract_direction", "select_tokens", "distill", "evaluate"}
CORE = {"safesteer.errors", "safesteer.hooks", "safesteer.sampling", "safesteer.forcing", "safesteer.losses",
        "safesteer.chat"}
FLOOR = {"safesteer": 0, "stage": 1, "ports": 1, "experiments": 2, "bench": 2}


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the four floors, by its import name."""
    files = [ROOT / f"{s}.py" for s in STAGES]
    for folder in ("safesteer", "experiments", "bench", "ports"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return {module_name(f): f for f in files}


def floor(name: str) -> int:
    return FLOOR["stage"] if name in STAGES else FLOOR[name.split(".")[0]]


def imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(the project's modules that `path` imports, anywhere in the file; the other top-level packages)."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from safesteer import losses` imports the module safesteer.losses
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            hit = next((n for n in (name, name.rpartition(".")[0]) if n in known), None)
            if hit:
                ours.add(hit)
            elif name.split(".")[0] not in {"safesteer", "experiments", "bench", "ports", *STAGES}:
                others.add(name.split(".")[0])
    return ours, others


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports(path, set(mods))[0] - {name} for name, path in mods.items()}


def test_the_top_level_holds_the_four_stages_and_no_other_python_file():
    assert {p.stem for p in ROOT.glob("*.py")} == STAGES
    for name in ("LICENSE", "pyproject.toml", "requirements.txt", "README.md", "Makefile"):
        assert (ROOT / name).is_file(), name


def test_imports_only_go_down():
    def group(name):
        return "stage" if name in STAGES else name.split(".")[0]

    problems = [f"{name} imports {dep}" for name, deps in graph().items() for dep in deps
                if not (floor(dep) < floor(name) or group(dep) == group(name))]
    assert not problems, "\n".join(sorted(problems))


def test_no_import_circle():
    deps = {n: {d for d in ds if d != "safesteer"} for n, ds in graph().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(deps.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_core_imports_torch_transformers_and_itself_only():
    mods = project_modules()
    for name in sorted(CORE):
        ours, others = imports(mods[name], set(mods))
        assert ours - {name} <= CORE, (name, ours - CORE)
        third_party = others - set(sys.stdlib_module_names) - {"__future__"}
        assert third_party <= {"torch", "transformers"}, (name, third_party)


def test_nothing_edits_sys_path():
    edit = re.compile(r"sys\." + r"path\s*(\.\s*(insert|append|extend)|\[|\+?=)")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in tracked("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if edit.search(line)]
    assert not found, found


def test_pip_install_gives_the_package_alone_and_it_imports_from_anywhere(tmp_path):
    """`pip install .` into a fresh target: the package and its metadata, no stage script; imported from
    another folder, the core pulls in no stage and nothing outside the installed copy."""
    import shutil
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build writes beside its sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "results", "build",
                                                                 "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-build-isolation", "--no-compile"]
    subprocess.run([*pip, "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    installed = {p.name for p in target.iterdir()}
    scripts = {f"{s}.py" for s in STAGES} | {"experiments", "bench", "ports"}
    assert "safesteer" in installed and not installed & scripts
    code = ("import sys, safesteer.losses, safesteer.hooks, safesteer.sampling, safesteer.forcing;"
            "import safesteer.chat, safesteer.teacher, safesteer.scale.parallel, safesteer.port.judges;"
            "mods = [m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(STAGES | {'experiments', 'bench'})!r}];"
            "files = {m.__file__ for n, m in sys.modules.items()"
            " if n.startswith('safesteer')};"
            "print(mods, sorted(files)[:1])")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.startswith("[] ") and str(target) in out, out
