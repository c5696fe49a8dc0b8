"""Postfix settings → postillon.toml text, with what was not translated as comments."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from postillon.postfiximport.postconf import MainCf, Service
from postillon.postfiximport.reasons import INTERNAL, REASONS, STANDARD_SERVICES
from postillon.postfiximport.tables import Table, TableError, parse_postmap_text, read_table

__all__ = ["Translation", "translate"]

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "smtps": 465}


@dataclass
class Translation:
    top: dict[str, object] = field(default_factory=dict)
    listen: list[dict[str, str]] = field(default_factory=list)
    sections: dict[str, dict[str, object]] = field(default_factory=dict)
    domains: dict[str, dict[str, object]] = field(default_factory=dict)
    transports: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # comments near the top
    untranslated: list[tuple[str, str]] = field(default_factory=list)  # (setting, why)

    def section(self, name: str) -> dict[str, object]:
        return self.sections.setdefault(name, {})

    def domain(self, name: str) -> dict[str, object]:
        return self.domains.setdefault(name.lower().rstrip("."), {})


def _seconds(value: str) -> float | None:
    match = re.fullmatch(r"(\d+)([smhdw]?)", value.strip())
    if not match:
        return None
    return float(int(match.group(1)) * _TIME_UNITS[match.group(2) or "s"])


def _split(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value) if item]


class _Translator:
    def __init__(self, main: MainCf, services: list[Service], directory: Path) -> None:
        self.main = main
        self.services = services
        self.directory = directory
        self.out = Translation()
        self.used: set[str] = set()
        self.local_delivery: list[str] = []  # the mydestination domains (local(8))

    def value(self, name: str) -> str:
        self.used.add(name)
        return self.main.get(name)

    def table(self, spec: str, setting: str, aliases: bool = False) -> Table | None:
        try:
            table = read_table(spec, self.directory, aliases)
        except TableError as exc:
            self.out.untranslated.append((f"{setting} = {spec}", str(exc)))
            return None
        self.out.notes.extend(table.notes)
        return table

    def tables(self, setting: str, aliases: bool = False) -> list[Table]:
        found = []
        for spec in _split(self.value(setting)):
            table = self.table(spec, setting, aliases)
            if table is not None:
                found.append(table)
        return found

    # ------------------------------------------------------------------ main.cf
    def identity(self) -> None:
        if not self.main.is_set("myhostname"):
            self.out.notes.append(
                "myhostname is not set in main.cf: hostname is this machine's name"
            )
        self.out.top["hostname"] = self.value("myhostname")
        self.out.top["data_dir"] = "/var/lib/postillon"

    def domains(self) -> None:
        hostname = self.value("myhostname")
        local = [
            d.lower()
            for d in _split(self.value("mydestination"))
            if not d.lower().startswith("localhost") and ":" not in d and "/" not in d
        ]
        self.local_delivery = local
        for name in local:
            self.out.domain(name).setdefault("mailboxes", [])
        if local:
            self.out.notes.append(
                f"mydestination ({', '.join(local)}): Postfix delivered to the system's "
                "users (local(8)); list the users that receive mail as mailboxes"
                + (f" (the hostname {hostname} is one of them)" if hostname in local else "")
            )
        for item in _split(self.value("virtual_mailbox_domains")):
            if ":" in item or item.startswith("/"):
                table = self.table(item, "virtual_mailbox_domains")
                names: Iterable[str] = table.entries if table else ()
            else:
                names = [item]
            for name in names:
                self.out.domain(name).setdefault("mailboxes", [])
        for table in self.tables("virtual_mailbox_maps"):
            for key, target in sorted(table.entries.items()):
                user, at, domain = key.rpartition("@")
                if not at or domain not in self.out.domains:
                    self.out.untranslated.append(
                        (f"virtual_mailbox_maps {key}", "not an address in a mailbox domain")
                    )
                elif not user:
                    # A catch-all mailbox: postillon's catch_all is the local part whose
                    # mailbox gets the unknown ones; name it after the Postfix mailbox path.
                    name = target.rstrip("/").rsplit("/", 1)[-1].lower()
                    if re.fullmatch(r"[a-z0-9._-]+", name):
                        self.out.domains[domain]["catch_all"] = name
                        boxes = self.out.domains[domain]["mailboxes"]
                        assert isinstance(boxes, list)
                        boxes.append(name)
                        self.out.notes.append(
                            f"{key} {target}: catch_all = {name!r} in [[domain]] {domain}"
                        )
                    else:
                        self.out.untranslated.append(
                            (f"virtual_mailbox_maps {key} {target}", "set catch_all by hand")
                        )
                else:
                    boxes = self.out.domains[domain]["mailboxes"]
                    assert isinstance(boxes, list)
                    boxes.append(user)
        for item in _split(self.value("virtual_alias_domains")):
            if ":" not in item and "/" not in item:
                self.out.domain(item).setdefault("mailboxes", [])

    def aliases(self) -> None:
        global_map: dict[str, list[str]] = {}
        for table in self.tables("virtual_alias_maps"):
            for key, value in sorted(table.entries.items()):
                targets = _split(value)
                user, at, domain = key.rpartition("@")
                if not at:
                    global_map[key] = targets
                elif not user:
                    self.out.untranslated.append(
                        (
                            f"virtual_alias_maps {key} {value}",
                            "a whole-domain forward: postillon has catch_all (one local "
                            "part) or a [[transport]] for the domain instead",
                        )
                    )
                else:
                    if domain not in self.local_delivery:
                        # Postfix completes a bare target with @$myorigin (a system user).
                        targets = [t if "@" in t else f"{t}@{self.myorigin()}" for t in targets]
                    if domain not in self.out.domains:
                        self.out.domain(domain).setdefault("mailboxes", [])
                        self.out.notes.append(
                            f"{domain}: a domain only of virtual_alias_maps entries, made local"
                        )
                    entry = self.out.domains[domain].setdefault("aliases", {})
                    assert isinstance(entry, dict)
                    entry[user] = targets
        files: list[str] = []
        for spec in _split(self.value("alias_maps")):
            kind, _, name = spec.partition(":")
            if kind in ("hash", "btree", "lmdb", "cdb", "dbm") and Path(name).is_file():
                files.append(name)  # postillon reads aliases(5) text files itself
                continue
            alias_table = self.table(spec, "alias_maps", aliases=True)
            if alias_table is not None:
                for key, value in alias_table.entries.items():
                    global_map.setdefault(key, _split(value))
        self._system_users(global_map, files)
        aliases = self.out.section("aliases")
        if files:
            aliases["files"] = files
        if global_map:
            aliases["map"] = global_map
        aliases["recipient_delimiter"] = self.value("recipient_delimiter")

    def myorigin(self) -> str:
        origin = self.value("myorigin")
        if origin.startswith("/"):  # Debian: myorigin = /etc/mailname
            try:
                return Path(origin).read_text().strip() or self.value("myhostname")
            except OSError:
                return self.value("myhostname")
        return origin

    def _system_users(self, global_map: dict[str, list[str]], files: list[str]) -> None:
        """Names aliases deliver to that are no alias themselves were the system's users
        (local(8)): they become mailboxes of the domains Postfix delivered locally."""
        if not self.local_delivery:
            return
        names: dict[str, list[str]] = dict(global_map)
        for name in files:
            try:
                text = Path(name).read_text(errors="replace")
            except OSError:
                continue
            for key, value in parse_postmap_text(text, aliases=True).items():
                names.setdefault(key, _split(value))
        every: list[str] = [t for targets in names.values() for t in targets]
        for values in self.out.domains.values():
            own = values.get("aliases", {})
            assert isinstance(own, dict)
            every += [t for targets in own.values() for t in targets]
        for domain in self.local_delivery:
            own = self.out.domains[domain].get("aliases", {})
            assert isinstance(own, dict)
            aliased = set(names) | set(own)
            wanted = set()
            for target in every:
                local, _, where = target.lstrip("\\").lower().partition("@")
                if where and where != domain:
                    continue
                if local not in aliased and re.fullmatch(r"[a-z0-9._-]+", local):
                    wanted.add(local)
            boxes = self.out.domains[domain]["mailboxes"]
            assert isinstance(boxes, list)
            added = sorted(wanted - set(boxes))
            boxes.extend(added)
            if added:
                self.out.notes.append(
                    f"{domain}: mailboxes {', '.join(added)} are the system users that "
                    "aliases deliver to"
                )

    def relay(self) -> None:
        relay = self.out.section("relay")
        if self.main.is_set("mynetworks"):
            networks = []
            for item in _split(self.value("mynetworks")):
                if re.match(r"^[a-z]+:/", item) or item.startswith("/"):
                    self.out.untranslated.append(
                        (f"mynetworks {item}", "a table or file: list the networks instead")
                    )
                    continue
                networks.append(item.replace("[", "").replace("]", ""))
            relay["trusted_networks"] = networks
        else:
            relay["trusted_networks"] = ["127.0.0.0/8", "::1/128"]
            self.out.notes.append(
                "mynetworks is not set: Postfix trusted this host only (mynetworks_style = "
                "host); so does [relay] trusted_networks"
            )
        relayhost = self.value("relayhost")
        if not relayhost:
            return
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", relayhost)
        if not match:
            self.out.untranslated.append((f"relayhost = {relayhost}", "not host or [host]:port"))
            return
        host = match.group(1) or match.group(3)
        port = match.group(2) or match.group(4)
        if match.group(3):
            self.out.notes.append(
                f"relayhost = {relayhost} (no brackets): Postfix looked up its MX records; "
                "postillon connects to that host name directly"
            )
        credentials = ""
        if self.value("smtp_sasl_auth_enable").lower() == "yes":
            for table in self.tables("smtp_sasl_password_maps"):
                found = table.entries.get(relayhost.lower()) or table.entries.get(host.lower())
                if found:
                    user, _, password = found.partition(":")
                    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@"
                    break
            else:
                self.out.untranslated.append(
                    (f"smtp_sasl_password_maps for {relayhost}", "no entry for the relayhost")
                )
        scheme = "smtps" if self.value("smtp_tls_wrappermode").lower() == "yes" else "smtp"
        relay["smarthost"] = f"{scheme}://{credentials}{host}" + (f":{port}" if port else "")
        if credentials:
            self.out.notes.append(
                "[relay] smarthost holds the relay password: keep this file 0640, root:postillon"
            )

    def tls(self) -> None:
        if self.main.is_set("smtpd_tls_cert_file"):
            cert = self.value("smtpd_tls_cert_file")
            key = self.value("smtpd_tls_key_file") or cert  # Postfix: the key may be inside
            tls = self.out.section("tls")
            tls["certificate"] = cert
            tls["private_key"] = key
        level = self.value("smtp_tls_security_level").lower()
        tls_map = {"none": "none", "may": "opportunistic", "encrypt": "encrypt", "verify": "verify"}
        if level in tls_map:
            self.out.section("outbound")["tls"] = tls_map[level]
        elif level:
            self.out.untranslated.append(
                (
                    f"smtp_tls_security_level = {level}",
                    "per destination in postillon: [[tls_policy]] (dane needs [dns] trust_ad)",
                )
            )
        self.used.add("smtp_tls_security_level")

    def limits_and_queue(self) -> None:
        size = self.value("message_size_limit")
        if size.isdigit():
            self.out.section("limits")["message_size"] = int(size)
        if self.main.is_set("smtpd_client_connection_count_limit"):
            count = self.value("smtpd_client_connection_count_limit")
            if count.isdigit() and int(count) > 0:
                self.out.section("limits")["connections_per_ip"] = int(count)
        for setting, key in (
            ("maximal_queue_lifetime", "lifetime"),
            ("minimal_backoff_time", "first_retry"),
            ("maximal_backoff_time", "max_retry"),
            ("delay_warning_time", "delay_warning"),
        ):
            if self.main.is_set(setting):
                seconds = _seconds(self.value(setting))
                if seconds is not None and (seconds > 0 or key == "delay_warning"):
                    self.out.section("queue")[key] = seconds

    def transports(self) -> None:
        local = set(self.out.domains)
        for table in self.tables("transport_maps"):
            for key, value in table.entries.items():
                route = self._route(value)
                if (key != "*" and "." not in key) or "@" in key or key.startswith("."):
                    self.out.untranslated.append(
                        (
                            f"transport_maps {key} {value}",
                            "postillon routes whole domains (or *)",
                        )
                    )
                elif route == "local":
                    if key not in local:
                        self.out.untranslated.append(
                            (
                                f"transport_maps {key} {value}",
                                "local delivery to a domain that is not local",
                            )
                        )
                elif route is None:
                    self.out.untranslated.append(
                        (f"transport_maps {key} {value}", "no postillon route for this transport")
                    )
                else:
                    self.out.transports.append({"domain": key, "route": route})
        self.out.transports.sort(key=lambda rule: (rule["domain"] == "*", rule["domain"]))

    @staticmethod
    def _route(value: str) -> str | None:
        kind, _, nexthop = value.strip().partition(":")
        kind = kind.lower()
        if kind in ("virtual", "local"):
            return "local"
        if kind == "discard":
            return "discard"
        if kind in ("error", "retry"):
            text = nexthop.strip() or "mail for this domain is not accepted"
            if kind == "retry" or not re.match(r"[45]\.\d{1,3}\.\d{1,3}( |$)", text):
                text = ("4.3.0 " if kind == "retry" else "5.0.0 ") + text
            return f"error:{text}"
        if kind in ("smtp", "relay"):
            return f"smtp:{nexthop}" if nexthop else None
        if kind == "lmtp":
            if nexthop.startswith("inet:"):
                nexthop = nexthop[5:]
            return f"lmtp:{nexthop}" if nexthop else None
        return None

    # ------------------------------------------------------------------ master.cf
    def listeners(self) -> None:
        interfaces = self.value("inet_interfaces").lower()
        hosts = ["0.0.0.0"]
        if interfaces == "loopback-only":
            hosts = ["127.0.0.1"]
        elif interfaces and interfaces != "all":
            hosts = [h.strip("[]") for h in _split(interfaces)]
        if interfaces == "all":
            self.out.notes.append(
                "inet_interfaces = all: the listeners bind 0.0.0.0 (IPv4); add [::]:PORT "
                "listeners for IPv6"
            )
        covered = {
            "smtpd_tls_security_level",
            "smtpd_sasl_auth_enable",
            "smtpd_tls_wrappermode",
            "smtpd_tls_auth_only",
            "smtpd_client_restrictions",
            "smtpd_recipient_restrictions",
            "smtpd_relay_restrictions",
            "smtpd_sender_restrictions",
            "smtpd_helo_restrictions",
            "smtpd_reject_unlisted_recipient",
            "smtpd_sasl_type",
            "smtpd_sasl_path",
            "smtpd_sender_login_maps",
            "milter_macro_daemon_name",
            "syslog_name",
        }
        for service in self.services:
            if service.type == "inet" and service.command in ("smtpd", "postscreen"):
                self._listener(service, hosts, covered)
            elif service.name not in STANDARD_SERVICES:
                self.out.untranslated.append(
                    (
                        f"master.cf line {service.line}: {service.name} {service.type} "
                        f"{service.command}",
                        "a service of its own (a filter, a pipe to a program): no equivalent",
                    )
                )
        if not self.out.listen and not self.services:
            self.out.listen.append({"kind": "smtp", "address": f"{hosts[0]}:25"})
            self.out.notes.append(
                "no master.cf: one smtp listener on port 25, as Postfix's default"
            )

    def _listener(self, service: Service, hosts: list[str], covered: set[str]) -> None:
        name = service.name
        host_part, colon, port_part = name.rpartition(":")
        port = int(port_part) if port_part.isdigit() else _PORTS.get(port_part)
        if port is None:
            self.out.untranslated.append(
                (f"master.cf line {service.line}: {name}", "unknown service port")
            )
            return
        options = service.options
        wrapper = options.get("smtpd_tls_wrappermode", "").lower() == "yes"
        sasl = options.get("smtpd_sasl_auth_enable", "").lower() == "yes"
        if wrapper or port_part in ("smtps", "submissions"):
            kind = "submissions"
        elif sasl or port_part == "submission" or port == 587:
            kind = "submission"
        else:
            kind = "smtp"
        for host in [host_part.strip("[]")] if colon and host_part else hosts:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.out.listen.append({"kind": kind, "address": address})
        if service.command == "postscreen":
            self.out.notes.append(
                f"master.cf line {service.line}: postscreen in front of smtpd; postillon "
                "accepts directly ([limits] bounds connections per client)"
            )
        for option, value in options.items():
            if option not in covered:
                self.out.untranslated.append(
                    (f"master.cf {name} -o {option}={value}", "no equivalent on a listener")
                )

    def leftovers(self) -> None:
        for name, value in self.main.raw.items():
            if name in self.used or name in INTERNAL:
                continue
            reason = next(
                (why for pattern, why in REASONS if re.match(pattern, name)),
                "no postillon equivalent",
            )
            self.out.untranslated.append((f"{name} = {value}", reason))

    def run(self) -> Translation:
        self.identity()
        self.domains()
        self.aliases()
        self.relay()
        self.tls()
        self.limits_and_queue()
        self.transports()
        self.listeners()
        for consumed in (
            "mydestination",
            "virtual_mailbox_domains",
            "virtual_alias_domains",
            "inet_interfaces",
            "relayhost",
        ):
            self.used.add(consumed)
        self.leftovers()
        return self.out


def translate(main: MainCf, services: list[Service], directory: Path) -> Translation:
    return _Translator(main, services, directory).run()
