"""The command line's contract for a user mistake, shared by the CLI tests: exit code 2, one line on
stderr, no traceback."""
from psld_fast.cli import main


def cli_error(capsys, argv, warnings_first: bool = False) -> str:
    """Run the CLI in-process and return the one stderr line of a mistake.  ``warnings_first``:
    one-line warnings may come before it (a sampler's stability warning)."""
    code = None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    if warnings_first:
        *before, err = err.splitlines()
        assert all(": warning: " in ln for ln in before), before
    assert "\n" not in err, err
    return err
