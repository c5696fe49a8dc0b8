"""``postillon(8)``, generated from the command's own argparse definitions.

Every subcommand (``queue list``, ``tls renew``, ...) with its description, positional
arguments and options, in the order the parser defines them: the page cannot drift from
what ``postillon --help`` says. Output is deterministic (no terminal width, no dates).
"""

from __future__ import annotations

import argparse

from postillon.cli.docgen import GENERATED, roff

# Subcommands that hand their arguments to another parser (sendmail's own options).
_FOREIGN = {"sendmail", "mailq", "newaliases"}


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in definition order."""
    found: list[tuple[str, str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if text is argparse.SUPPRESS:
        return ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "postillon", "default": action.default}
    return text


def _option_line(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices is not None and action.metavar is None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return f"{names} \\fI{roff(str(metavar))}\\fR"


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help is argparse.SUPPRESS:
            continue
        out.append(".TP")
        if action.option_strings:
            out.append(_option_line(action))
        else:
            metavar = action.metavar or action.dest
            out.append(f"\\fI{roff(str(metavar))}\\fR")
        text = _help(action)
        if text:
            out.append(roff(text))
    return out


def _command(path: str, summary: str, parser: argparse.ArgumentParser, out: list[str]) -> None:
    subs = _subparsers(parser)
    out.append(f'.SS "{roff(path)}"')
    text = parser.description or summary
    if text:
        out.append(roff(" ".join(text.split())))
    if path.split()[-1] in _FOREIGN:
        out.append(roff("Takes the options of sendmail(8); see the sendmail command."))
    else:
        out.extend(_arguments(parser))
    for name, sub_summary, sub in subs:
        _command(f"{path} {name}", sub_summary, sub, out)


def man8(parser: argparse.ArgumentParser, version: str) -> str:
    out = [
        f'.\\" {GENERATED}',
        f'.TH POSTILLON 8 "" "postillon {version}" "System Administration"',
        ".SH NAME",
        "postillon \\- mail transfer agent: SMTP in, durable queue, Maildir/LMTP/SMTP out",
        ".SH SYNOPSIS",
        "\\fBpostillon\\fR [\\fB\\-\\-config\\fR \\fIFILE\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        roff(" ".join((parser.description or "").split())),
        ".SH OPTIONS",
        *_arguments(parser),
        ".SH COMMANDS",
    ]
    for name, summary, sub in _subparsers(parser):
        _command(f"postillon {name}", summary, sub, out)
    out += [
        ".SH SIGNALS",
        ".TP",
        "SIGTERM, SIGINT",
        roff("stop: sessions in DATA finish, leased deliveries go back to the queue"),
        ".TP",
        "SIGHUP",
        roff("reload the configuration, certificates, aliases and accounts"),
        ".TP",
        "SIGUSR2",
        roff("renew the ACME certificate now (what postillon tls renew sends)"),
        ".SH FILES",
        ".TP",
        "/etc/postillon/postillon.toml",
        "the configuration (see \\fBpostillon.toml\\fR(5))",
        ".SH SEE ALSO",
        "\\fBpostillon.toml\\fR(5), \\fBsendmail\\fR(8)",
    ]
    return "\n".join(out) + "\n"
