"""README promises two set-up commands; CI must run exactly the test one."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up and run")[1].split("\n## ")[0]
    commands = [b.split("\n", 1)[1].strip() for b in setup.split("```bash")[1:]]
    commands = [c.split("```")[0].strip() for c in commands]
    assert len(commands) == 2
    assert commands[0].endswith("cast run")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
