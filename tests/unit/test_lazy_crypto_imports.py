"""The server imports cryptography, PyNaCl and dkimpy on first use, not at start
(bench/README.md, "Memory"): the first DKIM signature it verifies itself, the first ARC
chain, the first self-signed certificate, keys read again on a reload. That is after the
privilege drop, when the interpreter's own library may be unreadable by the server's user
(a Python under /root, as on the bench machine). So each of those must need no standard
library module that ``postillon serve`` has not imported already; this runs them in a fresh
interpreter with every later standard library import refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.stdlib_guard import REFUSE_LATER_STDLIB

SERVE_THEN_WORK = (
    r"""
import sys
from pathlib import Path

# What `postillon serve` imports before it drops privileges (cli/main.py, serve.py).
import postillon.cli.main, postillon.serve
import postillon.signing.keys, postillon.checks.arc_check, postillon.dkimcore.verify
import postillon.inbound.tls

heavy = ("cryptography", "nacl", "dkim", "idna.uts46data")
assert not [m for m in sys.modules if m.startswith(heavy)], "imported at start"
"""
    + REFUSE_LATER_STDLIB
    + r"""
work = Path(sys.argv[1])

from postillon.inbound.tls import ensure_self_signed
cert, key = ensure_self_signed(work / "tls", "mx.example.org")
assert cert.exists() and key.exists()

from postillon.signing.keys import load_key_store
keys = load_key_store(work / "dkim")
assert sorted(k.algorithm for k in keys) == ["ed25519", "rsa"]
for k in keys:
    assert k.sign(b"\0" * 32) and k.txt_value()

from postillon.dkimcore.verify import verify_message
records = {k.dns_name: k.txt_value().encode() for k in keys}
signed = Path(sys.argv[2]).read_bytes()
rows = verify_message(signed, records.get)
assert sorted(r.result for r in rows) == ["pass", "pass"], rows

from postillon.checks.arc_check import arc_seal, verify_arc
(rsa_key,) = [k for k in keys if k.algorithm == "rsa"]

class Dns:
    def txt(self, name):
        record = records.get(name.rstrip("."))
        return [(record,)] if record else []

message = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"
auth = b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org\r\n"
sealed = arc_seal(auth + message, rsa_key.selector, rsa_key.domain,
                  rsa_key.dkimpy_private_key(), "mx.example.org")
outcome = verify_arc(Dns(), sealed + auth + message)
assert outcome.clause.result == "pass", outcome

from postillon.core.address import domain_to_ascii  # idna's UTS 46 table, on first IDN
assert domain_to_ascii("Bücher.example") == "xn--bcher-kva.example"
print("ok")
"""
)


def signed_message(keys_dir: Path) -> bytes:
    """A message signed by both keys, made with the signer the server uses."""
    from postillon.config.model import DkimConfig
    from postillon.signing.keys import load_key_store
    from postillon.signing.signer import DkimSigner, SigningPolicy

    config = DkimConfig()
    signer = DkimSigner(
        load_key_store(keys_dir), SigningPolicy.create(config.headers, config.oversign)
    )
    header = b"From: A <a@example.org>\r\nTo: b@example.net\r\nSubject: lazy\r\n"
    body = b"Hello  there\r\n" * 3
    started = signer.start(header + b"\r\n", "a@example.org", client_ip="", authenticated=True)
    assert started is not None
    started.update(body)
    return started.finish(1796540400.0) + header + b"\r\n" + body


def test_first_uses_after_the_drop_import_no_standard_library_module(tmp_path: Path) -> None:
    from postillon.signing.keys import write_new_key

    write_new_key(tmp_path / "dkim", "example.org", "r", "rsa")
    write_new_key(tmp_path / "dkim", "example.org", "e", "ed25519")
    (tmp_path / "signed.eml").write_bytes(signed_message(tmp_path / "dkim"))
    done = subprocess.run(
        [sys.executable, "-c", SERVE_THEN_WORK, str(tmp_path), str(tmp_path / "signed.eml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
