"""The ``tinysam`` command: one module per sub-command (``register`` adds its parser and sets
``run``), ``common`` for what they share. Commands only parse and call the library.

Every failure a user can cause (a bad argument, a missing or wrong checkpoint, an unreadable
image, a full disk) ends with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Sequence

from ..version import __version__
from . import (
    bench,
    boxes,
    distill,
    embed,
    evaluate,
    everything,
    export,
    info,
    label_studio,
    quantize,
    segment,
    serve,
)
from .common import (
    EXIT_USAGE,
    Parser,
    UsageError,
    missing_extra,
    one_line,
    print_json,
)

COMMANDS = (
    segment,
    info,
    everything,
    boxes,
    embed,
    export,
    distill,
    quantize,
    evaluate,
    bench,
    serve,
    label_studio,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tinysam",
        description="TinySAM: promptable segmentation that runs fast on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"tinysam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..perf import tune_allocator

    args = build_parser().parse_args(argv)
    tune_allocator()
    show = getattr(args, "show", print_json)
    try:
        with _notes(args.command):
            show(args.run(args))
    except KeyboardInterrupt:
        print("tinysam: interrupted", file=sys.stderr)
        return 130
    except ImportError as err:
        print(f"tinysam {args.command}: error: {missing_extra(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ValueError, OSError) as err:
        print(f"tinysam {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


@contextlib.contextmanager
def _notes(command: str):
    """``perf.PrecisionWarning`` as one ``tinysam COMMAND: note: ...`` line on stderr."""
    from ..perf import PrecisionWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, PrecisionWarning):
                print(f"tinysam {command}: note: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        warnings.simplefilter("once", PrecisionWarning)
        yield


__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
