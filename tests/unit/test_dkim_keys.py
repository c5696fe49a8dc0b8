"""The DKIM key store: keygen writes what discovery loads; bad files get clear errors."""

from __future__ import annotations

import base64
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postillon.config.model import DkimConfig, DkimKeyConfig
from postillon.signing.keys import (
    KeyStoreError,
    default_selector,
    key_store_from_config,
    load_key_store,
    write_new_key,
)


def test_keygen_then_discovery(tmp_path: Path) -> None:
    keys_dir = tmp_path / "dkim"
    rsa_key = write_new_key(keys_dir, "Example.ORG", "rsa202611", "rsa")
    ed_key = write_new_key(keys_dir, "example.org", "ed202611", "ed25519")
    assert rsa_key.path == keys_dir / "example.org" / "rsa202611.key"
    assert stat.S_IMODE(rsa_key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((keys_dir / "example.org").stat().st_mode) == 0o700

    store = load_key_store(keys_dir)
    assert len(store) == 2
    by_selector = {k.selector: k for k in store.keys_for("EXAMPLE.org.")}
    assert isinstance(by_selector["rsa202611"].private_key, rsa.RSAPrivateKey)
    assert by_selector["rsa202611"].private_key.key_size == 2048
    assert isinstance(by_selector["ed202611"].private_key, ed25519.Ed25519PrivateKey)
    assert ed_key.txt_value().startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_key.public_key_base64())) == 32
    # A subdomain signs with its parent's keys (relaxed DMARC alignment).
    assert store.signing_keys("news.example.org") == store.keys_for("example.org")
    assert store.signing_keys("example.net") == ()


def test_zone_record_splits_long_values(tmp_path: Path) -> None:
    key = write_new_key(tmp_path, "example.org", "s1", "rsa")
    record = key.zone_record()
    assert record.startswith('s1._domainkey.example.org. 3600 IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = record.split("( ", 1)[1].rstrip(" )").split('" "')
    assert all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == key.txt_value()


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    write_new_key(tmp_path, "example.org", "s1", "ed25519")
    with pytest.raises(KeyStoreError, match="already has a key"):
        write_new_key(tmp_path, "example.org", "s1", "rsa")


def test_configured_key_made_by_opendkim_genkey(tmp_path: Path) -> None:
    subprocess.run(
        ["opendkim-genkey", "-b", "2048", "-d", "example.net", "-s", "mail", "-D", str(tmp_path)],
        check=True,
        timeout=60,
    )
    config = DkimConfig(
        key=(
            DkimKeyConfig(
                domain="example.net", selector="mail", key_file=tmp_path / "mail.private"
            ),
        )
    )
    store = key_store_from_config(config, tmp_path / "data")
    (key,) = store.keys_for("example.net")
    assert key.algorithm == "rsa"
    # The TXT record opendkim-genkey wrote has the same public key as ours.
    published = (tmp_path / "mail.txt").read_text()
    joined = "".join(part.split('"')[1] for part in published.split("\n") if '"' in part)
    assert key.public_key_base64() in joined.replace('" "', "").replace(" ", "")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not an unencrypted PEM private key"),
        (b"", "not an unencrypted PEM private key"),
    ],
)
def test_bad_key_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "example.org").mkdir()
    bad = tmp_path / "example.org" / "s1.key"
    bad.write_bytes(content)
    with pytest.raises(KeyStoreError, match=message) as info:
        load_key_store(tmp_path)
    assert str(bad) in str(info.value)


def test_bad_selector_and_duplicate(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="selector"):
        write_new_key(tmp_path, "example.org", "bad_selector!", "rsa")
    key = write_new_key(tmp_path / "a", "example.org", "s1", "ed25519")
    config = DkimConfig(
        key=(DkimKeyConfig(domain="example.org", selector="s1", key_file=key.path),)
    )
    assert len(key_store_from_config(config, tmp_path / "data")) == 1
    with pytest.raises(KeyStoreError, match="two keys for selector"):
        key_store_from_config(DkimConfig(keys_dir=tmp_path / "a", key=config.key), tmp_path)


def test_dkimpy_key_forms_sign(tmp_path: Path) -> None:
    import dkim

    message = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    for algorithm, selector in (("rsa", "r"), ("ed25519", "e")):
        key = write_new_key(tmp_path, "example.org", selector, algorithm)  # type: ignore[arg-type]
        header = dkim.sign(
            message,
            selector.encode(),
            b"example.org",
            key.dkimpy_private_key(),
            signature_algorithm=key.signature_algorithm,
        )
        assert header.startswith(b"DKIM-Signature:")


def test_default_selector() -> None:
    assert default_selector("rsa", 2026, 11) == "rsa202611"
    assert default_selector("ed25519", 2026, 1) == "ed202601"


def test_keygen_as_root_gives_the_key_to_the_server_user(tmp_path: Path) -> None:
    import os
    import pwd

    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    nobody = pwd.getpwnam("nobody")
    key = write_new_key(
        tmp_path / "dkim", "example.org", "s1", "ed25519", owner=(nobody.pw_uid, nobody.pw_gid)
    )
    for path in (key.path, key.path.parent, key.path.parent.parent):
        assert path.stat().st_uid == nobody.pw_uid
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
