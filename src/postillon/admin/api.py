"""The JSON API (described in ``openapi.py``, served at ``/api/openapi.json``).

Handlers only translate HTTP to ``queue_ops`` calls and back: parse and
check parameters (a bad one is a 400 naming it), call the shared operation,
serialise with the shared ``*_json`` functions.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from postillon import __version__
from postillon.admin import suspensions
from postillon.admin.context import CONTEXT, AdminContext, json_error
from postillon.admin.openapi import spec
from postillon.admin.queue_ops import (
    ACTIONS,
    MessageFilter,
    QueueOpError,
    event_json,
    iso,
    message_json,
)
from postillon.admin.tls_view import DEFAULT_DAYS, MAX_DAYS, tls_domains
from postillon.checks.story import as_json, by_session
from postillon.core.queueid import is_queue_id
from postillon.queue.store import DeliveryState, StoreError

MAX_PAGE = 500
MAX_HOURS = 24 * 14
# A domain name as the TLS view takes it (LDH labels, or A-labels; RFC 1035 §2.3.1).
_DOMAIN = re.compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9_]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)


class BadParameter(Exception):
    pass


def _ctx(request: web.Request) -> AdminContext:
    return request.app[CONTEXT]


def _number(
    request: web.Request, name: str, default: float | None, low: float, high: float
) -> float | None:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadParameter(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise BadParameter(f"{name} must be between {low:g} and {high:g}")
    return value


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be between {low} and {high}")
    return value


def _text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > 320:  # longer than any address (RFC 5321 4.5.3.1)
        raise BadParameter(f"{name} is too long")
    return value


def _queue_id(request: web.Request) -> str:
    queue_id = request.match_info["queue_id"]
    if not is_queue_id(queue_id):
        raise BadParameter(f"{queue_id!r} is not a queue id (17 characters, 0-9 and A-Z)")
    return queue_id


def filter_from_query(request: web.Request) -> MessageFilter:
    state_text = _text(request, "state")
    state = None
    if state_text is not None:
        try:
            state = DeliveryState(state_text)
        except ValueError:
            choices = ", ".join(s.value for s in DeliveryState)
            raise BadParameter(f"state must be one of {choices}") from None
    return MessageFilter(
        state=state,
        sender=_text(request, "sender"),
        recipient=_text(request, "recipient"),
        domain=_text(request, "domain"),
        min_age=_number(request, "min_age", None, 0, 1e9),
        max_age=_number(request, "max_age", None, 0, 1e9),
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


async def status(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    now = time.time()
    listeners = [
        {
            "name": lst.config.label,
            "kind": lst.config.kind,
            "address": lst.config.address,
            "sessions": len(lst.active),
        }
        for lst in ctx.listeners
    ]
    limiter = ctx.limiter
    return web.json_response(
        {
            "version": __version__,
            "hostname": ctx.hostname,
            "started_at": iso(ctx.started_at),
            "uptime_seconds": round(now - ctx.started_at, 3),
            "listeners": listeners,
            "connections": {
                "inbound": limiter.active if limiter else 0,
                "inbound_limit": limiter.total if limiter else 0,
                "deliveries_in_flight": ctx.in_flight(),
            },
            "queue": await ctx.ops.store.count_by_state(),
            "certificate": ctx.certificate_status(),
        }
    )


async def summary(request: web.Request) -> web.Response:
    return web.json_response(await _ctx(request).ops.summary())


async def list_messages(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    where = filter_from_query(request)
    offset = _int(request, "offset", 0, 0, 10_000_000)
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    total, page = await ctx.ops.find(where, offset, limit)
    now = ctx.ops.clock.now()
    return web.json_response(
        {
            "total": total,
            "offset": offset,
            "limit": limit,
            "messages": [message_json(m, now) for m in page],
        }
    )


async def show_message(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    queue_id = _queue_id(request)
    info = await ctx.ops.get(queue_id)
    body = message_json(info, ctx.ops.clock.now())
    params = info.mail_params
    body["mail_params"] = {
        "size": params.size,
        "body": params.body.value,
        "smtputf8": params.smtputf8,
        "ret": params.ret.value if params.ret else None,
        "envid": params.envid,
    }
    try:
        headers = await ctx.ops.headers(queue_id)
    except QueueOpError:
        headers = []  # delivered between the two reads
    body["headers"] = [{"name": n, "value": v} for n, v in headers]
    # The TLS of each recipient's last delivery attempt, from the history.
    tls = await ctx.ops.recipient_tls(queue_id)
    for recipient in body["recipients"]:
        recipient["tls"] = tls.get(recipient["recipient"])
    body["subject"] = next((v for n, v in headers if n.lower() == "subject"), None)
    return web.json_response(body)


async def message_events(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    queue_id = _queue_id(request)
    limit = _int(request, "limit", 500, 1, 5000)
    events = await ctx.ops.events(queue_id, limit)
    in_queue = await ctx.ops.store.get_message(queue_id) is not None
    if not events and not in_queue:
        return json_error(404, f"no message {queue_id} in the queue and no history of it")
    return web.json_response(
        {"queue_id": queue_id, "in_queue": in_queue, "events": [event_json(e) for e in events]}
    )


async def _trace_now(ctx: AdminContext) -> None:
    if ctx.flush_trace is not None:
        await ctx.flush_trace()  # show what just happened, not a second ago


async def message_explain(request: web.Request) -> web.Response:
    """The checks' decisions on a message and its session (``postillon explain ID``)."""
    ctx = _ctx(request)
    queue_id = _queue_id(request)
    await _trace_now(ctx)
    steps = await ctx.ops.store.traces.message(queue_id)
    if not steps:
        return json_error(404, f"no decisions recorded for {queue_id}")
    return web.json_response({"queue_id": queue_id, "steps": [as_json(s) for s in steps]})


async def list_sessions(request: web.Request) -> web.Response:
    """Recent SMTP sessions by client and time; rejected ones alone with rejected=true."""
    ctx = _ctx(request)
    client = request.query.get("client", "").strip()
    if len(client) > 64 or any(c not in "0123456789abcdefABCDEF.:" for c in client):
        raise BadParameter("client must be an IP address")
    hours = _number(request, "hours", 24.0, 0.1, MAX_HOURS)
    assert hours is not None
    rejected = request.query.get("rejected", "") in ("1", "true", "yes")
    limit = _int(request, "limit", 50, 1, 500)
    await _trace_now(ctx)
    now = time.time()
    steps = await ctx.ops.store.traces.sessions(
        client, now - hours * 3600, now + 1, rejected, limit
    )
    sessions = []
    for group in reversed(by_session(steps)):  # newest first
        last = group[-1]
        refusal = next((s for s in group if s.action == "reject"), None)
        sessions.append(
            {
                "session_id": last.session_id,
                "client_ip": group[0].client_ip,
                "started_at": iso(group[0].at),
                "rejected": refusal is not None,
                "outcome": (refusal or last).reply or (refusal or last).action,
                "queue_ids": sorted({s.queue_id for s in group if s.queue_id}),
                "steps": [as_json(s) for s in group],
            }
        )
    return web.json_response({"sessions": sessions})


async def raw_message(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    queue_id = _queue_id(request)
    chunks: AsyncIterator[bytes] = ctx.ops.raw(queue_id)
    sentinel = object()

    broken = object()

    async def next_chunk() -> Any:
        try:
            return await anext(chunks, sentinel)
        except KeyError:
            return None
        except StoreError:  # deleted while being read: never a silently short file
            return broken

    first = await next_chunk()
    if first is None or first is broken:
        return json_error(404, f"no message {queue_id} in the queue")
    response = web.StreamResponse(
        headers={
            "Content-Type": "message/rfc822",
            "Content-Disposition": f'attachment; filename="{queue_id}.eml"',
        }
    )
    await response.prepare(request)
    chunk = first
    while chunk is not sentinel:
        if chunk is broken or chunk is None:
            # Headers are sent: cutting the connection is the only way to say so.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(chunk)
        chunk = await next_chunk()
    await response.write_eof()
    return response


async def act(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    queue_id = _queue_id(request)
    action = request.match_info["action"]
    if action not in ACTIONS:
        return json_error(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    return web.json_response(await ctx.ops.apply(action, queue_id))


async def flush(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    count = await ctx.ops.flush()
    if ctx.ops.wake_runner is not None:
        ctx.ops.wake_runner()
    return web.json_response({"action": "flush", "recipients": count})


async def list_suspensions(request: web.Request) -> web.Response:
    ops = _ctx(request).ops
    return web.json_response(await suspensions.list_json(ops.store, ops.clock.now()))


async def suspend(request: web.Request) -> web.Response:
    """Body ``{"destination": ..., "seconds": 3600, "reason": ...}``."""
    ops = _ctx(request).ops
    try:
        body = await request.json()
    except ValueError:
        raise BadParameter("the body must be JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("destination"), str):
        raise BadParameter('destination: a string is required ("example.org", "mx:.suffix")')
    seconds = body.get("seconds", suspensions.DEFAULT_SECONDS)
    reason = body.get("reason", "")
    if not isinstance(seconds, int | float) or not isinstance(reason, str):
        raise BadParameter("seconds must be a number and reason a string")
    try:
        result = await suspensions.suspend(
            ops.store, body["destination"], ops.clock.now(), float(seconds), reason
        )
    except ValueError as exc:
        raise BadParameter(str(exc)) from None
    return web.json_response(result)


async def resume(request: web.Request) -> web.Response:
    ops = _ctx(request).ops
    try:
        result = await suspensions.resume(
            ops.store, request.match_info["destination"], ops.clock.now()
        )
    except ValueError as exc:
        raise BadParameter(str(exc)) from None
    if not result["resumed"]:
        return json_error(404, f"{result['destination']} is not suspended")
    if ops.wake_runner is not None:
        ops.wake_runner()
    return web.json_response(result)


async def activity(request: web.Request) -> web.Response:
    hours = _number(request, "hours", 6.0, 0.25, MAX_HOURS)
    bucket = _number(request, "bucket_minutes", 10.0, 1, 1440)
    assert hours is not None and bucket is not None
    if hours * 60 / bucket > 2000:
        raise BadParameter("too many buckets: raise bucket_minutes or lower hours")
    return web.json_response(await _ctx(request).ops.activity(hours, bucket))


async def _tls_view(request: web.Request, domain: str | None) -> tuple[list[str], list[Any]]:
    ctx = _ctx(request)
    days = _int(request, "days", DEFAULT_DAYS, 1, MAX_DAYS)
    if ctx.flush_tls is not None:
        await ctx.flush_tls()  # show the sessions of the last seconds too
    return await tls_domains(ctx.ops.store, ctx.ops.clock.now(), days, domain)


async def tls_list(request: web.Request) -> web.Response:
    days, domains = await _tls_view(request, None)
    return web.json_response(
        {"counting": _ctx(request).tls_counting, "days": days, "domains": domains}
    )


async def tls_domain(request: web.Request) -> web.Response:
    name = request.match_info["domain"]
    if not _DOMAIN.match(name):
        raise BadParameter(f"{name[:80]!r} is not a domain name")
    days, domains = await _tls_view(request, name)
    if not domains:
        return json_error(404, f"nothing known about outbound TLS to {name.lower()}")
    return web.json_response({"counting": _ctx(request).tls_counting, "days": days, **domains[0]})


@web.middleware
async def _api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadParameter as exc:
        return json_error(400, str(exc))
    except QueueOpError as exc:
        return json_error(exc.status, exc.message)


def add_routes(app: web.Application) -> None:
    app.middlewares.append(_api_errors)
    r = app.router
    r.add_get("/api/openapi.json", openapi)
    r.add_get("/api/status", status)
    r.add_get("/api/queue/summary", summary)
    r.add_get("/api/queue/messages", list_messages)
    r.add_get("/api/queue/messages/{queue_id}", show_message)
    r.add_get("/api/queue/messages/{queue_id}/events", message_events)
    r.add_get("/api/queue/messages/{queue_id}/raw", raw_message)
    r.add_get("/api/queue/messages/{queue_id}/explain", message_explain)
    r.add_get("/api/sessions", list_sessions)
    r.add_post("/api/queue/messages/{queue_id}/{action}", act)
    r.add_post("/api/queue/flush", flush)
    r.add_get("/api/queue/suspensions", list_suspensions)
    r.add_post("/api/queue/suspensions", suspend)
    r.add_delete("/api/queue/suspensions/{destination}", resume)
    r.add_get("/api/activity", activity)
    r.add_get("/api/tls", tls_list)
    r.add_get("/api/tls/{domain}", tls_domain)
