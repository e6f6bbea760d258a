"""The documentation runs as written: every command line in README.md, docs/*.md, results/README.md, the
scripts' own usage docstrings and the Makefile's recipes uses only options that the script's parser knows, in
their current spelling; every script's --help exits 0 and prints only its help, with each option's default;
the README's function map names functions that exist; no file name or text outside the dated log uses the word
WORD below.

Scripts in bench/ and experiments/ run as modules from the repository (`python -m bench.vs_trl`), and a
`python -m safesteer.X` command names the package's own file; each is read as the file it names.

The scripts' parsers are read in one helper process (`python tests/test_docs.py --probe SCRIPT...`): it runs
each script as __main__ twice, once with --help and once with argparse's parse_args replaced by a function
that records the parser and stops, so no script gets past its argument parsing and no model is loaded.
"""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]
LAUNCHER = re.compile(r"(^|/)(python3?(\.\d+)?|torchrun)$")
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&>"}


def scripts() -> list[Path]:
    """Every command-line script of the project: the stages, bench/*.py, experiments/*.py and the package's
    modules that have a __main__ block."""
    folders = [ROOT, ROOT / "bench", ROOT / "experiments", ROOT / "safesteer",
               *(ROOT / "safesteer").glob("*/")]
    return [p for folder in folders for p in sorted(folder.glob("*.py"))
            if '__name__ == "__main__"' in p.read_text()]


def module_file(name: str) -> str | None:
    """`python -m bench.vs_trl` runs bench/vs_trl.py, `python -m safesteer.check_port` the package's
    __main__.py: the project's file a module name stands for."""
    path = ROOT / (name.replace(".", "/") + ".py")
    if not path.is_file() and (ROOT / name.replace(".", "/") / "__main__.py").is_file():
        path = ROOT / name.replace(".", "/") / "__main__.py"
    ours = name.split(".")[0] in ("bench", "experiments", "safesteer")
    return str(path.relative_to(ROOT)) if ours else None


# -------------------------------------------------------------------------- the probe (runs in a subprocess)

def _describe(parser) -> dict:
    """The options of a parser and of its subcommands' parsers, with what --help shows for each."""
    import argparse
    visible = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
    formatter = parser._get_formatter()
    options = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            for sub in dict.fromkeys(a.choices.values()):  # aliases map to the same parser
                options += _describe(sub)["options"]
        hidden = a.help is argparse.SUPPRESS
        kind = type(a).__name__.lower()
        renamed = (getattr(a, "deprecated", False) is True or "renamed" in kind or "deprecat" in kind
                   or (hidden and a.dest in visible))
        options.append({"strings": list(a.option_strings), "dest": a.dest, "hidden": hidden,
                        "deprecated": renamed, "flag": a.nargs == 0,
                        "has_default": a.default not in (None, False, argparse.SUPPRESS),
                        "help": None if hidden else formatter._expand_help(a) if a.help else ""})
    return {"options": options, "help_text": parser.format_help()}


def probe(paths: list[str]) -> dict:
    import argparse
    import contextlib
    import io
    import runpy

    class Stop(Exception):
        pass

    out = {}
    for path in paths:
        rec = {}
        stdout, stderr = io.StringIO(), io.StringIO()
        sys.argv = [path, "--help"]
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                runpy.run_path(path, run_name="__main__")
            code = "returned without exiting"
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:  # noqa: BLE001 (reported, not raised: one script must not hide the others)
            code = f"{type(e).__name__}: {e}"
        rec["help"] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
        parsers = []

        def grab(self, args=None, namespace=None):
            parsers.append(self)
            raise Stop

        saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
        argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = grab
        sys.argv = [path]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                runpy.run_path(path, run_name="__main__")
        except Stop:
            pass
        except BaseException as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
        if parsers:
            rec.update(_describe(parsers[0]))
        out[str(Path(path).resolve().relative_to(ROOT))] = rec
    return out


_PROBED = None


def probed() -> dict:
    """{script path relative to ROOT: its --help run and its parser's options}, computed once per test run."""
    global _PROBED
    if _PROBED is None:
        # the probe runs from tests/; the scripts it reads import the stages and each other from the
        # repository
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, __file__, "--probe", *map(str, scripts())], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        _PROBED = json.loads(res.stdout.strip().splitlines()[-1])
    return _PROBED


# ----------------------------------------------------------------------------- command lines in the docs

def makefile_commands() -> list[tuple[str, str]]:
    """The Makefile's recipe lines with its variables expanded (DIRECTION_ARGS etc.)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables, recipes = {}, []
    for line in text.splitlines():
        if line.startswith("\t"):
            recipes.append(line.strip())
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(3).split("#")[0].strip()

    def expand(s: str) -> str:
        for _ in range(10):  # variables may name variables
            s, before = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), s), s
            if s == before:
                break
        return s

    return [(f"Makefile: {r}", expand(r)) for r in recipes]


def markdown_commands(path: Path) -> list[tuple[str, str]]:
    """Lines of fenced code blocks (continuations joined) and inline code spans."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append((f"{path.relative_to(ROOT)}: {line.strip()}", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        found.append((f"{path.relative_to(ROOT)}: `{span}`", span))
    return found


def docstring_commands(path: Path) -> list[tuple[str, str]]:
    """The command lines of a script's module docstring (its Usage section)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [(f"{path.relative_to(ROOT)} docstring: {line.strip()}", line)
            for line in doc.replace("\\\n", " ").splitlines() if re.search(r"\b(python3?|torchrun)\b", line)]


def invocations(command: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each `python SCRIPT ...` / `torchrun ... SCRIPT ...` in a shell line."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        tokens = command.split()
    found, i = [], 0
    while i < len(tokens):
        module = LAUNCHER.search(tokens[i]) and tokens[i + 1:i + 2] == ["-m"] and len(tokens) > i + 2
        if module and module_file(tokens[i + 2]):  # one of the project's scripts, run as a module
            end = next((k for k in range(i + 3, len(tokens)) if tokens[k] in SEPARATORS), len(tokens))
            found.append((module_file(tokens[i + 2]), tokens[i + 3:end]))
            i = end
        # not another module or a snippet
        elif LAUNCHER.search(tokens[i]) and tokens[i + 1:i + 2] not in (["-m"], ["-c"]):
            j = next((k for k in range(i + 1, len(tokens)) if tokens[k].endswith(".py")), None)
            if j is None:
                i += 1
                continue
            end = next((k for k in range(j + 1, len(tokens)) if tokens[k] in SEPARATORS), len(tokens))
            found.append((tokens[j], tokens[j + 1:end]))
            i = end
        else:
            i += 1
    return found


def all_commands() -> list[tuple[str, str]]:
    cmds = makefile_commands()
    for path in DOCS:
        cmds += markdown_commands(path)
    for path in scripts():
        cmds += docstring_commands(path)
    return cmds


def check_flags(where: str, script: str, args: list[str], info: dict) -> list[str]:
    problems = []
    rec = info.get(script)
    if rec is None:
        return [f"{where}: {script} is not a script of this project"]
    if "options" not in rec:
        return [f"{where}: could not read the parser of {script}: {rec.get('error')}"]
    known = {s: o for o in rec["options"] for s in o["strings"]}
    known.update({s: {"deprecated": False} for s in ("-h", "--help")})
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg.split("=")[0]
        if name not in known:
            problems.append(f"{where}: {script} has no option {name}")
        elif known[name]["deprecated"]:
            new = [s for o in rec["options"] if o["dest"] == known[name]["dest"] and not o["deprecated"]
                   for s in o["strings"]]
            problems.append(f"{where}: {name} is the old spelling of {script}'s {'/'.join(new) or '?'}")
    return problems


# ----------------------------------------------------------------------------- the tests

def test_every_documented_command_uses_known_options_in_their_current_spelling():
    info = probed()
    problems, checked = [], 0
    for where, command in all_commands():
        for script, args in invocations(command):
            script = os.path.normpath(script)
            if not (ROOT / script).is_file():
                problems.append(f"{where}: {script} does not exist")
                continue
            if script == os.path.join("experiments", "experiment.py") and "--" in args:
                k = args.index("--")  # the arguments after -- go to the trainer, as experiment.py routes them
                trainer = "experiments/baselines.py" if "--method" in args[k + 1:] else "distill.py"
                problems += check_flags(where, script, args[:k], info)
                problems += check_flags(where, trainer, args[k + 1:], info)
            else:
                problems += check_flags(where, script, args, info)
            checked += 1
    assert checked > 30, f"only {checked} command lines found: is the parsing broken?"
    assert not problems, "\n".join(problems)


def test_no_doc_uses_a_renamed_option():
    """An old spelling that no script still uses for something else must not appear in any doc at all."""
    info = probed()
    options = [o for rec in info.values() for o in rec.get("options", [])]
    current = {s for o in options if not o["deprecated"] for s in o["strings"]}
    old = {s for o in options if o["deprecated"] for s in o["strings"]}
    old -= current
    texts = {p: p.read_text() for p in [*DOCS, ROOT / "data" / "README.md", ROOT / "Makefile"]}
    problems = [f"{p.relative_to(ROOT)}: {name}" for p, t in texts.items() for name in sorted(old)
                if re.search(re.escape(name) + r"(?![\w-])", t)]
    assert not problems, "old spellings in the docs:\n" + "\n".join(problems)


def test_help_exits_zero_and_prints_only_the_help():
    problems = []
    for script, rec in probed().items():
        run = rec["help"]
        if run["code"] != 0:
            problems.append(f"{script} --help: exit {run['code']}; stderr: {run['stderr'][-300:]}")
        elif not run["stdout"].startswith("usage:"):
            problems.append(f"{script} --help printed {run['stdout'][:200]!r}")
        elif "help_text" in rec and run["stdout"].strip() != rec["help_text"].strip():
            problems.append(f"{script} --help printed more than its help")
        if run["stderr"].strip():
            problems.append(f"{script} --help wrote to stderr: {run['stderr'][-300:]}")
    assert not problems, "\n".join(problems)


def test_every_option_has_help_with_its_default():
    problems = []
    for script, rec in probed().items():
        for o in rec.get("options", []):
            if o["hidden"]:
                continue
            name = "/".join(o["strings"]) or o["dest"]
            if not o["help"]:
                problems.append(f"{script} {name}: no help text")
            elif o["has_default"] and not o["flag"] and "default" not in o["help"]:
                problems.append(f"{script} {name}: --help does not show its default")
    assert not problems, "\n".join(problems)


def test_relative_links_and_paths_in_the_docs_exist():
    problems = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if not re.match(r"[a-z]+://", target) and not (path.parent / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target}")
    assert not problems, "\n".join(problems)


def test_results_readme_indexes_every_file():
    """results/README.md names every file and folder in results/ (and archive/README.md every archived
    one)."""
    problems = []
    for folder in (ROOT / "results", ROOT / "results" / "archive"):
        index = (folder / "README.md").read_text()
        tracked = {Path(f).relative_to(folder.relative_to(ROOT)).parts[0] for f in repository_files()
                   if Path(f).is_relative_to(folder.relative_to(ROOT))}
        for name in sorted(tracked - {"README.md", "archive"}):
            if f"`{name}" not in index and f"`{name.split('.')[0]}" not in index:
                problems.append(f"{folder.relative_to(ROOT)}/README.md does not list {name}")
    assert not problems, "\n".join(problems)


def test_readme_function_map_names_functions_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading path", 1)[1].split("\n## ", 1)[0]
    problems, checked = [], 0
    for row in re.findall(r"^\|(.+)\|$", section, flags=re.M):
        cells = [c.strip() for c in row.split("|")]
        files = re.findall(r"`([\w/]+\.py)`", cells[1]) if len(cells) > 2 else []
        if not files:
            continue
        defined = set()
        for f in files:
            tree = ast.parse((ROOT / f).read_text())
            defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for name in re.findall(r"`(\w+)`", cells[2]):
            checked += 1
            if name not in defined:
                problems.append(f"{name} is not defined in {', '.join(files)}")
    assert checked > 20 and not problems, "\n".join(problems)


def test_readme_is_short_and_leads_with_the_commands_and_the_results():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    head = "\n".join(lines[:80])
    for needle in ("make demo", "make test", "## Results on the bundled model", "results/safety_vs_cost.png"):
        assert needle in head, needle
    results = head.split("## Results on the bundled model", 1)[1]
    assert re.search(r"^\|.*\|$", results, flags=re.M), "no results table in the first 80 lines"


def test_readme_and_docs_hold_no_history():
    """Issue numbers, commit hashes and dated narrative belong in results/LOG.md."""
    problems = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        problems += [f"{path.relative_to(ROOT)}: {m.group(0)!r}"
                     for m in re.finditer(r"\b[Ii]ssue #?\d+", text)]
        problems += [f"{path.relative_to(ROOT)}: commit {m.group(1)}"
                     for m in re.finditer(r"\bcommit ([0-9a-f]{7,40})\b", text)]
        problems += [f"{path.relative_to(ROOT)}: {m.group(0)!r}"
                     for m in re.finditer(r"checked once|by hand once|this (morning|afternoon|week)", text)]
    assert not problems, "\n".join(problems)


WORD = "ses" + "sion"  # spelled in two parts so that this file passes its own test


def repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted({f for f in listed if (ROOT / f).is_file()})


def test_no_file_name_or_text_uses_the_word():
    """Exempt: the dated log and the archive (history), and texts that are data, not prose: the prompt sets
    in data/*.jsonl (a prompt may ask about stealing login cookies), the published benchmark files in
    tests/fixtures/ (verbatim) and model outputs (train logs, eval samples)."""
    problems = []
    for f in repository_files():
        if f == "results/LOG.md" or f.startswith("results/archive/"):
            continue
        if WORD in f.lower():
            problems.append(f"file name: {f}")
            continue
        name = Path(f).name
        model_output = re.match(r"(eval_samples|train_log).*\.jsonl$", name)
        published = f.startswith("tests/fixtures/") and not f.endswith(".md")
        if (f.startswith("data/") and f.endswith(".jsonl")) or model_output or published:
            continue
        try:
            text = (ROOT / f).read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for n, line in enumerate(text.splitlines(), 1):
            if WORD in line.lower():
                problems.append(f"{f}:{n}: {line.strip()[:120]}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    result = probe(sys.argv[2:])
    sys.stdout = sys.__stdout__
    print(json.dumps(result))
