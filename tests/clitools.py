"""Running `ladd` in the test process and reading what it said (tests/test_precompute.py, test_buckets.py)."""

from ladd.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ladd ARGS` (arguments may be paths or numbers)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """ladd's own lines on stderr, not libraries' progress bars."""
    return [line for line in err.splitlines() if line.startswith("ladd ")]
