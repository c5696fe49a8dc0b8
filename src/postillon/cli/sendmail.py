"""The sendmail-compatible commands: ``sendmail``, ``mailq``, ``newaliases``.

``sendmail`` never talks to the server: it writes the message into the
maildrop (``intake.maildrop``) and exits 0 once the file is durable; the
server's pickup task queues it through intake (one way into the queue), now
or when the server comes back. It runs as any user, no set-uid needed.

Options (Postfix's set; sendmail's getopt syntax, clustered flags allowed):
``-t`` recipients from To/Cc/Bcc added to any on the command line, Bcc
removed; ``-i``/``-oi`` a lone ``.`` line does not end input; ``-f``/``-r``
sender (honoured for root and the server user, otherwise recorded in an
X-Authentication-Warning header by pickup); ``-F`` full name; ``-bs`` SMTP on
stdin/stdout; ``-bp`` list the queue (= ``mailq``); ``-q`` flush; ``-bi``/``-I``
(= ``newaliases``); ``-bm`` the default. Other ``-o``/``-O`` options and the
options cron and MUAs pass (``-B``, ``-N``, ``-R``, ``-V``, ``-X``, ``-h``,
``-e``, ``-p``, ``-A``, ``-L``, ``-v``, ``-m``, ``-n``, ``-x``, ``-U``, ``-G``,
``-c``) are accepted and ignored. Anything else: EX_USAGE.

Config: ``-C FILE``, else ``$POSTILLON_CONFIG``, else /etc/postillon/postillon.toml.
Exit codes from sysexits.h.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import BinaryIO

from postillon.cli.config_path import DEFAULT_CONFIG, find_config
from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config
from postillon.core.address import AddressError, parse_mailbox
from postillon.core.reply import Reply
from postillon.intake.maildrop import (
    DropEnvelope,
    clean_value,
    field_name,
    field_value,
    split_header,
    to_crlf,
    write_drop,
)

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Options taking an argument (attached or the next word); Postfix's getopt string.
_WITH_ARG = frozenset("ABCFLNORVXbefhopr")
_FLAGS = frozenset("GIUcimntvx")
_RECIPIENT_HEADERS = ("to", "cc", "bcc")


class UsageError(Exception):
    pass


@dataclass
class Options:
    mode: str = "m"  # m deliver, s SMTP, p list queue, i newaliases, q flush
    extract: bool = False  # -t
    dot_ends: bool = True  # cleared by -i / -oi
    sender: str | None = None
    full_name: str = ""
    config: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's getopt: options first, then recipients; ``--`` ends options."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            i -= 1
            break
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter == "q":  # -q, -q30m, -qR...: an optional attached argument
                opts.mode = "q"
                break
            if letter in _FLAGS:
                if letter == "t":
                    opts.extract = True
                elif letter == "i":
                    opts.dot_ends = False
                elif letter == "I":
                    opts.mode = "i"
                continue
            if letter not in _WITH_ARG:
                raise UsageError(f"illegal option -- {letter}")
            if pos < len(arg):
                value = arg[pos:]
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise UsageError(f"option requires an argument -- {letter}")
            _apply(opts, letter, value)
            break
    opts.recipients.extend(argv[i:])
    return opts


def _apply(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        value = value.strip()
        opts.sender = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    elif letter == "F":
        opts.full_name = clean_value(value)
    elif letter == "C":
        opts.config = value
    elif letter == "o" and value == "i":
        opts.dot_ends = False
    elif letter == "b":
        if value not in ("m", "s", "p", "i"):
            raise UsageError(f"-b{value} is not supported (use -bm, -bs, -bp or -bi)")
        opts.mode = value
    # every other option (-o*, -O, -B, -N, -R, -V, -X, -h, -e, -p, -A, -L) is ignored


# -- the message --------------------------------------------------------------------


class MessageTooLarge(Exception):
    """stdin holds more than ``[limits] message_size`` octets."""


def read_message(stream: BinaryIO, dot_ends: bool, limit: int = 0) -> bytes:
    """Read stdin. Without -i a line holding only "." ends the message (it is not
    part of it); a leading mbox "From " line is dropped (as Postfix does).

    With a ``limit`` (``[limits] message_size``), at most that many octets (and a
    line's worth) are read: a runaway cron job's output raises MessageTooLarge
    instead of filling this process's memory. CRLF conversion only makes a message
    longer, so a raw message over the limit is over it after conversion too.
    """
    # The From_ line dropped below may be up to one line longer than the limit.
    budget = limit + _MAX_FROM_LINE if limit else -1
    if not dot_ends:
        data = stream.read(budget + 1) if limit else stream.read()
        if limit and len(data) > budget:
            raise MessageTooLarge
    else:
        lines: list[bytes] = []
        total = 0
        while line := stream.readline(budget + 1 - total if limit else -1):
            if line in (b".\n", b".\r\n", b"."):
                break
            lines.append(line)
            total += len(line)
            if limit and total > budget:
                raise MessageTooLarge
        data = b"".join(lines)
    if data.startswith(b"From "):
        data = data.partition(b"\n")[2]
    return data


_MAX_FROM_LINE = 1000  # octets of an mbox "From " line allowed on top of the limit


def extract_recipients(message: bytes) -> tuple[list[str], bytes]:
    """-t: the addresses in To, Cc and Bcc, and the message without Bcc fields.
    ``message`` has CRLF line endings."""
    fields, rest = split_header(message)
    values = [field_value(f) for f in fields if field_name(f) in _RECIPIENT_HEADERS]
    addresses = [addr for _, addr in getaddresses(values) if addr]
    kept = b"".join(f for f in fields if field_name(f) != "bcc")
    return addresses, kept + rest


def split_recipients(args: Sequence[str]) -> list[str]:
    """Command-line recipients; one argument may hold a comma-separated list."""
    out: list[str] = []
    for arg in args:
        found = [addr for _, addr in getaddresses([arg]) if addr]
        # What getaddresses cannot read is kept, so that it is refused, not dropped.
        out.extend(found or ([arg.strip()] if arg.strip() else []))
    return out


def check_recipient(address: str) -> None:
    """Syntax only (unqualified names are fine: pickup adds @hostname)."""
    parse_mailbox(address if "@" in address else f"{address}@localhost", smtputf8=True)


# -- entry points ---------------------------------------------------------------------


def _err(text: str) -> None:
    print(f"sendmail: {text}", file=sys.stderr)


def _load_config(explicit: str | None) -> Config:
    path = find_config(explicit)
    if path is None:
        raise ConfigError(f"no configuration: set $POSTILLON_CONFIG or create {DEFAULT_CONFIG}")
    return load_config(path)


def _invoker() -> tuple[int, str]:
    uid = os.getuid()
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid{uid}"


def _drop(config: Config, envelope: DropEnvelope, message: bytes) -> int:
    directory = config.data_dir / "maildrop"
    try:
        write_drop(directory, envelope, message)
    except (FileNotFoundError, NotADirectoryError):
        _err(f"no maildrop directory {directory}: has the server been started?")
        return EX_CANTCREAT
    except PermissionError as exc:
        _err(f"cannot write into {directory}: {exc.strerror}")
        return EX_CANTCREAT
    except OSError as exc:
        _err(f"cannot write the message: {exc}")
        return EX_TEMPFAIL
    return EX_OK


def _deliver(opts: Options, config: Config, stdin: BinaryIO) -> int:
    recipients = split_recipients(opts.recipients)
    if not recipients and not opts.extract:
        _err("Recipient addresses must be specified on the command line or via the -t option")
        return EX_USAGE
    limit = config.limits.message_size
    try:
        message = to_crlf(read_message(stdin, opts.dot_ends, limit))
    except MessageTooLarge:
        _err(f"message too large (more than {limit} octets)")
        return EX_DATAERR
    if opts.extract:
        found, message = extract_recipients(message)
        recipients += found
    if not recipients:
        _err("no recipient addresses found in message header")
        return EX_DATAERR
    for rcpt in recipients:
        try:
            check_recipient(rcpt)
        except AddressError as exc:
            _err(f"bad recipient address {rcpt!r}: {exc}")
            return EX_NOUSER
    if limit and len(message) > limit:
        _err(f"message too large ({len(message)} > {limit} octets)")
        return EX_DATAERR
    if opts.sender:
        try:
            check_recipient(opts.sender)
        except AddressError as exc:
            _err(f"bad sender address {opts.sender!r}: {exc}")
            return EX_DATAERR
    uid, user = _invoker()
    envelope = DropEnvelope(
        tuple(dict.fromkeys(recipients)), opts.sender, opts.full_name, uid, user
    )
    return _drop(config, envelope, message)


def _smtp(opts: Options, config: Config, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """-bs: an SMTP dialogue on stdin/stdout; each accepted message goes to the maildrop."""
    from postillon.protocol import events as ev
    from postillon.protocol.server import NEED_DATA, ServerConnection, ServerSettings

    conn = ServerConnection(
        ServerSettings(
            hostname=config.hostname,
            max_message_size=config.limits.message_size,
            max_recipients=config.limits.recipients,
            max_errors=config.limits.errors,
            max_command_line=config.limits.command_line,
            chunking=True,
        )
    )
    uid, user = _invoker()
    sender: str | None = None
    recipients: list[str] = []
    body: list[bytes] = []
    conn.greet(Reply.of(220, None, f"{config.hostname} ESMTP postillon (sendmail -bs)"))
    while not conn.closing:
        event = conn.next_event()
        if event is NEED_DATA:
            stdout.write(conn.data_to_send())
            stdout.flush()
            conn.receive_data(os.read(stdin.fileno(), 65536))
            continue
        match event:
            case ev.Hello():
                conn.accept_hello()
            case ev.MailFrom(sender=address):
                sender, recipients, body = ("" if address is None else str(address)), [], []
                conn.reply(Reply.of(250, "2.1.0", "Ok"))
            case ev.RcptTo(recipient=address):
                recipients.append(str(address))
                conn.reply(Reply.of(250, "2.1.5", "Ok"))
            case ev.DataRequested():
                conn.reply(Reply.of(354, None, "End data with <CR><LF>.<CR><LF>"))
            case ev.BodyData(data=data):
                body.append(data)
            case ev.MessageComplete():
                envelope = DropEnvelope(
                    tuple(dict.fromkeys(recipients)), sender, opts.full_name, uid, user
                )
                code = _drop(config, envelope, b"".join(body))
                conn.reply(
                    Reply.of(250, "2.0.0", "Ok: queued")
                    if code == EX_OK
                    else Reply.of(451, "4.3.0", "Cannot write the message, try again later")
                )
                sender, recipients, body = None, [], []
            case ev.StartTlsRequested():
                conn.reply(Reply.of(454, "4.7.0", "TLS not available"))
            case ev.MessageAborted() | ev.TransactionReset():
                sender, recipients, body = None, [], []
            case _:
                pass
    stdout.write(conn.data_to_send())
    stdout.flush()
    return EX_OK


def _queue(config: Config, command: str) -> int:
    from postillon.cli import queue_cmd

    args = argparse.Namespace(queue_command=command, state=None, json=False)
    code = queue_cmd.run(args, config)
    return EX_OK if code == 0 else EX_TEMPFAIL


def run(
    argv: Sequence[str],
    *,
    config_path: str | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        _err(str(exc))
        return EX_USAGE
    try:
        config = _load_config(opts.config or config_path)
    except ConfigError as exc:
        _err(str(exc))
        return EX_CONFIG
    except PermissionError as exc:
        _err(f"cannot read the configuration: {exc}")
        return EX_CONFIG
    if opts.mode == "i":
        return _newaliases(config)
    try:
        if opts.mode == "p":
            return _queue(config, "list")
        if opts.mode == "q":
            return _queue(config, "flush")
        if opts.mode == "s":
            return _smtp(opts, config, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
        return _deliver(opts, config, stdin or sys.stdin.buffer)
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except OSError as exc:
        _err(str(exc))
        return EX_OSERR


def postillon_command(argv: Sequence[str]) -> int | None:
    """``postillon [-c FILE | --config FILE] sendmail|mailq|newaliases ARGS...``:
    the arguments after the command use sendmail's syntax, not argparse's.
    Returns None when ``argv`` is another postillon command."""
    config: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
            i += 1
        else:
            break
    if i >= len(argv):
        return None
    command, rest = argv[i], list(argv[i + 1 :])
    if command == "sendmail":
        return run(rest, config_path=config)
    if command == "mailq":
        return run(["-bp", *rest], config_path=config)
    if command == "newaliases":
        return run(["-bi", *rest], config_path=config)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


def mailq_main(argv: Sequence[str] | None = None) -> int:
    return run(["-bp", *(sys.argv[1:] if argv is None else argv)])


def _newaliases(config: Config) -> int:
    """``newaliases``: there is no alias database to build (postillon reads the
    aliases files themselves), so check them and make the running server
    re-read them, as an operator who just edited /etc/aliases expects."""
    # Imported here: the server's modules are not needed by sendmail's hot path.
    from postillon.build import build_local_recipients
    from postillon.cli.reload_cmd import NotOurServer, signal_server
    from postillon.paths import pid_path

    try:
        build_local_recipients(config)
    except (ValueError, OSError) as exc:  # AliasesError is a ValueError
        _err(f"{exc}\nthe running server keeps its aliases")
        return EX_CONFIG
    print("postillon: aliases checked")
    try:
        pid = signal_server(pid_path(config.data_dir))
    except NotOurServer as exc:
        _err(f"not signalling: {exc}")
        return EX_NOPERM
    except PermissionError:
        _err("not allowed to signal the server; run as its user or root")
        return EX_NOPERM
    if pid is None:
        print("postillon: no running server; it reads the aliases when it starts")
        return EX_OK
    print(f"postillon: reload requested (pid {pid}); see the log for the result")
    return EX_OK


def newaliases_main(argv: Sequence[str] | None = None) -> int:
    return run(["-bi", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
