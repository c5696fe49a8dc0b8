"""Parsing of SMTP command arguments (RFC 5321 §4.1, with the ESMTP parameters of
RFC 1870, 6152, 6531, 3461, 4954 and 8689).

Pure functions from text to values; every refusal is a ``ProtocolError`` with
the reply to send. Sequence rules are not checked here (``_state.py`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postillon.core.address import Address, AddressError, parse_domain, parse_path
from postillon.core.envelope import (
    BodyType,
    DsnRet,
    MailParams,
    RcptParams,
    has_controls,
    is_printable_ascii,
    xtext_decode,
)
from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol.errors import ProtocolError
from postillon.protocol.settings import ServerSettings

# RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
# esmtp-value = 1*(%d33-60 / %d62-126), widened to UTF-8 by RFC 6531 §3.3.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_MT_PRIORITY = re.compile(r"[+-]?[0-9]")  # RFC 6710 §3: priority-value, -9 .. 9
_VERB = re.compile(r"[A-Za-z]{1,16}\Z")
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ADDR_TYPE = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")  # RFC 3461 §4.2 addr-type
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})

MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2


def split_command(line: str) -> tuple[str, str]:
    """``"mail FROM:<a@b>"`` -> ``("MAIL", "FROM:<a@b>")``; verb upper-cased, args stripped.

    An empty or non-alphabetic verb gives ``("", ...)``, which no handler knows.
    """
    verb, _, args = line.partition(" ")
    if not _VERB.match(verb):
        return "", args
    return verb.upper(), args.strip(" ")


def parse_hello(args: str) -> str:
    """The EHLO/HELO/LHLO argument (RFC 5321 §4.1.1.1: a Domain or address-literal).

    Real clients often send names that are not valid domains (``my_host``,
    ``DESKTOP-42.local_``); like Postfix and Exim by default we accept any
    single printable token and leave judging it to policy. It ends up in the
    Received: header, so control characters and non-ASCII are refused.
    """
    words = args.split()
    if len(words) != 1:
        raise ProtocolError(R.HELLO_SYNTAX, "hello needs exactly one argument")
    name = words[0]
    if len(name) > 255 or not all(33 <= ord(c) <= 126 for c in name):
        raise ProtocolError(R.HELLO_SYNTAX, "hello name must be printable ASCII")
    if name.startswith("["):
        try:
            parse_domain(name)
        except AddressError as exc:
            raise ProtocolError(R.HELLO_SYNTAX, str(exc)) from None
    return name


def parse_no_args(args: str) -> None:
    if args:
        raise ProtocolError(R.PARAM_SYNTAX, "command takes no arguments")


@dataclass(frozen=True, slots=True)
class BdatCommand:
    size: int
    last: bool


def parse_bdat(args: str) -> BdatCommand:
    """``BDAT chunk-size [SP "LAST"]`` (RFC 3030 §2)."""
    words = args.split(" ")
    if not 1 <= len(words) <= 2 or not _DIGITS.match(words[0]):
        raise ProtocolError(R.BDAT_SYNTAX)
    if len(words) == 2 and words[1].upper() != "LAST":
        raise ProtocolError(R.BDAT_SYNTAX)
    return BdatCommand(int(words[0]), len(words) == 2)


def _split_path(rest: str, bad: Reply) -> tuple[str, list[str]]:
    """Split ``<path> params...`` honouring quoted local parts (which may hold ``>``).
    ``bad``: the reply if it is malformed (the error is built only then)."""
    if not rest.startswith("<"):
        raise ProtocolError(bad)
    if '"' not in rest:  # the usual case, nothing quoted: the first ">" ends the path
        i = rest.find(">")
        if i < 0:
            raise ProtocolError(bad)
    else:
        i = _quoted_path_end(rest)
        if i < 0:
            raise ProtocolError(bad)
    tail = rest[i + 1 :]
    if tail and not tail.startswith(" "):
        raise ProtocolError(bad)
    return rest[: i + 1], [p for p in tail.split(" ") if p]


def _quoted_path_end(rest: str) -> int:
    """The index of the ``>`` that ends ``<path>`` outside quotes, or -1."""
    quoted = False
    i = 1
    n = len(rest)
    while i < n:
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    return -1


def _split_param(param: str) -> tuple[str, str | None]:
    key, eq, value = param.partition("=")
    if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
        raise ProtocolError(R.BAD_PARAM, f"malformed parameter {param[:40]!r}")
    return key.upper(), (value if eq else None)


def _xtext(value: str, limit: int, *, printable: bool = True) -> str:
    """Decode an xtext parameter. ``printable``: the decoded value must be
    printable US-ASCII (RFC 3461's ENVID and ORCPT); otherwise only control
    characters are refused. Decoded values reach DSN fields and log lines, and
    "+0D+0A" would otherwise become a line break there."""
    if len(value) > limit:
        raise ProtocolError(R.BAD_PARAM, "xtext value too long")
    try:
        decoded = xtext_decode(value)
    except (ValueError, UnicodeError):
        raise ProtocolError(R.BAD_PARAM, "invalid xtext") from None
    bad = not is_printable_ascii(decoded) if printable else has_controls(decoded)
    if bad:
        raise ProtocolError(R.BAD_PARAM_VALUE, "xtext decodes to non-printable characters")
    return decoded


def _address(path: str, *, smtputf8: bool, rcpt: bool) -> Address | None:
    bad = R.BAD_RECIPIENT if rcpt else R.BAD_SENDER
    if not path.isascii() and not smtputf8:
        raise ProtocolError(R.NEEDS_SMTPUTF8)
    try:
        return parse_path(path, allow_null=not rcpt, allow_postmaster=rcpt, smtputf8=smtputf8)
    except (AddressError, UnicodeError) as exc:
        raise ProtocolError(bad, str(exc)) from None


def _strip_prefix(args: str, prefix: str) -> str:
    """``FROM:<a>`` or ``FROM: <a>`` (the space is tolerated, as most servers do)."""
    if args[: len(prefix)].upper() != prefix:
        raise ProtocolError(R.PARAM_SYNTAX, f"expected {prefix}")
    return args[len(prefix) :].lstrip(" ")


def parse_mail(
    args: str, settings: ServerSettings, *, tls_active: bool = False
) -> tuple[Address | None, MailParams]:
    """``MAIL FROM:<reverse-path> [SP params]``. Raises ProtocolError (501/553/555/552/530).

    ``tls_active``: the session is TLS now (REQUIRETLS is accepted only then)."""
    rest = _strip_prefix(args, "FROM:")
    path, raw_params = _split_path(rest, R.BAD_SENDER)
    params = parse_mail_params(raw_params, settings, tls_active=tls_active)
    sender = _address(path, smtputf8=params.smtputf8, rcpt=False)
    return sender, params


def parse_mail_params(
    raw: list[str], settings: ServerSettings, *, tls_active: bool = False
) -> MailParams:
    seen: dict[str, str | None] = {}
    for param in raw:
        key, value = _split_param(param)
        if key in seen:
            raise ProtocolError(R.BAD_PARAM, f"duplicate parameter {key}")
        seen[key] = value

    size: int | None = None
    body = BodyType.SEVEN_BIT
    smtputf8 = False
    ret: DsnRet | None = None
    envid: str | None = None
    auth: str | None = None
    requiretls = False
    mt_priority: int | None = None
    for key, value in seen.items():
        if key == "SIZE":  # RFC 1870
            if value is None or not _DIGITS.match(value):
                raise ProtocolError(R.BAD_PARAM, "SIZE needs a number")
            size = int(value)
        elif key == "BODY":  # RFC 6152; BINARYMIME (RFC 3030) is not offered
            upper = (value or "").upper()
            if upper == "7BIT":
                body = BodyType.SEVEN_BIT
            elif upper == "8BITMIME":
                body = BodyType.EIGHT_BIT_MIME
            else:
                raise ProtocolError(R.BAD_PARAM, "unsupported BODY")
        elif key == "SMTPUTF8" and settings.smtputf8:  # RFC 6531 §3.4
            if value is not None:
                raise ProtocolError(R.BAD_PARAM, "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET" and settings.dsn:  # RFC 3461 §4.3
            try:
                ret = DsnRet((value or "").upper())
            except ValueError:
                raise ProtocolError(R.BAD_PARAM, "RET must be FULL or HDRS") from None
        elif key == "ENVID" and settings.dsn:  # RFC 3461 §4.4
            if value is None:
                raise ProtocolError(R.BAD_PARAM, "ENVID needs a value")
            envid = _xtext(value, MAX_ENVID)
        elif key == "AUTH" and settings.auth_mechanisms:  # RFC 4954 §5
            if value is None:
                raise ProtocolError(R.BAD_PARAM, "AUTH needs a value")
            auth = "<>" if value == "<>" else _xtext(value, 500, printable=False)
        elif key == "REQUIRETLS" and settings.requiretls and not settings.lmtp:  # RFC 8689 §2
            if value is not None:
                raise ProtocolError(R.BAD_PARAM, "REQUIRETLS takes no value")
            if not tls_active:
                # Not advertised before TLS (RFC 8689 §2); a client that sends it
                # anyway asks for a promise this plaintext session cannot keep.
                raise ProtocolError(R.REQUIRETLS_NEEDS_TLS)
            requiretls = True
        elif key == "MT-PRIORITY" and settings.mt_priority and not settings.lmtp:  # RFC 6710
            if value is None or not _MT_PRIORITY.fullmatch(value):
                raise ProtocolError(R.BAD_PARAM, "MT-PRIORITY must be -9 to 9")
            mt_priority = int(value)
        else:
            raise ProtocolError(R.BAD_PARAM, f"unsupported parameter {key[:20]}")

    limit = settings.max_message_size
    if size is not None and limit and size > limit:
        raise ProtocolError(R.MESSAGE_TOO_BIG, f"declared SIZE {size} > {limit}")
    return MailParams(
        size=size,
        body=body,
        smtputf8=smtputf8,
        ret=ret,
        envid=envid,
        auth=auth,
        requiretls=requiretls,
        mt_priority=mt_priority,
    )


def parse_rcpt(
    args: str, settings: ServerSettings, *, smtputf8: bool
) -> tuple[Address, RcptParams]:
    """``RCPT TO:<forward-path> [SP params]``. ``smtputf8``: the transaction's MAIL said so."""
    rest = _strip_prefix(args, "TO:")
    path, raw_params = _split_path(rest, R.BAD_RECIPIENT)
    params = parse_rcpt_params(raw_params, settings)
    recipient = _address(path, smtputf8=smtputf8, rcpt=True)
    assert recipient is not None  # allow_null is False for RCPT
    return recipient, params


def parse_rcpt_params(raw: list[str], settings: ServerSettings) -> RcptParams:
    notify: frozenset[str] = frozenset()
    orcpt: str | None = None
    seen: set[str] = set()
    for param in raw:
        key, value = _split_param(param)
        if key in seen:
            raise ProtocolError(R.BAD_PARAM, f"duplicate parameter {key}")
        seen.add(key)
        if key == "NOTIFY" and settings.dsn:  # RFC 3461 §4.1
            items = frozenset((value or "").upper().split(","))
            if items == {"NEVER"} or (items and items <= _NOTIFY_VALUES):
                notify = items
            else:
                raise ProtocolError(R.BAD_PARAM, "NOTIFY is NEVER or SUCCESS,FAILURE,DELAY")
        elif key == "ORCPT" and settings.dsn:  # RFC 3461 §4.2
            addr_type, semi, xtext = (value or "").partition(";")
            if not semi or not _ADDR_TYPE.match(addr_type) or not xtext:
                raise ProtocolError(R.BAD_PARAM, "ORCPT is addr-type;xtext")
            orcpt = f"{addr_type};{_xtext(xtext, MAX_ORCPT)}"
        else:
            raise ProtocolError(R.BAD_PARAM, f"unsupported parameter {key[:20]}")
    return RcptParams(notify=notify, orcpt=orcpt)
