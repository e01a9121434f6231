"""Shared by the CLI tests: run an experiment's ``main`` in-process the way the command line does."""

from sed_lens.cli import run_cli


def call_main(main, argv, capsys, prog="sed_lens"):
    """Run ``main(argv)`` through :func:`run_cli`; returns (exit code, stdout, stderr)."""
    try:
        code = run_cli(main, argv, prog=prog)
    except SystemExit as e:  # argparse: --help and bad flags
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
