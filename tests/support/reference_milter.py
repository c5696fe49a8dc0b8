"""A milter on Sendmail's libmilter (Debian's pymilter), for testing the milter client
against the reference implementation of the protocol.

Run by ``tests/support/milters.py`` under Debian's ``/usr/bin/python3`` (pymilter is a
Debian package, not in the venv): ``reference_milter.py SOCKET RECORD_FILE``.

What it does is chosen by the message, so one running milter serves many tests:

* ``X-Milter-Test: a, b, ...`` in the header picks end-of-message actions: ``reject``
  (custom 550 5.7.1 reply), ``multiline`` (a two-line reply), ``tempfail``, ``discard``,
  ``accept``, ``addheader``, ``insheader``, ``chgheader`` (Subject), ``delheader``
  (X-Remove-Me), ``replbody``, ``chgfrom``, ``addrcpt``, ``addrcpt_par``, ``delrcpt``
  (bob@example.org), ``quarantine``, ``progress`` (sends SMFIR_PROGRESS for 2 s, then goes on),
  ``stall`` (never answers end of message).
* ``MAIL FROM:<tempfail@...>`` is tempfailed; ``RCPT TO:<reject-me@...>`` gets
  ``550 5.1.1 No such user here``; HELO ``reject.example`` is refused.

Every message's view (macros by stage, header fields, body) is appended to RECORD_FILE
as one JSON line at end of message, so tests check what the client sent.
"""

import json
import sys
import time

import Milter

MACROS = {
    "connect": ["j", "{daemon_name}", "{client_addr}", "{client_port}", "{client_name}", "_"],
    "helo": ["{tls_version}", "{cipher}"],
    "envfrom": ["i", "{auth_authen}", "{mail_addr}"],
    "envrcpt": ["{rcpt_addr}"],
    "eom": ["i"],
}


class Reference(Milter.Base):
    record_file = ""

    def __init__(self):
        self.seen = {"macros": {}, "headers": [], "body": b"", "rcpts": []}
        self.connect_info = {}

    def _macros(self, stage):
        got = {}
        for name in MACROS[stage]:
            value = self.getsymval(name)
            if value is not None:
                got[name] = value
        self.seen["macros"][stage] = got

    def connect(self, hostname, family, hostaddr):
        self.connect_info = {"hostname": hostname, "hostaddr": list(hostaddr) if hostaddr else []}
        self._macros("connect")
        self.connect_macros = self.seen["macros"]["connect"]
        return Milter.CONTINUE

    def hello(self, name):
        self.helo = name
        self.helo_macros = {}
        for n in MACROS["helo"]:
            v = self.getsymval(n)
            if v is not None:
                self.helo_macros[n] = v
        if name == "reject.example":
            self.setreply("550", "5.7.1", "HELO refused by the reference milter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        self.seen = {
            "macros": {"connect": self.connect_macros, "helo": getattr(self, "helo_macros", {})},
            "headers": [],
            "body": b"",
            "rcpts": [],
            "sender": sender,
            "mail_params": list(params),
            "connect": self.connect_info,
            "helo": getattr(self, "helo", ""),
        }
        self._macros("envfrom")
        if sender.lower().startswith("<tempfail@"):
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        self._macros("envrcpt")
        if rcpt.lower().startswith("<reject-me@"):
            self.setreply("550", "5.1.1", "No such user here")
            return Milter.REJECT
        self.seen["rcpts"].append(rcpt)
        return Milter.CONTINUE

    def header(self, name, value):
        self.seen["headers"].append([name, value])
        if name.lower() == "x-milter-test":
            self.actions = [a.strip() for a in value.split(",")]
        return Milter.CONTINUE

    def body(self, chunk):
        self.seen["body"] += chunk
        return Milter.CONTINUE

    def eom(self):
        self._macros("eom")
        record = dict(self.seen, body=self.seen["body"].decode("utf-8", "replace"))
        with open(self.record_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        actions = getattr(self, "actions", [])
        self.actions = []
        result = Milter.CONTINUE
        for action in actions:
            if action == "reject":
                self.setreply("550", "5.7.1", "Rejected by the reference milter (100%% sure)")
                return Milter.REJECT
            if action == "multiline":
                self.setreply("550", "5.7.1", "first line", "second line")
                return Milter.REJECT
            if action == "tempfail":
                return Milter.TEMPFAIL
            if action == "discard":
                return Milter.DISCARD
            if action == "accept":
                result = Milter.ACCEPT
            elif action == "addheader":
                self.addheader("X-Reference", "added at the bottom")
            elif action == "insheader":
                self.addheader("X-Inserted", "on top", 0)
            elif action == "chgheader":
                self.chgheader("Subject", 1, "changed by the milter")
            elif action == "delheader":
                self.chgheader("X-Remove-Me", 1, None)
            elif action == "replbody":
                self.replacebody(b"The body was replaced.\r\n")
            elif action == "chgfrom":
                self.chgfrom("<new-sender@example.net>")
            elif action == "addrcpt":
                self.addrcpt("<added@example.org>")
            elif action == "addrcpt_par":
                self.addrcpt("<added2@example.org>", "NOTIFY=NEVER")
            elif action == "delrcpt":
                self.delrcpt("<bob@example.org>")
            elif action == "quarantine":
                self.quarantine("held by the reference milter")
            elif action == "progress":
                for _ in range(4):
                    self.progress()
                    time.sleep(0.5)
            elif action == "stall":
                time.sleep(3600)
        return result

    def abort(self):
        return Milter.CONTINUE


def main():
    socket, record = sys.argv[1], sys.argv[2]
    Reference.record_file = record
    Milter.factory = Reference
    Milter.set_flags(
        Milter.ADDHDRS
        | Milter.CHGHDRS
        | Milter.CHGBODY
        | Milter.ADDRCPT
        | Milter.ADDRCPT_PAR
        | Milter.DELRCPT
        | Milter.QUARANTINE
        | Milter.CHGFROM
    )
    print("reference milter starting", flush=True)
    Milter.runmilter("reference", socket, 60)


if __name__ == "__main__":
    main()
