"""Intake: the only way into the queue (Postfix's cleanup).

SMTP sessions, the sendmail command, bounces and forwards all write through an
``IntakeTransaction``: begin → add recipients → stream body → commit or abort.
The body streams into a spooled temporary file (memory up to a small
threshold, disk beyond it), never the whole message in memory for large mail;
``commit`` hands body and recipients to the store in one durable step, and
only its successful return may lead to a ``250``.
"""
