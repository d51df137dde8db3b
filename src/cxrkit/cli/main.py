"""The ``cxr`` command: one module per command, each a thin call into the library.

Heavy imports (torch) happen inside the commands, so ``cxr --help`` is instant. User mistakes raise
:class:`~cxrkit.errors.CxrError`, printed as one line with a non-zero exit; ``CXR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import typer

from cxrkit.cli import (
    cache,
    calibrate,
    compare,
    embed,
    evaluate,
    explain,
    export,
    models,
    predict,
    report,
    serve,
    train,
)
from cxrkit.errors import CxrError, first_line, printable, user_message
from cxrkit.runs import interrupted, on_interrupt

app = typer.Typer(
    name="cxr", help="Transfer learning on chest X-rays: train, evaluate and apply CNNs from recipes.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("calibrate")(calibrate.calibrate)
app.command("report")(report.report)
app.command("compare")(compare.compare)
app.command("models")(models.models)
app.command("embed")(embed.embed)
app.command("explain")(explain.explain)
app.command("export")(export.export)
app.command("serve")(serve.serve)
app.add_typer(cache.app, name="cache")


def _quiet_about_interrupts(hook: Any) -> Any:
    """``sys.unraisablehook`` that says nothing of a KeyboardInterrupt raised where Python cannot pass it on (in a
    ``__del__``): on_interrupt remembered it, and the command ends as interrupted instead of printing a traceback."""
    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)
    return quiet


def main() -> None:
    """Entry point of the console script."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (a job run
        signal.signal(signal.SIGINT, on_interrupt)                     # with & from a script, nohup)
    sys.unraisablehook = _quiet_about_interrupts(sys.unraisablehook)
    try:
        app()
    except CxrError as err:
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"error: {printable(user_message(err))}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if os.environ.get("CXR_DEBUG") or err.filename is None:  # no file named: not a user's path, a bug
            raise
        print(f"error: {err.filename}: {err.strerror or first_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exit_:
        if exit_.code in (0, None) and interrupted():  # a Ctrl-C lost where Python ignores exceptions
            exit_.code = 130
        if exit_.code == 130:  # typer turns Ctrl-C into this exit status without a word
            print("interrupted", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
