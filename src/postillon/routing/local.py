"""Local recipients: is this address ours, and which mailboxes does it reach?

Design note
-----------
``LocalRecipients`` answers RCPT TO for local domains (Postfix ``local_recipient_maps``
plus ``virtual_alias_maps``) and tells the delivery side whether a final address is a
real mailbox. It is pure: built once from the frozen config and the merged alias table,
then only looked up; no I/O, no clock, safe to share between tasks and threads.

Resolving ``local@domain`` (the transaction, step by step):

1. The domain must be local (:meth:`is_local_domain`). ``Address("Postmaster", "")``
   (RFC 5321 §4.5.1 ``RCPT TO:<Postmaster>``) means postmaster of the first configured
   domain. The machine's own ``hostname``, when not configured as a domain, is an alias
   of the first configured domain (Postfix puts ``$myhostname`` in ``mydestination``):
   replies to ``MAILER-DAEMON@<hostname>`` must not be relayed or refused.
2. The local part is unquoted and lower-cased. If it then contains ``@ % ! /``
   (``"bob@remote.test"@``, the percent hack, bang paths), a backslash or a control
   character, or is ``.``/``..``, it never matches and never relays: 550 5.1.1.
   postillon does not reinterpret addresses (see ``core/address.py``).
3. For the full local part, then (sub-addressing, ``alice+tag``) the part before the
   first delimiter character: the domain's own aliases, the global aliases
   (``/etc/aliases``, valid in every local domain), the domain's mailboxes. The tag is
   dropped from the final address. ``postmaster`` is always a mailbox of every local
   domain, so it is accepted even when nobody configured it.
4. Nothing matched: the domain's ``catch_all`` (resolved like an alias target, without
   a second catch-all), else 550 5.1.1.

A local alias target is resolved with these same steps (including sub-addressing and
the catch-all of its domain): it behaves exactly like mail sent to that address.

Alias targets: a bare ``name`` is a local part of the domain being resolved;
``user@domain`` is kept as is when the domain is not local (relayed later) and resolved
again when it is; ``\\name`` is the mailbox ``name`` without further expansion. An
alias that names itself (``alice: alice, archive@remote.test``) delivers to the mailbox
(aliases(5)). A cycle through other aliases, or a chain deeper than
:data:`MAX_ALIAS_DEPTH`, rejects the recipient with 550 5.4.6 "alias loop": a broken
table must be loud, not half-delivered. A target that names no alias and no mailbox
is dropped and reported in :attr:`RecipientAccepted.dropped` (for the log); if nothing
deliverable is left, the recipient is rejected with 550 5.1.1. Targets are de-duplicated,
first occurrence first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postillon.core.address import Address, AddressError, domain_to_ascii, unquote_local_part
from postillon.core.recipient import RecipientAccepted, RecipientRejected
from postillon.core.reply import Reply
from postillon.routing.aliases import (
    AliasesError,
    AliasTarget,
    AliasWarning,
    UnsupportedTarget,
    normalize_alias_map,
    parse_target,
)

if TYPE_CHECKING:  # routing/ imports core only at run time (DESIGN "Rooms")
    from postillon.config.model import DomainConfig

__all__ = [
    "MAX_ALIAS_DEPTH",
    "LocalRecipients",
    "RecipientAccepted",
    "RecipientRejected",
    "is_safe_local_part",
]

# Nested alias expansions allowed before "alias loop" (sendmail's MAXRCRSN is 10,
# Postfix's alias expansion depth is 100; 20 covers any sane table and stops runaways).
MAX_ALIAS_DEPTH = 20

# Characters that make a local part a routing instruction (RFC 5321 §3.6.1 percent hack,
# UUCP bang paths, a quoted "@"), a path component, or unprintable. They never match.
_UNSAFE_CHARS = frozenset("@%!/\\")

POSTMASTER = "postmaster"


def is_safe_local_part(local: str) -> bool:
    """True if an unquoted local part can name a mailbox (no routing, no path tricks)."""
    if local in ("", ".", ".."):
        return False
    return not any(c in _UNSAFE_CHARS or c < " " or c == "\x7f" for c in local)


@dataclass(frozen=True, slots=True)
class _Domain:
    name: str  # as configured (used in final addresses and Maildir paths)
    key: str  # A-label, lower-case: the lookup key
    mailboxes: frozenset[str]
    aliases: Mapping[str, tuple[AliasTarget, ...]]
    catch_all: AliasTarget | None


class _Loop(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class _Expansion:
    targets: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    expanded: set[tuple[str, str]] = field(default_factory=set)

    def add(self, target: str) -> None:
        if target not in self.targets:
            self.targets.append(target)

    def drop(self, target: str) -> None:
        if target not in self.dropped:
            self.dropped.append(target)


def _domain_key(domain: str) -> str | None:
    name = domain.strip().lower().rstrip(".")
    if not name:
        return None
    try:
        return domain_to_ascii(name)
    except AddressError:
        return None


def _printable(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


def _parse_targets(
    targets: Sequence[str], where: str, warnings: list[AliasWarning]
) -> tuple[AliasTarget, ...]:
    out: list[AliasTarget] = []
    for text in targets:
        try:
            out.append(parse_target(text))
        except UnsupportedTarget as exc:
            warnings.append(AliasWarning(where, 0, f"{exc}; ignored"))
        except ValueError as exc:
            raise AliasesError(where, 0, str(exc)) from None
    return tuple(out)


class LocalRecipients:
    """Local domains, their mailboxes and aliases. See the module docstring.

    ``aliases`` is the global table (alias files merged with ``[aliases] map``, see
    ``routing.aliases.load_aliases``). ``recipient_delimiter`` is a set of characters,
    each one a delimiter (Postfix ``recipient_delimiter``); ``""`` turns sub-addressing
    off. Raises :class:`~postillon.routing.aliases.AliasesError` for a malformed target
    in a domain's ``aliases``, its ``catch_all`` or ``aliases``; unsupported targets
    (``|cmd``, ``/file``, ``:include:``) are dropped and listed in :attr:`warnings`.
    """

    def __init__(
        self,
        domains: Sequence[DomainConfig],
        aliases: Mapping[str, tuple[str, ...]],
        *,
        recipient_delimiter: str = "+",
        hostname: str,
    ) -> None:
        warnings: list[AliasWarning] = []
        self._delimiters = frozenset(recipient_delimiter)
        self._global = {
            name.lower(): _parse_targets(targets, f"global alias {name!r}", warnings)
            for name, targets in aliases.items()
        }
        self._domains: dict[str, _Domain] = {}
        for config in domains:
            key = _domain_key(config.name)
            if key is None:
                raise AliasesError(f"domain {config.name!r}", 0, "not a valid domain name")
            if key in self._domains:
                continue  # Config already refuses duplicates; keep the first
            table = normalize_alias_map(config.aliases, source=f"domain {config.name} aliases")
            warnings.extend(table.warnings)
            catch_all = None
            if config.catch_all:
                catch_all = _parse_targets(
                    [config.catch_all], f"domain {config.name} catch_all", warnings
                )[0]
            self._domains[key] = _Domain(
                name=config.name,
                key=key,
                mailboxes=frozenset(m.strip().lower() for m in config.mailboxes) | {POSTMASTER},
                aliases={
                    n: _parse_targets(t, f"domain {config.name} alias {n!r}", warnings)
                    for n, t in table.items()
                },
                catch_all=catch_all,
            )
        # The machine's own name: an alias of the first domain, or the only domain.
        self._domain_aliases: dict[str, str] = {}
        host_key = _domain_key(hostname)
        if host_key is not None and host_key not in self._domains and not host_key.startswith("["):
            if self._domains:
                self._domain_aliases[host_key] = next(iter(self._domains))
            else:
                self._domains[host_key] = _Domain(
                    hostname.strip().lower().rstrip("."),
                    host_key,
                    frozenset({POSTMASTER}),
                    {},
                    None,
                )
        self._primary = next(iter(self._domains.values()), None)
        self.warnings: tuple[AliasWarning, ...] = tuple(warnings)

    # -- queries ---------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        return self._domain(domain) is not None

    def mailbox_exists(self, address: str) -> bool:
        """True if ``address`` (``localpart@domain``) is a real local mailbox.

        Only configured domains own mailboxes (the hostname alias does not), so a
        ``True`` here is exactly a final target :meth:`resolve` can produce.
        """
        local, at, domain = address.rpartition("@")
        if not at:
            return False
        key = _domain_key(domain)
        dom = self._domains.get(key) if key is not None else None
        if dom is None:
            return False
        local = unquote_local_part(local).lower()
        return is_safe_local_part(local) and local in dom.mailboxes

    def resolve(self, address: Address) -> RecipientAccepted | RecipientRejected:
        """Resolve one RCPT address of a local domain to its final targets.

        Never raises. A domain that is not local is rejected (550 5.1.2); callers ask
        :meth:`is_local_domain` first and apply relay rules to the others.
        """
        shown = _printable(str(address))
        local = unquote_local_part(address.local_part).lower()
        if not address.domain:
            if local != POSTMASTER or self._primary is None:
                return _unknown(shown, "address without a domain")
            dom: _Domain | None = self._primary
        else:
            dom = self._domain(address.domain)
        if dom is None:
            return RecipientRejected(
                Reply.of(
                    550, "5.1.2", f"<{shown}>: Recipient address rejected: not a local domain"
                ),
                f"{address.domain!r} is not a local domain",
            )
        if not is_safe_local_part(local):
            return _unknown(shown, f"local part {local!r} can not name a mailbox")
        expansion = _Expansion()
        try:
            known = self._resolve_local(local, dom, expansion, (), catch_all=True)
        except _Loop as loop:
            return RecipientRejected(
                Reply.of(550, "5.4.6", f"<{shown}>: Recipient address rejected: alias loop"),
                loop.detail,
            )
        if not known:
            return _unknown(shown, f"no alias, mailbox or catch-all for {local}@{dom.name}")
        if not expansion.targets:
            dropped = ", ".join(expansion.dropped) or "nothing"
            return _unknown(shown, f"aliases expand to nothing deliverable (unknown: {dropped})")
        return RecipientAccepted(tuple(expansion.targets), tuple(expansion.dropped))

    def unresolved_references(
        self, domains: Sequence[DomainConfig], global_map: Mapping[str, Sequence[str]]
    ) -> list[str]:
        """Names the configuration refers to that resolve to nothing, one message per
        problem, each naming its key: a domain's ``catch_all`` and its ``aliases``
        targets, and the targets of ``[aliases] map`` (``domains`` and ``global_map``
        are the config these tables were built from).

        At run time such a name silently loses mail (every unknown recipient of a
        domain whose catch-all names nothing gets 550 5.1.1; an alias target that names
        nothing is dropped), so ``check-config``, the start and a reload refuse it.
        Alias *files* are not checked: system files name accounts that may not exist.
        """
        problems: list[str] = []
        for i, config in enumerate(domains):
            dom = self._domain(config.name)
            if dom is None or dom.name != config.name:
                continue  # an invalid or duplicate domain: refused elsewhere
            key = f"domain[{i}]"
            if dom.catch_all is not None:
                problem = self._unresolved(dom.catch_all, dom, (), catch_all=False)
                if problem:
                    problems.append(f"{key}.catch_all: {problem}")
            for name, targets in dom.aliases.items():
                for target in targets:
                    problem = self._unresolved(target, dom, ((name, dom.key),), catch_all=True)
                    if problem:
                        problems.append(f"{key}.aliases.{name}: {problem}")
        domains_in_effect = list(self._domains.values())
        for name in global_map:
            name = name.lower()
            if any(name in dom.aliases for dom in domains_in_effect):
                continue  # every domain has its own alias of that name
            for target in self._global.get(name, ()):
                found = [
                    self._unresolved(target, dom, ((name, dom.key),), catch_all=True)
                    for dom in domains_in_effect
                    if name not in dom.aliases
                ]
                if found and all(found):
                    # A bare name is looked up in each domain: it must work in one.
                    problem = (
                        found[0]
                        if target.domain
                        else f'"{target}" is not a mailbox or alias in any local domain'
                    )
                    problems.append(f"aliases.map.{name}: {problem}")
        return problems

    def _unresolved(
        self,
        target: AliasTarget,
        dom: _Domain,
        path: tuple[tuple[str, str], ...],
        *,
        catch_all: bool,
    ) -> str | None:
        """Why ``target`` (as met in ``dom``) delivers nowhere, or None if it does."""
        expansion = _Expansion()
        try:
            known = self._resolve_target(target, dom, expansion, path, catch_all=catch_all)
        except _Loop as loop:
            return f'"{target}": {loop.detail}'
        target_dom = self._domain(target.domain) if target.domain else dom
        where = target_dom.name if target_dom is not None else target.domain
        if not known:
            return f'"{target}" is not a mailbox or alias of {where}'
        if not expansion.targets:
            return f'"{target}" expands to nothing deliverable in {where}'
        return None

    # -- internals -------------------------------------------------------------------

    def _domain(self, domain: str) -> _Domain | None:
        key = _domain_key(domain)
        if key is None:
            return None
        key = self._domain_aliases.get(key, key)
        return self._domains.get(key)

    def _candidates(self, local: str) -> list[str]:
        names = [local]
        if self._delimiters:
            for i, c in enumerate(local):
                if c in self._delimiters:
                    if i > 0:
                        names.append(local[:i])
                    break
        return names

    def _resolve_local(
        self,
        local: str,
        dom: _Domain,
        exp: _Expansion,
        path: tuple[tuple[str, str], ...],
        *,
        catch_all: bool,
    ) -> bool:
        """Resolve ``local@dom`` into ``exp``; False if nothing matched it."""
        for name in self._candidates(local):
            targets = dom.aliases.get(name)
            if targets is None:
                targets = self._global.get(name)
            if targets is not None:
                self._expand((name, dom.key), targets, dom, exp, path)
                return True
            if name in dom.mailboxes:
                exp.add(f"{name}@{dom.name}")
                return True
        if catch_all and dom.catch_all is not None:
            return self._resolve_target(dom.catch_all, dom, exp, path, catch_all=False)
        return False

    def _expand(
        self,
        key: tuple[str, str],
        targets: tuple[AliasTarget, ...],
        dom: _Domain,
        exp: _Expansion,
        path: tuple[tuple[str, str], ...],
    ) -> None:
        if key in path:
            chain = " -> ".join(f"{n}@{d}" for n, d in (*path, key))
            raise _Loop(f"alias loop: {chain}")
        if len(path) >= MAX_ALIAS_DEPTH:
            raise _Loop(f"alias expansion deeper than {MAX_ALIAS_DEPTH} at {key[0]}@{key[1]}")
        if key in exp.expanded:
            return  # reached again through another branch: its targets are in already
        exp.expanded.add(key)
        inner = (*path, key)
        for target in targets:
            if not self._resolve_target(target, dom, exp, inner, catch_all=True):
                exp.drop(self._display(target, dom))

    def _resolve_target(
        self,
        target: AliasTarget,
        dom: _Domain,
        exp: _Expansion,
        path: tuple[tuple[str, str], ...],
        *,
        catch_all: bool,
    ) -> bool:
        if target.domain:
            target_dom = self._domain(target.domain)
            if target_dom is None:
                exp.add(f"{target.local}@{target.domain}")  # remote: relayed later
                return True
        else:
            target_dom = dom
        local = unquote_local_part(target.local).lower()
        if not is_safe_local_part(local):
            return False
        self_reference = bool(path) and path[-1] == (local, target_dom.key)
        if target.verbatim or self_reference:
            if local in target_dom.mailboxes:
                exp.add(f"{local}@{target_dom.name}")
                return True
            if self_reference and not target.verbatim:
                raise _Loop(f"alias {local}@{target_dom.name} names itself and is no mailbox")
            return False
        return self._resolve_local(local, target_dom, exp, path, catch_all=catch_all)

    @staticmethod
    def _display(target: AliasTarget, dom: _Domain) -> str:
        return str(target) if target.domain else f"{target}@{dom.name}"


def _unknown(shown: str, detail: str) -> RecipientRejected:
    return RecipientRejected(
        Reply.of(
            550,
            "5.1.1",
            f"<{shown}>: Recipient address rejected: User unknown in local recipient table",
        ),
        detail,
    )
