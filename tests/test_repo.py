"""The project's frame: README's commands are the ones CI runs, and nothing unsafe slips in."""
import re

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
