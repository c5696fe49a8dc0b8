"""Helper processes: CPU-bound cryptography beside the server, outside its GIL.

postillon serves every session from one event loop, and the GIL makes that loop (with
the queue's writer thread) the limit of one server process. Two per-message costs are
pure CPU that no cleverness removes: verifying inbound DKIM signatures and the RSA
private-key operation of outgoing signatures. They run in these processes, fed over
pipes (``pool.py`` on the server's side, ``process.py`` the program, ``wire.py`` the
framing); the server waits for the answer without blocking, and does the work itself
whenever no helper can answer, so a helper can never cost a message.
"""
