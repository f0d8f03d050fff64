"""The repository's documents say what the code does: the README's Python example runs as
written, against a packed quantized checkpoint placed where the demo leaves its own
(checkpoints/demo/finetune/best.pt, relative to the working folder), and every command the
documents give names a script that exists and flags it takes."""
import argparse
import os
import re

from tiny_checkpoints import make_checkpoint, write_tiny_data

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example():
    """The first ```python block of the "Use it from Python" section."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Use it from Python"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_on_a_packed_checkpoint(tmp_path, monkeypatch, capsys):
    data = write_tiny_data(tmp_path / "data", tasks=("partseg",))
    monkeypatch.chdir(tmp_path)
    make_checkpoint(os.path.join("checkpoints", "demo", "finetune", "best.pt"), "partseg", data,
                    packed=True)
    capsys.readouterr()
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert printed.startswith("pt_seg_tiny partseg ") and "per-layer bits: {" in printed


# --- Every command a reader may paste names a script that exists and flags it takes ----------

REPO = os.path.dirname(README)
# `python X.py --help` stands for any script; pytest, pip and venv are not this repository's
PLACEHOLDERS = {"X.py"}
OTHER_MODULES = {"pytest", "pip", "venv"}
# the run scripts hand their extra flags to this script
RUN_SCRIPT_TARGETS = {"run/pretrain.sh": "pretrain.py", "run/search.sh": "search.py",
                      "run/finetune.sh": "finetune.py"}
# run/recipes.sh's arrays of flags, and the scripts each is given to
RECIPE_ARRAYS = {"PRETRAIN": ("pretrain.py",), "SEARCH": ("search.py",),
                 "FINETUNE": ("finetune.py",), "EVAL": ("eval.py", "-m lib.results_table")}
COMMAND = re.compile(r"(?:^|[\s(`;&|])(?:python3?|torchrun(?:\s+--nproc[-_]per[-_]node[ =]\S+)?"
                     r"|bash)\s+(-m\s+[\w.]+|[\w./-]+\.(?:py|sh))([^#;|&>`]*)")
FLAG = re.compile(r"(?<![\w$-])--[a-z][\w-]*")


def _read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def _markdown_snippets(text):
    """Code blocks line by line, inline code spans (which may wrap) and headings."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        yield from block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    yield from (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    yield from (line for line in prose.splitlines() if line.startswith("#"))


def documented_commands():
    """(where, target, flags) of every python / torchrun / bash command in the READMEs,
    lib/DESIGN.md, bench/RESULTS.md's headings (its bodies are history), the shell scripts and
    every module's docstring."""
    import ast
    import glob
    snippets = []
    for path in ("README.md", "data/README.md", "lib/DESIGN.md"):
        snippets += [(path, s) for s in _markdown_snippets(_read(path))]
    snippets += [("bench/RESULTS.md", line) for line in _read("bench/RESULTS.md").splitlines()
                 if line.startswith("#")]
    scripts = sorted(glob.glob("run/*.sh", root_dir=REPO)) + ["bench/gpu_check.sh"]
    for path in scripts:
        snippets += [(path, line.lstrip(" #"))
                     for line in _read(path).replace("\\\n", " ").splitlines()]
    modules = [p for pattern in ("*.py", "lib/**/*.py", "models/*.py", "bench/*.py")
               for p in sorted(glob.glob(pattern, root_dir=REPO, recursive=True))]
    for path in modules:
        doc = ast.get_docstring(ast.parse(_read(path))) or ""
        snippets += [(path, line) for line in doc.replace("\\\n", " ").splitlines()]
    for where, text in snippets:
        for match in COMMAND.finditer(text):
            target = " ".join(match.group(1).split())
            yield where, RUN_SCRIPT_TARGETS.get(target, target), FLAG.findall(match.group(2))
    recipes = _read("run/recipes.sh")
    for name, targets in RECIPE_ARRAYS.items():
        for body in re.findall(rf"\b{name}\+?=\((.*?)\)", recipes, re.S):
            yield from (("run/recipes.sh", target, FLAG.findall(body)) for target in targets)


def script_path(target):
    """The file a command's target runs: a path as given, "-m pkg" its __main__.py."""
    if not target.startswith("-m "):
        return target
    path = target[3:].replace(".", "/")
    return f"{path}/__main__.py" if os.path.isdir(os.path.join(REPO, path)) else f"{path}.py"


def accepted_flags(path, flags):
    """Those of `flags` that the script at `path` takes: its get_args_parser's option strings,
    or for a script that parses its arguments by hand, the flags spelled in its source."""
    import importlib
    module = importlib.import_module(path[:-3].replace("/", "."))
    if hasattr(module, "get_args_parser"):
        return {option for action in module.get_args_parser()._actions
                for option in action.option_strings}
    return {flag for flag in flags if f'"{flag}"' in _read(path)}


def test_documented_commands_name_existing_scripts_and_flags():
    checked, wrong = 0, []
    for where, target, flags in documented_commands():
        if target in PLACEHOLDERS or target.removeprefix("-m ") in OTHER_MODULES:
            continue
        path = script_path(target)
        if not os.path.isfile(os.path.join(REPO, path)):
            wrong.append(f"{where}: {target}: no such script")
        elif path.endswith(".py"):
            accepted = accepted_flags(path, flags)
            wrong += [f"{where}: {target} takes no {flag}" for flag in flags
                      if flag not in accepted]
            checked += 1
    assert checked > 50  # the documents were read
    assert not wrong, "\n".join(wrong)


def test_every_scripts_help_gives_its_whole_description():
    """A parser described by its module's docstring shows all of it: a first line alone stopped
    mid-sentence (bench/*.py, `python -m models`), since a docstring's lines wrap at 100."""
    import glob
    import importlib
    paths = [p for pattern in ("*.py", "lib/**/*.py", "models/*.py", "bench/*.py")
             for p in sorted(glob.glob(pattern, root_dir=REPO, recursive=True))
             if "def get_args_parser" in _read(p)]
    assert len(paths) > 15
    cut = []
    for path in paths:
        module = importlib.import_module(path[:-3].replace("/", "."))
        doc, description = module.__doc__ or "", module.get_args_parser().description or ""
        rest = doc[len(description):] if description and doc.startswith(description) else ""
        if rest.strip() and not rest.startswith("\n\n"):
            cut.append(f"{path}: {description.splitlines()[-1]!r} ...")
    assert not cut, "\n".join(cut)


def test_compare_help_gives_every_default():
    """The README sends readers to `python -m lib.haq.compare --help` for the comparison's
    settings: every flag with a default shows it there."""
    from lib.haq.compare import get_args_parser
    parser = get_args_parser()
    shown = " ".join(parser.format_help().split())
    missing = [action.option_strings[0] for action in parser._actions
               if action.option_strings and action.default not in (None, argparse.SUPPRESS)
               and f"(default: {action.default})" not in shown]
    assert not missing, missing


def test_a_fresh_clone_needs_the_readmes_two_commands():
    """The README opens with two commands, the main job and the tests; each script sets up
    .venv itself, and .ci/run runs the very test command."""
    first_block = re.search(r"```bash\n(.*?)```", _read("README.md"), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 2, commands
    for command in commands:
        script = command.split()[1]
        assert command.split()[0] == "bash" and os.path.isfile(os.path.join(REPO, script))
        assert re.search(r'^(EXTRA_REQUIREMENTS=\S+ )?\. "\$\(dirname "\$0"\)/setup_env.sh"',
                         _read(script), re.M), f"{script} does not set up .venv"
    ci = [line.strip() for line in _read(".ci/run").splitlines() if line.strip()]
    assert ci[-1] == commands[1], (ci[-1], commands[1])
