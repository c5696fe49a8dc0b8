"""``postillon setup``: put postillon on a new server, step by step, idempotently.

    options ──▶ Layout (where each file goes, under --root when given)
            ──▶ steps: config · service user · data dir · DKIM keys · admin account ·
                       sendmail · systemd unit            (each: look, then change or not)
            ──▶ Report (what changed, what was already there, what to do by hand)

Every step looks at what is there first and changes only what is missing, so a second
run changes nothing and says so. An existing config is kept unless ``force``; the later
steps then follow the config that is there (its data_dir, user and domains), so a
re-run never makes keys or accounts the running server does not know about.

``root``: every path the setup touches is put under it (a self-contained tree: the
config it writes names paths under ``root`` too, so the server runs from it as is).
Nothing outside ``root`` changes, except the service user when ``root`` has an
``etc/passwd`` of its own (``useradd --root``).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from postillon.config.loader import load_config
from postillon.config.model import Config
from postillon.inbound.accounts import AccountStore, accounts_path
from postillon.osutil.privilege import running_as_root
from postillon.provision.config_text import SetupOptions, render_config
from postillon.provision.templates import render_unit
from postillon.signing.keys import (
    Algorithm,
    default_keys_dir,
    default_selector,
    key_store_from_config,
    write_new_key,
)

__all__ = ["Layout", "Report", "run_setup"]


@dataclass(frozen=True)
class Layout:
    """Where the files go; every path already under ``root``."""

    root: Path | None
    config: Path
    data_dir: Path
    unit: Path
    sendmail_link: Path
    programs: Path  # the directory holding postillon, sendmail, mailq, newaliases

    @classmethod
    def for_root(cls, root: Path | None, programs: Path | None = None) -> Layout:
        base = root or Path("/")
        return cls(
            root=root,
            config=base / "etc/postillon/postillon.toml",
            data_dir=base / "var/lib/postillon",
            unit=base / "etc/systemd/system/postillon.service",
            sendmail_link=base / "usr/sbin/sendmail",
            programs=programs or installed_programs(),
        )


def installed_programs() -> Path:
    """Where ``postillon``, ``sendmail``, ``mailq`` and ``newaliases`` are installed: beside
    the running ``postillon`` script, else beside the interpreter (a venv, pipx)."""
    script = Path(os.path.abspath(sys.argv[0]))
    for directory in (script.parent, Path(sys.executable).parent):
        if (directory / "postillon").is_file() and (directory / "sendmail").is_file():
            return directory
    return Path(sys.executable).parent


@dataclass
class Report:
    dry_run: bool
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)  # what the operator must do by hand
    password: tuple[str, str] | None = None  # (username, password), shown once
    config: Config | None = None

    def did(self, text: str) -> None:
        self.changed.append(("would: " if self.dry_run else "") + text)

    def kept(self, text: str) -> None:
        self.unchanged.append(text)


def run_setup(
    options: SetupOptions, layout: Layout, *, dry_run: bool = False, force: bool = False
) -> Report:
    report = Report(dry_run)
    options = replace(options, data_dir=layout.data_dir)
    config = _write_config(options, layout, report, force)
    if config is None:  # dry run of a new config: show the rest as it would go
        config = _parse(render_config(options, _today()))
    report.config = config
    _service_user(config.user, layout, report)
    _data_dir(config, report)
    _dkim_keys(config, report)
    _admin_account(options.admin_email, config, report)
    _sendmail(layout, report)
    _systemd_unit(layout, config, report)
    return report


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _parse(text: str) -> Config:
    """The config ``text`` describes, as the server would load it (its paths are absolute)."""
    with tempfile.TemporaryDirectory(prefix="postillon-setup-") as scratch:
        path = Path(scratch) / "postillon.toml"
        path.write_text(text)
        return load_config(path)


def _write_config(
    options: SetupOptions, layout: Layout, report: Report, force: bool
) -> Config | None:
    path = layout.config
    if path.exists() and not force:
        report.kept(f"config {path} exists and is kept (--force replaces it)")
        return load_config(path)
    text = render_config(options, _today())
    if report.dry_run:
        report.did(f"write config {path}")
        return None
    config = _parse(text)  # never write a config the server would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        backup = path.with_name(path.name + f".{time.strftime('%Y%m%d%H%M%S')}.bak")
        shutil.copy2(path, backup)
        report.did(f"saved the old config as {backup}")
    tmp = path.with_name(path.name + ".new")
    # 0640: it may hold secrets later (a smarthost password, a PostgreSQL dsn).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    report.did(f"wrote config {path}")
    return config


def _service_user(user: str, layout: Layout, report: Report) -> None:
    if not user:
        report.kept('no service user configured (user = "")')
        return
    passwd = (layout.root / "etc/passwd") if layout.root else None
    argv = ["useradd", "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/var/lib/postillon", "--shell", "/usr/sbin/nologin"]
    if passwd is not None and passwd.exists():  # a root with accounts of its own
        if any(line.split(":", 1)[0] == user for line in passwd.read_text().splitlines()):
            report.kept(f"service user {user} exists in {passwd}")
            return
        argv += ["--root", str(layout.root)]
    else:
        try:
            pwd.getpwnam(user)
        except KeyError:
            pass
        else:
            report.kept(f"service user {user} exists")
            return
        if layout.root is not None:  # never change this machine's accounts for a --root
            report.manual.append(f"create the service user: {' '.join([*argv, user])}")
            return
    if report.dry_run:
        report.did(f"create the service user {user}")
        return
    if not running_as_root() or shutil.which("useradd") is None:
        report.manual.append(f"create the service user: {' '.join([*argv, user])}")
        return
    subprocess.run([*argv, user], check=True, capture_output=True, timeout=60)
    report.did(f"created the service user {user}")


def _owner(user: str) -> tuple[int, int] | None:
    if not user or not running_as_root():
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _data_dir(config: Config, report: Report) -> None:
    data_dir = config.data_dir
    owner = _owner(config.user)
    if data_dir.is_dir():
        stat = data_dir.stat()
        if owner is None or (stat.st_uid, stat.st_gid) == owner:
            report.kept(f"data directory {data_dir} exists")
            return
    if report.dry_run:
        report.did(f"make the data directory {data_dir} (0750, for user {config.user})")
        return
    data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    if owner is not None:
        os.chown(data_dir, *owner)
    report.did(f"made the data directory {data_dir} (0750, for user {config.user})")


def _dkim_keys(config: Config, report: Report) -> None:
    keys_dir = default_keys_dir(config.data_dir, config.dkim.keys_dir)
    store = key_store_from_config(config.dkim, config.data_dir) if keys_dir.exists() else None
    now = time.gmtime()
    for domain in sorted(config.local_domains):
        have = {key.algorithm for key in store.keys_for(domain)} if store else set()
        wanted: tuple[Algorithm, ...] = ("ed25519", "rsa")  # RFC 8463 4: sign with both
        for algorithm in wanted:
            if algorithm in have:
                report.kept(f"DKIM {algorithm} key for {domain} exists")
                continue
            selector = default_selector(algorithm, now.tm_year, now.tm_mon)
            if report.dry_run:
                report.did(f"make a DKIM {algorithm} key for {domain} (selector {selector})")
                continue
            key = write_new_key(keys_dir, domain, selector, algorithm, _owner(config.user))
            report.did(f"made a DKIM {algorithm} key for {domain}: {key.path}")


def _admin_account(admin_email: str, config: Config, report: Report) -> None:
    path = accounts_path(config.data_dir, config.submission.accounts_file)
    if path.exists() and AccountStore(path).get(admin_email) is not None:
        report.kept(f"mail account {admin_email} exists (password unchanged)")
        return
    if report.dry_run:
        report.did(f"make the mail account {admin_email}")
        return
    password = secrets.token_urlsafe(15)
    AccountStore(path).add(admin_email, password)
    owner = _owner(config.user)
    if owner is not None:
        os.chown(path, *owner)
    report.password = (admin_email, password)
    report.did(f"made the mail account {admin_email} (accounts file {path})")


def _chain(path: Path, root: Path | None) -> list[Path]:
    """The symlinks from ``path`` on, followed as the system under ``root`` sees them."""
    chain = [path]
    for _ in range(16):
        if not path.is_symlink():
            break
        target = Path(os.readlink(path))
        if target.is_absolute():
            path = (root / target.relative_to("/")) if root else target
        else:
            path = path.parent / target
        if path in chain:
            break
        chain.append(path)
    return chain


def _sendmail(layout: Layout, report: Report) -> None:
    """``/usr/sbin/sendmail`` → postillon's, through Debian's alternatives."""
    programs = layout.programs
    if layout.root is not None:
        # The system under --root runs the same programs at the same path:
        # update-alternatives --root wants them inside the root.
        programs = layout.root / layout.programs.relative_to("/")
    ours = programs / "sendmail"
    link = layout.sendmail_link
    if ours in _chain(link, layout.root):
        report.kept(f"{link} is postillon's sendmail")
        return
    managed = link.is_symlink() and "alternatives" in os.readlink(link)
    if (link.exists() or link.is_symlink()) and not managed:
        # Another MTA's own file (Postfix, Exim): not ours to replace.
        report.manual.append(
            f"{link} belongs to another mail system: remove it (e.g. apt remove postfix) "
            f"and run setup again, or point it at {layout.programs / 'sendmail'}"
        )
        return
    tool = shutil.which("update-alternatives")
    if tool is None:
        report.manual.append(
            f"make postillon's the system's sendmail: ln -sf {layout.programs / 'sendmail'} {link}"
        )
        return
    argv = [tool]
    if layout.root is not None:
        argv += ["--root", str(layout.root)]
    argv += ["--install", "/usr/sbin/sendmail", "sendmail", str(layout.programs / "sendmail")]
    argv.append("25")
    for name, where in (("mailq", "/usr/bin/mailq"), ("newaliases", "/usr/bin/newaliases")):
        argv += ["--slave", where, name, str(layout.programs / name)]
    if report.dry_run:
        report.did(f"register {layout.programs / 'sendmail'} as /usr/sbin/sendmail")
        return
    if layout.root is not None:
        for sub in ("etc/alternatives", "var/lib/dpkg/alternatives", "var/log", "usr/sbin"):
            (layout.root / sub).mkdir(parents=True, exist_ok=True)
        (layout.root / "usr/bin").mkdir(parents=True, exist_ok=True)
        programs.mkdir(parents=True, exist_ok=True)
        for name in ("sendmail", "mailq", "newaliases"):
            if not (programs / name).is_symlink():
                (programs / name).symlink_to(layout.programs / name)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        report.manual.append(
            f"update-alternatives failed ({result.stderr.strip()}): {' '.join(argv)}"
        )
        return
    report.did(f"registered {layout.programs / 'sendmail'} as /usr/sbin/sendmail (alternatives)")


def _systemd_unit(layout: Layout, config: Config, report: Report) -> None:
    text = render_unit(
        postillon=layout.programs / "postillon",
        config=layout.config,
        data_dir=config.data_dir,
        user=config.user,
    )
    unit = layout.unit
    if unit.exists() and unit.read_text() == text:
        report.kept(f"systemd unit {unit} is up to date")
        return
    if report.dry_run:
        report.did(f"install the systemd unit {unit}")
        return
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(text)
    report.did(f"installed the systemd unit {unit}")
    if layout.root is None and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False, timeout=60)
