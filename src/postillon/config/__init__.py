"""The configuration: one frozen object, read once, handed out in parts.

Design note (two minutes)
-------------------------
``model.py`` is the pydantic v2 model: every setting with its safe default and, where it
limits something a client controls, the RFC rule or the reason beside it. ``loader.py``
reads TOML (``tomllib``) into it; an error names the file and the key. ``changes.py``
classifies a reload: which settings a running server may take over and which need a
restart (a whitelist by section, so a new setting is "restart" until someone says
otherwise).

May import (DESIGN.md "Rooms"): ``core`` only. Every room may import this package's model
types, never a loaded configuration.

Rules kept everywhere:

* Frozen: a ``Config`` never changes after it is built; a reload builds a new one.
* No global configuration: ``app.py`` builds the one ``Config`` and hands each component
  the part it needs as an argument (DESIGN principle 7).
* Every client-controlled resource has a limit with a default, and the limit's comment
  says where its number comes from (DESIGN principle 8).
"""
