"""Delivery status notifications (RFC 3464), re-injected through intake.

A notification is an ordinary message from the null sender (``<>``), so it can
never cause another notification: the runner never bounces a message whose
sender is null (RFC 5321 §6.1, RFC 3461 §6.2).
"""
