"""DKIM (RFC 6376, RFC 8463) on ``hashlib`` and ``cryptography``, shared by signing and
verification.

Why not dkimpy on the hot path: dkimpy is the reference (it still seals and verifies ARC
here, and the tests check this package against it), but its verifier spends about 0.36 ms
of Python per signature, canonicalises the body once per signature and must run in a
worker thread because it looks keys up itself. On a 2-core machine that was more CPU
than accepting the message. This package is sans-IO: the caller fetches the key records
(asynchronously, through postillon's resolver) and hands them in, so verification runs
inline on the event loop with no thread hop, and the body is canonicalised once per
message. ``bench/verify_bench.py`` has the figures.

* :mod:`.canonical`: header fields, header selection, canonicalisation of headers and body.
* :mod:`.tags`: tag=value lists (§3.2) and key records (§3.6.1).
* :mod:`.verify`: verifying every DKIM-Signature of a message.
* :mod:`.remote`: the same, as a helper process answers one request (message and
  prefetched keys in, result rows out); here so that ``helpers`` needs no ``checks``.
"""
