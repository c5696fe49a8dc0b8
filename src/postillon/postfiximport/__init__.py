"""``postillon import-postfix``: read a Postfix configuration, write a postillon one.

Design note
-----------
    /etc/postfix/main.cf ──postconf.py──▶ parameters ($name expanded)
    /etc/postfix/master.cf ─postconf.py─▶ services (smtpd listeners, -o overrides)
    hash:/texthash: tables ──tables.py──▶ dicts (``postmap -s`` for indexed files,
                                                 the text itself for texthash)
                           ──translate.py──▶ a Translation (sections, notes, and every
                                             setting not translated with the reason from
                                             reasons.py)
                           ──render.py──▶ postillon.toml text, those as comments

Nothing here changes the Postfix files or asks a running Postfix: the result is printed,
and ``postillon check-config`` says whether the server would take it. The translation is
conservative: a setting that has no exact meaning in postillon is a comment, never a guess.

May import: ``core`` only (it writes text; the config model checks it afterwards).
"""
