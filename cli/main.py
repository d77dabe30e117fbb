"""``statelens``: the entry point. Commands live one per module; this file wires them and owns the
error policy: bad input -> one line, exit 2; internal failure -> one line, exit 1; ``--debug`` shows
the traceback."""
from __future__ import annotations

import sys

import typer

from statelens.analysis import analyses
from statelens.cli import check, demo, posttrain, report
from statelens.cli.analysis import command
from statelens.tasks import tasks

app = typer.Typer(
    name="statelens",
    help="Diagnose the recurrent state of linear recurrent language models (Mamba-2, Mamba-1, ...).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("demo")(demo.demo)
app.command("check")(check.check)
for spec in analyses:
    app.command(spec.name)(command(spec))
app.command("report")(report.report)
app.command("compare")(report.compare)
for spec in tasks:
    app.command(spec.name)(command(spec))
app.command("posttrain")(posttrain.posttrain)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """statelens: state diagnostics for recurrent language models."""


def main() -> None:
    from statelens.distributed import RankDone

    try:
        _run()
    except RankDone:  # under torchrun: this rank's groups are sent; rank 0 writes the outputs
        from statelens import distributed

        distributed.barrier()
        sys.exit(0)
    except SystemExit as e:
        if not e.code:  # under torchrun: no rank leaves a command before rank 0 has written its outputs
            from statelens import distributed

            distributed.barrier()
        raise


def _run() -> None:
    from statelens.distributed import RankDone
    from statelens.errors import StatelensError
    from statelens.resumable import Interrupted

    args = sys.argv[1:] or ["--help"]
    debug = "--debug" in args
    try:
        code = app(args, standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt that no command caught into 130, silently
            print("statelens: interrupted", file=sys.stderr)
        sys.exit(code or 0)
    except typer.TyperException as e:  # a bad or missing option (click's UsageError): one line, exit 2
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx else "statelens"
        print(f"statelens: error: {' '.join(e.format_message().split())} (see '{command} --help')", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        print("statelens: interrupted", file=sys.stderr)
        sys.exit(130)
    except Interrupted as e:  # SIGINT/SIGTERM during resumable work: what was kept, and how to go on
        saved = f": {e.saved}; rerun the same command with --resume to continue" if e.saved else ""
        print(f"statelens: interrupted by {e.name}{saved}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RankDone:
        raise
    except StatelensError as e:
        if debug:
            raise
        print(f"statelens: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("statelens: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # an internal failure: short message, traceback only on request
        if debug:
            raise
        print(f"statelens: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
