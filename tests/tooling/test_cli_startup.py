"""Start-up cost of commands: what they import, and the plain-type argument coercion that keeps pydantic out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from labctl.cli import app


def _modules_after(argv: list[str]) -> set[str]:
    """Run ``labctl ARGV`` in a fresh interpreter; the heavy modules it imported."""
    code = (
        "import sys\n"
        f"sys.argv = ['labctl', *{argv!r}]\n"
        "from labctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(m for m in ('pydantic', 'pyroute2', 'scapy', 'iptc', 'rich.markdown') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    return set(out.stdout.split("\n")[-2].split())


def test_commands_that_load_no_lab_file_do_not_import_pydantic() -> None:
    assert _modules_after(["--help"]) == set()
    assert _modules_after(["completion", "bash"]) == set()
    assert _modules_after(["status", "no-such-lab-xyz"]) == set()  # an error, but after coercing its arguments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trace", "lab", "n", "IP()", "-n", "abc"], "'abc' is not a valid integer"),
        (["trace", "lab", "n", "IP()", "-n", "0"], "0 is not in the range 1<=x"),
        (["completion", "tcsh"], "'tcsh' is not one of"),
    ],
)
def test_bad_values_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.output


def test_plain_values_are_converted() -> None:
    from labctl.cli import coercion

    class Info:
        parser = None
        min = 1
        max = 10
        clamp = True
        case_sensitive = True
        path_type = None

    convert = coercion._converter(int, Info())
    assert convert is not None and convert("50") == 10 and convert(" 3") == 3
    to_bool = coercion._converter(bool, Info())
    assert to_bool is not None and to_bool("yes") is True and to_bool("off") is False
    assert coercion._converter(list[str], Info()) is not None
    assert coercion._converter(dict[str, str], Info()) is None  # left to Typer


def test_validating_a_file_without_checks_builds_no_check_model(tmp_path: pytest.TempPathFactory) -> None:
    """The check model (every expectation kind's module) is imported only for a file that has checks."""
    lab = tmp_path / "plain.yaml"  # type: ignore[operator]
    lab.write_text(
        "name: plain\ntopology:\n  nodes:\n    a: {interfaces: {eth0: {addresses: [10.0.0.1/24]}}}\n"
        "    b: {}\n  links:\n    - endpoints: ['a:eth0', 'b:eth0']\n"
    )
    code = (
        "import sys\n"
        f"sys.argv = ['labctl', 'validate', {str(lab)!r}]\n"
        "from labctl.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(' '.join(m for m in ('labctl.topology.checks', 'labctl.expect.kinds') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == ""
