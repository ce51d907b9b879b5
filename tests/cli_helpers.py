"""Calling the ``vlprompt`` command line in-process from tests: ``from cli_helpers import run_cli, refused``."""
from __future__ import annotations

import contextlib
import io

from vlprompt.cli import main


def run_cli(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``vlprompt *argv``; argparse's refusals count as exit statuses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse refuses a flag's value
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def refused(*argv) -> str:
    """The one-line error of a command the CLI refuses (exit status 2, no traceback)."""
    code, _, err = run_cli(*argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err
