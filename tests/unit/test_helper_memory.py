"""A helper process costs memory for as long as the server runs: idle, it holds the
interpreter and a few standard library modules, and imports cryptography and PyNaCl (most
of its memory) on the first request that needs them. That import happens after the
privilege drop, when the interpreter's own library may be unreadable (a Python under
/root): every standard library module it needs must have been imported before."""

from __future__ import annotations

import marshal
import subprocess
import sys
from pathlib import Path

from test_dkimcore import RECORDS, sign
from test_helpers import MESSAGE, signed_twice

from postillon.helpers.pool import HelperPool
from support.stdlib_guard import REFUSE_LATER_STDLIB

# Shared objects that only the handlers load (cryptography's Rust module, libsodium).
HANDLER_LIBRARIES = ("_rust.abi3.so", "_sodium")

# Runs in a fresh interpreter: the helper's own start, then every import from the
# standard library refused, as after a drop to a user who cannot read it; then requests.
UNREADABLE_STDLIB = (
    """
import marshal, sys
from postillon.helpers import process
process.import_prerequisites()
"""
    + REFUSE_LATER_STDLIB
    + """
table = process.LazyHandlers()
answers = [table.get(kind)(payload) for kind, payload in marshal.loads(sys.stdin.buffer.read())]
sys.stdout.buffer.write(marshal.dumps(answers))
"""
)


def rsa_key_der() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_the_handlers_need_no_standard_library_import_after_the_drop() -> None:
    signed = sign(
        sign(MESSAGE, b"rsa-sha256", (b"relaxed", b"relaxed")),
        b"ed25519-sha256",
        (b"relaxed", b"simple"),
    )
    bad = signed.replace(b"body", b"BODY")
    requests = [
        ("verify", (signed, dict(RECORDS))),
        ("verify", (bad, dict(RECORDS))),
        ("keys", {"k1": rsa_key_der()}),
        ("sign", ("k1", b"\0" * 32)),
    ]
    done = subprocess.run(
        [sys.executable, "-c", UNREADABLE_STDLIB],
        input=marshal.dumps(requests),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr.decode()
    good_rows, bad_rows, _, signature = marshal.loads(done.stdout)
    assert [row[0] for row in good_rows] == ["pass", "pass"]
    assert [row[0] for row in bad_rows] == ["fail", "fail"]
    assert isinstance(signature, bytes) and len(signature) == 256


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_an_idle_helper_loads_no_cryptography_until_it_has_work() -> None:
    pool = HelperPool(1)
    pool.share("keys", {})  # what a server without RSA keys shares at start
    await pool.start()
    try:
        (pid,) = pool.pids
        # A round trip: the helper has read the shared keys frame before answering.
        assert await pool.call("no such kind", b"") is None
        assert not [lib for lib in HANDLER_LIBRARIES if lib in mapped(pid)]
        assert await pool.call("verify", (MESSAGE, dict(RECORDS))) == []  # unsigned
        rows = await pool.call("verify", (signed_twice(), dict(RECORDS)))
        assert [row[0] for row in rows] == ["pass", "pass"]
        assert all(lib in mapped(pid) for lib in HANDLER_LIBRARIES)
    finally:
        await pool.close()


async def test_keys_shared_at_start_load_the_handlers() -> None:
    pool = HelperPool(1)
    pool.share("keys", {"k1": rsa_key_der()})
    await pool.start()
    try:
        (pid,) = pool.pids
        answer = await pool.call("sign", ("k1", b"\0" * 32))
        assert isinstance(answer, bytes) and len(answer) == 256
        assert "_rust.abi3.so" in mapped(pid)  # cryptography; libsodium only for Ed25519
    finally:
        await pool.close()
