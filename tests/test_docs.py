"""The README documents what the code does: every error, option and command."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import pytest

from kvconfig import agenttap, errors, line
from kvconfig.limits import limit_options
from kvconfig.tap import Options

README = Path(__file__).resolve().parent.parent / "README.rst"


@pytest.fixture(scope="module")
def readme() -> str:
    if not README.exists():
        pytest.skip("README.rst is not beside the tests (an installed copy is being tested)")
    return README.read_text()


def test_readme_is_valid_restructuredtext(readme):
    """The README renders without a docutils warning (tables included)."""
    docutils.core.publish_string(
        readme, writer="null", settings_overrides={"halt_level": 2, "report_level": 2}
    )


@pytest.mark.parametrize("error", errors.ALL_ERRORS, ids=lambda e: e.name)
def test_every_error_code_is_documented(readme, error):
    """Each error's wire name and code stand on one line of the README's table."""
    assert any(f"``{error.name}``" in row and row.split()[0] == str(error.code)
               for row in readme.splitlines() if row.strip())


@pytest.mark.parametrize("flag", [long for long, *_ in Options.optParameters])
def test_every_option_is_documented(readme, flag):
    """Each ``twistd kvconfig`` option is in the README's option table."""
    assert f"``--{flag}``" in readme


@pytest.mark.parametrize("flag", sorted({flag.rstrip("=")
                                          for flag in agenttap.CommandOptions().longOpt}
                                         - {"help", "version"}))
def test_every_agent_option_is_documented(readme, flag):
    """Each ``kvconfig-agent`` option (twistd's and the command's) is in the README."""
    assert f"``--{flag}``" in readme


@pytest.mark.parametrize("command", list(line.COMMANDS))
def test_every_line_command_is_documented(readme, command):
    """Each line-protocol command is in the README and in the module's grammar."""
    assert f"``{command}" in readme
    assert f"\n    {command}" in line.__doc__


@pytest.mark.parametrize("flag, default", [(flag, default)
                                           for flag, _, default, _ in limit_options()])
def test_every_limit_default_in_the_readme_is_the_codes(readme, flag, default):
    """The option table's default for each limit is the Limits field's own,
    so the README cannot drift from the one table options are made from."""
    rows = [row.split() for row in readme.splitlines() if row.startswith(f"``--{flag}``")]
    assert rows, f"--{flag} has no row in the option table"
    assert rows[0][1] == str(default)
