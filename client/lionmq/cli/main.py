"""Argument parsing, configuration and exit codes of the `lionmq` command.

Every command module registers its subcommands with `register(commands)`; each subcommand's
`run(ctx, args)` returns an exit code. Failures become one line on stderr:

    lionmq: error: <the problem's detail>

with exit code 1 (the node refused or failed), 2 (usage: a bad argument or input), 3 (no node
could be reached), 4 (`consume --exec`: a command failed and its message was nacked), 130
(interrupted).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from lionmq import ConnectionFailed, InvalidTopology, LionMQError
from lionmq.cli import channels, messages, nodes, output
from lionmq.cli.command import (
    ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Commands,
    Context,
    UsageError,
    add_common,
    indent,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lionmq",
        description="Publish, consume, browse and operate LionMQ channels and clusters.",
        epilog="example:\n"
        + indent("""
lionmq --url http://127.0.0.1:8000 publish orders '{"sku": "A1"}'
lionmq consume orders --max 10
lionmq COMMAND --help      (each command's options, with an example)
""")
        + "\n\n"
        + ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lionmq {_version()}")
    add_common(parser, None)
    commands = Commands(parser)
    messages.register(commands)
    channels.register(commands)
    nodes.register(commands)
    return parser


def _check_text(args: argparse.Namespace) -> None:
    """Arguments and LIONMQ_* settings are text: bytes that are not UTF-8 (kept by Python as
    surrogates) would fail as a traceback wherever they are first encoded."""
    given = [(f"the {name} argument", v, True) for name, v in vars(args).items()]
    # A setting's value is not shown: LIONMQ_TOKEN is a secret.
    given += [(n, v, False) for n, v in os.environ.items() if n.startswith("LIONMQ_")]
    for what, value, show in given:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode()
                except UnicodeEncodeError:
                    shown = f" {repr(os.fsencode(text))[1:]}" if show else ""
                    raise UsageError(f"{what}{shown} is not UTF-8 text") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lionmq")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """The `lionmq` script: parses `argv`, runs the command, returns the exit code."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's own message on bad usage
    ctx = Context(args, out, err)
    try:
        _check_text(args)
        code: int = args.run(ctx, args)
        return code
    except UsageError as exc:
        output.error(str(exc), err)
        return EXIT_USAGE
    except InvalidTopology as exc:  # checked by the client: nothing was sent
        output.error(exc.detail or exc.title, err)
        return EXIT_USAGE
    except ConnectionFailed as exc:
        output.error(f"cannot reach the node: {exc.detail or exc.title}", err)
        return EXIT_UNREACHABLE
    except LionMQError as exc:
        output.error(exc.detail or exc.title, err)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        err.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say. Point stdout at devnull so
        # the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEM
    finally:
        ctx.close()
