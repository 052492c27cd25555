"""What every `lionmq` command shares: exit codes, configuration, the context a command runs
with, argument types and the subcommand table. The command modules (messages, channels, nodes)
build on this; `main` wires them together.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import msgspec

from lionmq import Client
from lionmq.cli import output

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NACKED = 4
EXIT_INTERRUPTED = 130

HELP_WIDTH = 79
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "LIONMQ_URL"
TOKEN_ENV = "LIONMQ_TOKEN"
ADMIN_TOKEN_ENV = "LIONMQ_ADMIN_TOKEN"

ENVIRONMENT = f"""environment:
  {URL_ENV}          node URL(s), comma-separated, when --url is not given
                      (default {DEFAULT_URL})
  {TOKEN_ENV}        the nodes' API_TOKEN
  {ADMIN_TOKEN_ENV}  the cluster's ADMIN_TOKEN (nodes set, nodes handoff)

exit codes: 0 done, 1 the node refused or failed, 2 bad usage or input,
  3 no node reachable, 4 consume --exec: a command failed (its message was nacked),
  130 interrupted
"""


class UsageError(Exception):
    """A bad argument or input found by the command itself (exit 2)."""


class Context:
    """What every command gets: the parsed arguments, the streams and a client made on
    first use (a command that fails on its arguments never connects)."""

    def __init__(self, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.out = stdout
        self.err = stderr
        self.json: bool = args.json
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(
                urls(self.args.url),
                token=os.environ.get(TOKEN_ENV) or None,
                admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
            )
        return self._client

    def require_admin(self) -> None:
        """Cluster changes take the admin token: say so before connecting at all."""
        if not os.environ.get(ADMIN_TOKEN_ENV):
            raise UsageError(f"this command needs the cluster's ADMIN_TOKEN: set {ADMIN_TOKEN_ENV}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def emit(self, value: Any) -> None:
        """`value` as indented JSON on stdout (for --json)."""
        self.out.write(output.pretty(value) + "\n")


def urls(given: Sequence[str] | None) -> list[str]:
    """--url (repeatable, each may be comma-separated), else LIONMQ_URL, else the default."""
    raw = list(given or []) or [os.environ.get(URL_ENV) or DEFAULT_URL]
    found = [u.strip() for item in raw for u in item.split(",") if u.strip()]
    if not found:
        raise UsageError(f"no node URL: give --url or set {URL_ENV}")
    for url in found:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"{url!r} is not a node URL (http://host:port)")
    return found


# -- argument types: a bad value is a usage error naming the argument ----------------------

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text: str) -> int:
    """500ms, 30s, 5m, 1h, 7d; a bare number is milliseconds (the API's unit)."""
    value = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if value.endswith(u)), "")
    number = value[: len(value) - len(unit)] if unit else value
    try:
        amount = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (500ms, 30s, 5m, 1h, 7d)"
        ) from None
    if amount < 0 or amount != amount:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return round(amount * _UNITS_MS[unit or "ms"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def json_value(text: str | bytes, where: str) -> Any:
    """`text` parsed as JSON, or a UsageError naming `where` (BODY, a file's line). A str
    from argv keeps bytes that are not UTF-8 as surrogates: they are refused as such."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    try:
        return msgspec.json.decode(raw)
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text") from None
    except msgspec.DecodeError as exc:
        raise UsageError(
            f"{where} is not JSON ({exc}); a string needs quotes: '\"hello\"'"
        ) from None


# -- the parser -----------------------------------------------------------------------------

Run = Callable[[Context, argparse.Namespace], int]


class Commands:
    """The subparsers, with what every subcommand shares (--url, --json, help layout)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        self.common = argparse.ArgumentParser(add_help=False)
        add_common(self.common, argparse.SUPPRESS)

    def add(
        self,
        name: str,
        help: str,
        example: str,
        run: Run | None,
        description: str = "",
        sub: Any = None,
    ) -> argparse.ArgumentParser:
        """A subcommand with its one-line help, a description and an example (`--help`
        shows both). `sub`: the subparsers of a command group (`nodes`)."""
        parser: argparse.ArgumentParser = (sub or self._sub).add_parser(
            name,
            help=help,
            # Raw (the examples keep their lines), so the description is wrapped here.
            description=textwrap.fill(description or help, HELP_WIDTH),
            epilog="example:\n" + indent(example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[self.common],
        )
        if run is not None:
            parser.set_defaults(run=run)
        return parser


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines())


def add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--url",
        action="append",
        default=default,
        metavar="URL",
        help=f"a node URL; repeat it or separate with commas for a cluster's seeds "
        f"(default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print JSON (for scripts) instead of tables",
    )
