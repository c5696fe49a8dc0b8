"""Putting postillon on a server: ``postillon setup`` and the files it installs.

Design note
-----------
``files/`` holds the systemd unit and the logrotate snippet as templates (package data,
so they ship in the wheel); ``templates.py`` fills them in. ``config_text.py`` writes the
commented production config; ``setup.py`` runs the steps of ``postillon setup`` (config,
service user, data directory, DKIM keys, admin account, sendmail, unit), everything under
``--root`` when given.
Every step first looks at what is there, so a second run changes nothing and says so,
and an existing config is never overwritten without ``--force``.

May import: ``config`` (to check the config it writes), ``signing`` (DKIM keys),
``inbound.accounts`` (the first mail account), ``dnsrecords`` (the records to publish).
"""
