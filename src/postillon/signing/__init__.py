"""DKIM keys and signing of outgoing mail (RFC 6376, RFC 8463).

Design note
-----------
``keys.py`` is the key store: private keys found in ``<data_dir>/dkim/<domain>/<selector>.key``
(written by ``postillon dkim keygen``) plus any listed in ``[[dkim.key]]``; the algorithm (RSA or
Ed25519) is read from the key file itself. Anything that signs (DKIM here, ARC sealing in
``checks/``) asks the store for a domain's keys.

``body_hash.py`` canonicalises and hashes a body as it streams past (relaxed, RFC 6376 §3.4.4),
so intake never holds a big body in memory for signing. ``signer.py`` decides whether a message
is signed (local or authenticated senders only), picks the keys by the author domain, and builds
one ``DKIM-Signature:`` per key from the header section and the body hashes. Header
canonicalisation and selection reuse ``dkimpy``; the private-key operation uses ``cryptography``
(OpenSSL), which is about 25 times faster than dkimpy's pure-Python RSA.
"""
