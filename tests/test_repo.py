"""The project's frame: README's commands are the ones CI runs, and nothing unsafe slips in."""
import ast
import re
import subprocess

import pytest
from conftest import ROOT


def readme_commands():
    """The shell lines of README.md's first code block (the two a newcomer copies)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command_verbatim():
    """Guards against the README and CI drifting apart: CI must test what a user runs."""
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"TEST_COMMAND='{test_command}'" in ci


def test_every_torch_load_is_weights_only():
    """torch.load without weights_only=True would execute pickled code from a checkpoint."""
    for path in ROOT.glob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"torch\.load\(", line):
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"


def readme_train_commands():
    """The arguments of every `train.py` command in README.md's code blocks (what precedes
    train.py, trailing comments and what follows `&&` dropped; continuation lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if " train.py" in f" {line}" and not line.startswith("#"):
                args = line.split("train.py", 1)[1].split()
                commands.append(args[:args.index("&&")] if "&&" in args else args)
    return commands


def test_readme_train_commands_pass_the_settings_checks(monkeypatch):
    """A documented command that train.py refuses (say, a fine-tune whose learning_rate is below
    the recipe's min_lr) is the first thing a new user meets."""
    import train
    monkeypatch.chdir(ROOT)
    commands = readme_train_commands()
    assert len(commands) >= 5  # the quick start, torchrun, fine-tuning...
    for args in commands:
        train.load_config(args)


SCRIPTS = ("prepare", "train", "sample", "bench", "serve", "export")


def test_no_script_imports_another_script():
    """Scripts import the library (gpt, tokenizer, common), never each other: a reader finds
    every shared part in the module named for it."""
    for name in SCRIPTS:
        path = ROOT / f"{name}.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in set(SCRIPTS) - {name}, f"{path.name} imports {module}"


# Spelt in pieces, so this file does not match itself.
HISTORY = re.compile("|".join(["sess" "ion [0-9]", r"\bday [0-9]", "aud" "it", "the iss" "ue",
                               r"the se" r"eds?\b", "house r" "ule"]), re.I)


def test_the_project_describes_itself_without_its_history():
    """Code, tests, configs and docs say what the program does, not how it came to be."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix in (".py", ".md", ".txt", ".toml", ".ini", "") and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                assert not HISTORY.search(line), f"{name}:{number}: {line.strip()}"


def test_user_documentation_is_short_and_self_contained():
    """README.md is a reference of at most 300 lines; no user document points at the developers'
    corpora folder beside the project (users download the public corpora)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for doc in ("README.md", "BENCHMARKS.md", "data/README.md"):
        assert "../shared" not in (ROOT / doc).read_text(encoding="utf-8"), doc
