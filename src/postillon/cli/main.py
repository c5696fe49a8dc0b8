"""The ``postillon`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from postillon import __version__
from postillon.cli.config_path import DEFAULT_CONFIG, find_config
from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config


def _parser(serve_only: bool = False) -> argparse.ArgumentParser:
    """The command line; ``serve_only``: the global options and ``serve`` alone, so the
    server does not hold the other commands' modules (rich, asyncpg, the Postfix importer:
    ~6 MiB PSS, bench/README.md "Memory")."""
    parser = argparse.ArgumentParser(
        prog="postillon",
        description="postillon, a mail transfer agent. Every command reads its config from "
        f"--config FILE, else $POSTILLON_CONFIG, else {DEFAULT_CONFIG}.",
    )
    parser.add_argument("--version", action="version", version=f"postillon {__version__}")
    parser.add_argument("-c", "--config", metavar="FILE", help="configuration file (TOML)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the mail server in the foreground",
        description="Bind the listeners, drop privileges, deliver the queue. "
        "Stops cleanly on SIGTERM/SIGINT (sessions in DATA finish, leased deliveries go "
        "back to the queue; [shutdown] grace bounds the wait). SIGHUP reloads the config.",
    )
    check = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration; errors name the file and key.",
    )
    check.add_argument("file", nargs="?", help="the file to check (default: as for --config)")
    if not serve_only:
        _add_tool_parsers(sub)
    return parser


def _add_tool_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from postillon.cli import tools

    tools.queue_cmd.add_parser(sub)
    tools.user_cmd.add_parser(sub)
    tools.db_cmd.add_parser(sub)
    tools.dkim_cmd.add_parser(sub)
    tools.dns_cmd.add_parser(sub)
    tools.reload_cmd.add_parser(sub)
    tools.admin_cmd.add_parser(sub)
    tools.tls_cmd.add_parser(sub)
    tools.setup_cmd.add_parser(sub)
    tools.import_postfix_cmd.add_parser(sub)
    tools.docs_cmd.add_parser(sub)
    tools.explain_cmd.add_parser(sub)
    tools.dmarc_cmd.add_parser(sub)
    for name, text in (
        ("sendmail", "the sendmail-compatible command (takes sendmail's own options)"),
        ("mailq", "list the queue (= sendmail -bp)"),
        ("newaliases", "no-op: aliases are read at start and reload (= sendmail -bi)"),
    ):
        sub.add_parser(name, help=text, add_help=False)


def _unreadable_ca_files(config: Config) -> list[str]:
    """CA files for outbound TLS that the server could not use, by key."""
    from postillon.outbound.tls import load_anchors

    files = [("relay.smarthost_ca_file", config.relay.smarthost_ca_file)]
    files += [(f"tls_policy[{i}].ca_file", r.ca_file) for i, r in enumerate(config.tls_policy)]
    files.append(("tls_reports.ca_file", config.tls_reports.ca_file))
    problems = []
    for key, path in files:
        if path is None:
            continue
        try:
            load_anchors(str(path))
        except (OSError, ValueError) as exc:
            problems.append(f"{key}: cannot use {path}: {exc}")
    return problems


def _command(argv: list[str]) -> str | None:
    """The command that ``argv`` names (its first word after the global options)."""
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _load(path: Path | None) -> Config:
    if path is None:
        return Config()
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    from postillon.cli.sendmail import postillon_command

    # `postillon sendmail|mailq|newaliases ...` take sendmail's own options.
    words = sys.argv[1:] if argv is None else argv
    routed = postillon_command(words)
    if routed is not None:
        return routed
    parser = _parser(serve_only=_command(words) == "serve")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from postillon.serve import run

        try:
            config_file = find_config(args.config)
            run(_load(config_file), config_file)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0
    from postillon.cli import tools

    if args.command == "setup":  # needs no config: it writes one
        return tools.setup_cmd.run(args)
    if args.command == "import-postfix":  # reads Postfix's config, not postillon's
        return tools.import_postfix_cmd.run(args)
    if args.command == "docs":
        return tools.docs_cmd.run(args, parser)
    try:
        if args.command == "check-config":
            path = Path(args.file) if args.file else find_config(args.config)
            if path is None:
                print(
                    f"postillon: no config file given and {DEFAULT_CONFIG} does not exist",
                    file=sys.stderr,
                )
                return 2
            config = load_config(path)
            from postillon.build import build_local_recipients
            from postillon.routing.aliases import AliasesError
            from postillon.signing.signer import build_signer

            try:
                # Alias files and every name the domains refer to (catch-all, aliases).
                build_local_recipients(config)
            except ConfigError as exc:
                lines = (f"{path}: {line}" for line in str(exc).splitlines())
                raise ConfigError("\n".join(lines)) from None
            except AliasesError as exc:
                raise ConfigError(str(exc)) from None

            signer = build_signer(config)  # loads the DKIM keys: a bad one is reported here
            for note in config.deprecations():
                print(f"{path}: warning: {note}", file=sys.stderr)
            problems = _unreadable_ca_files(config)
            if problems:
                for problem in problems:
                    print(f"{path}: {problem}", file=sys.stderr)
                return 1
            print(
                f"{path}: OK ({len(config.listen)} listener(s), "
                f"{len(config.domain)} local domain(s), data_dir {config.data_dir}"
                f"{f', {len(signer.keys)} DKIM key(s)' if signer else ''})"
            )
            return 0
        config_file = find_config(args.config)
        config = _load(config_file)
        if args.command == "reload":
            return tools.reload_cmd.run(config, config_file, api=args.api)
        if args.command == "queue":
            return tools.queue_cmd.run(args, config)
        if args.command == "user":
            return tools.user_cmd.run(args, config)
        if args.command == "db":
            return tools.db_cmd.run(args, config)
        if args.command == "dkim":
            return tools.dkim_cmd.run(args, config)
        if args.command == "dns":
            return tools.dns_cmd.run(args, config)
        if args.command == "admin":
            return tools.admin_cmd.run(args, config)
        if args.command == "tls":
            return tools.tls_cmd.run(args, config)
        if args.command == "explain":
            return tools.explain_cmd.run(args, config)
        if args.command == "dmarc":
            return tools.dmarc_cmd.run(args, config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
