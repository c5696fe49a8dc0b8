"""``postillon serve``: run the App under signals and systemd's notify protocol.

SIGTERM/SIGINT stop, SIGHUP reloads (RELOADING=1 then READY=1), SIGUSR1 reopens the
log (logrotate), SIGUSR2 renews the ACME certificate now (``postillon tls renew``);
READY=1 once the listeners are bound and the queue is open, and watchdog pings.
Split from ``app.py``, which builds and wires the components.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path
from typing import Any

from postillon.app import App
from postillon.config.loader import ConfigError
from postillon.config.model import Config
from postillon.inbound.privileges import PrivilegeError
from postillon.observability.maillog import configure_logging
from postillon.observability.memory_dump import start_memory_dumps
from postillon.osutil.malloc import limit_malloc_arenas
from postillon.osutil.sd_notify import SystemdNotifier
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.store import StoreError, StoreHealth
from postillon.reload import ReloadResult
from postillon.routing.aliases import AliasesError

__all__ = ["run", "serve"]

log = logging.getLogger("postillon")


async def _reload_and_notify(app: App, notifier: SystemdNotifier) -> ReloadResult:
    """SIGHUP under systemd: RELOADING=1, the reload, then READY=1 with the outcome."""
    notifier.reloading()
    result = ReloadResult(False, "the reload failed unexpectedly")
    try:
        result = await app.reload()
    finally:
        # Always back to READY=1: the running configuration serves either way.
        if result.applied:
            notifier.reloaded("serving; configuration reloaded")
        else:
            notifier.reloaded(f"serving; reload refused: {result.error}")
    return result


def _reopen_log(app: App) -> None:
    """SIGUSR1: reopen the log file only (logrotate's postrotate), nothing else."""
    config = app.config
    try:
        configure_logging(config.log, app.maillog, config.hostname)
    except ConfigError as exc:  # e.g. the directory is gone: keep the old handler
        log.error("log not reopened: %s", exc)
    else:
        log.info("log reopened (SIGUSR1)")


async def serve(config: Config, config_path: Path | None = None) -> None:
    # Connected while still root (see osutil/sd_notify.py); a no-op outside systemd.
    notifier = SystemdNotifier.from_environment()
    app = App(config, config_path=config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_hangup() -> None:
        task = loop.create_task(_reload_and_notify(app, notifier))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before start too: SIGHUP's default action would kill a starting server
    # (the reload itself is declined until everything is built). SIGUSR1 likewise.
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_log, app)
    watchdog = asyncio.ensure_future(notifier.watchdog())
    memory_dumps = start_memory_dumps()  # POSTILLON_MEMORY_DUMP=DIR only (bench/README.md)
    # `postillon tls renew`: renew the ACME certificate now (ignored without ACME).
    loop.add_signal_handler(signal.SIGUSR2, lambda: app.acme.renew_now() if app.acme else None)
    try:
        await app.start()
    except (StoreError, SchemaError, PrivilegeError, ConfigError, AliasesError) as exc:
        # The queue database unreachable or unmigrated; data_dir or the user unusable;
        # aliases or a catch-all that name nothing.
        log.error("cannot start: %s", exc)
        notifier.status(f"cannot start: {exc}")
        watchdog.cancel()
        if memory_dumps is not None:
            memory_dumps.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(Exception):
            await app.stop()
        raise SystemExit(f"postillon: {exc}") from None
    # Listeners bound and the queue open (the runner has loaded its work): ready.
    notifier.ready("serving: " + ", ".join(listener.config.label for listener in app.listeners))
    # Everything built at start-up (modules, config, policy tables, TLS contexts) lives as
    # long as the process: move it out of the collector's sight. Every full collection
    # otherwise walks it again; measured, that was 0.1-0.25 ms of CPU per message under
    # load (bench/README.md, "Garbage collection").
    gc.collect()
    gc.freeze()
    failure: StoreHealth | None = None
    stopping = asyncio.ensure_future(stop.wait())
    waits: set[asyncio.Future[Any]] = {stopping}
    if app.store_failure is not None:
        waits.add(app.store_failure)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if app.store_failure is not None and app.store_failure.done():
            failure = app.store_failure.result()
            log.critical(
                "the queue store cannot recover (%s): stopping, for a supervisor to restart"
                " postillon",
                failure.reason,
            )
    finally:
        notifier.stopping()
        stopping.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        loop.remove_signal_handler(signal.SIGUSR1)
        loop.remove_signal_handler(signal.SIGUSR2)
        with contextlib.suppress(Exception):
            await app.stop()
        watchdog.cancel()
        if memory_dumps is not None:
            memory_dumps.cancel()
        notifier.close()
    if failure is not None:
        raise SystemExit(f"postillon: the queue store failed: {failure.reason}")


def run(config: Config, config_path: Path | None = None) -> None:
    limit_malloc_arenas()  # before any thread starts (osutil/malloc.py)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        asyncio.run(serve(config, config_path))
    else:
        uvloop.run(serve(config, config_path))
