"""The ``textgen`` command line: serve, worker, migrate and account management."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from textgen.catalog import from_micro
from textgen.errors import TextgenError
from textgen.settings import Settings, load_settings


def log_config(level: str) -> dict[str, Any]:
    """One format for textgen's and uvicorn's lines, to stderr. Handed to uvicorn too, which applies it in
    each ``--workers`` process (they start afresh and do not inherit this process's logging)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "alembic": {"level": "WARNING"},
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
    }


def _logging(settings: Settings) -> None:
    logging.config.dictConfig(log_config(settings.log_level))


async def _with_store(settings: Settings, action: Any) -> Any:
    from textgen.storage import Storage

    storage = Storage.open(settings)
    try:
        return await action(storage)
    finally:
        await storage.aclose()


def _schema(settings: Settings) -> None:
    """Before a command other than ``serve``/``migrate`` uses the database: a SQLite file (one machine) is
    migrated if it needs it; PostgreSQL is migrated by ``textgen migrate`` or ``serve``, so this stops with one
    line saying so."""
    from textgen.storage.migrate import ensure_schema

    ensure_schema(settings, migrate=settings.is_sqlite)


def _admin(settings: Settings, work: Any) -> Any:
    """Run ``work(admin)`` against the configured database: the same service the admin API calls."""
    from textgen.admin import AccountAdmin

    async def action(storage: Any) -> Any:
        admin = AccountAdmin(
            storage,
            default_rate_limit=settings.default_rate_limit,
            webhook_secret_grace=dt.timedelta(seconds=settings.webhook_secret_grace_seconds),
        )
        return await work(admin)

    return asyncio.run(_with_store(settings, action))


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        if key == "keys":
            for k in value:
                state = f"revoked {k['revoked_at']}" if k["revoked_at"] else f"last used {k['last_used_at']}"
                print(f"key: {k['key_id']} {k['prefix']}... created {k['created_at']}, {state}")
        else:
            print(f"{key}: {value}")


def _bootstrap(settings: Settings, host: str, port: int) -> None:
    """First start with no accounts: create one and print its credentials once."""
    from textgen.accounts import create_account

    async def action(storage: Any) -> Any:
        if await storage.accounts.count_accounts() > 0:
            return None
        return await create_account(
            storage.accounts, "default", settings.default_credits, settings.default_rate_limit
        )

    created = asyncio.run(_with_store(settings, action))
    if created is None:
        return
    api_id, api_key = created.account.api_id, created.api_key
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(
        f"\nCreated the first account (shown once; keep the key safe):\n"
        f"  X-API-ID:  {api_id}\n  X-API-KEY: {api_key}\n\nTry it:\n"
        f"  curl -s http://{shown}:{port}/sse/text_generator/ -H 'Content-Type: application/json' "
        f"-H 'X-API-ID: {api_id}' -H 'X-API-KEY: {api_key}' "
        '-d \'{"model_name": "smollm2-135m-instruct", "sync": true, '
        '"messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}]}\'\n',
        flush=True,
    )


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from textgen.storage.migrate import upgrade

    upgrade(settings)
    print("database is at the latest schema")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from textgen.storage.migrate import ensure_schema, upgrade

    host = args.host or settings.host
    port = args.port or settings.port
    if args.no_migrate:
        ensure_schema(settings, migrate=False)
    else:
        upgrade(settings)
    _bootstrap(settings, host, port)
    created = _share_metrics(args.workers)
    uvicorn.run(
        "textgen.http.asgi:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=args.workers,
        log_config=log_config(settings.log_level),
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
    )
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    return 0


def _share_metrics(workers: int) -> str | None:
    """With several worker processes on one port, let each scrape report all of them (multiprocess mode).

    Returns the directory made for it, to remove at exit (None when there is none, or it was given).
    """
    from textgen import metrics

    given = metrics.multiprocess_dir()
    if given is None and workers <= 1:
        return None
    path = given or tempfile.mkdtemp(prefix="textgen-metrics-")
    metrics.prepare_multiprocess_dir(path)
    os.environ[metrics.MULTIPROC_ENV] = path  # inherited by the worker processes uvicorn starts
    return None if given else path


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from textgen.http.metrics import MetricsServer
    from textgen.services import Services, default_providers

    _schema(settings)

    async def main() -> None:
        worker_settings = (
            settings.model_copy(update={"worker_concurrency": args.concurrency})
            if args.concurrency
            else settings
        )
        svc = Services.build(worker_settings, default_providers(worker_settings))
        await svc.open_providers()
        svc.start_webhooks()
        svc.start_notifications()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        exposed = MetricsServer(svc, args.metrics_host or settings.host, args.metrics_port)
        if args.metrics_port is not None:
            await exposed.start()
        run = asyncio.create_task(svc.worker.run(burst=args.burst))
        logging.getLogger("textgen.worker").info(
            "worker %s ready (%d tasks in flight at most)", svc.worker.worker_id, svc.worker.concurrency
        )
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
        logging.getLogger("textgen.worker").info("worker stopping")
        await svc.aclose()
        await exposed.stop()
        waiter.cancel()
        await asyncio.gather(run, waiter, return_exceptions=True)

    asyncio.run(main())
    return 0


def cmd_accounts(settings: Settings, args: argparse.Namespace) -> int:
    from textgen.errors import NotFound
    from textgen.presentation import account_view, key_view

    _schema(settings)
    command = args.accounts_command
    if command == "create":
        credits = settings.default_credits if args.credits is None else args.credits
        created = _admin(settings, lambda a: a.create(args.name, credits, args.rate_limit))
        if args.json:
            print(json.dumps({**account_view(created.account), "api_key": created.api_key}))
        else:
            print(
                f"api_id:  {created.account.api_id}\napi_key: {created.api_key}\n(the key is shown only once)"
            )
        return 0
    if command == "list":
        rows, _ = _admin(settings, lambda a: a.list_accounts(10_000, None))
        for account in rows:
            state = "disabled" if account.disabled else "active"
            print(f"{account.api_id}  {from_micro(account.balance):g} credits  {state}  {account.name}")
        return 0
    if command == "credit":
        account = _admin(settings, lambda a: a.credit(args.api_id, args.amount, args.reason))
        print(f"{account.api_id}: remaining_credits {from_micro(account.balance):g}")
        return 0
    if command == "show":
        try:
            account, keys = _admin(settings, lambda a: a.show(args.api_id))
        except NotFound as exc:
            print(exc.message, file=sys.stderr)
            return 1
        _print(account_view(account, keys), args.json)
        return 0
    if command == "set-rate-limit":
        _admin(settings, lambda a: a.update(args.api_id, rate_limit=args.rpm))
        print(f"{args.api_id}: {args.rpm} requests per minute")
        return 0
    if command in ("disable", "enable"):
        _admin(settings, lambda a: a.update(args.api_id, disabled=command == "disable"))
        print(f"{args.api_id}: {command}d")
        return 0
    if command == "create-key":
        created = _admin(settings, lambda a: a.create_key(args.api_id))
        _print({**key_view(created.key), "api_key": created.api_key}, args.json)
        return 0
    if command == "keys":
        keys = _admin(settings, lambda a: a.keys(args.api_id))
        _print({"keys": [key_view(k) for k in keys]}, args.json)
        return 0
    if command == "revoke-key":
        key = _admin(settings, lambda a: a.revoke_key(args.api_id, args.key_id))
        print(f"{args.api_id}: key {key.id} ({key.prefix}...) revoked")
        return 0
    if command == "rotate-webhook-secret":
        account = _admin(settings, lambda a: a.rotate_webhook_secret(args.api_id))
        if args.json:
            print(json.dumps(account_view(account)))
        else:
            print(
                f"webhook_secret: {account.webhook_secret}\n(the previous secret keeps signing until "
                f"{account.webhook_secret_previous_until.isoformat()})"
            )
        return 0
    raise AssertionError(command)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="textgen", description="Self-hosted text generation API")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API server (with an in-process worker)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument("--workers", type=_positive, default=1, help="uvicorn worker processes")
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not migrate on start; stop if the schema is not current"
    )
    worker = sub.add_parser("worker", help="run a task worker without the HTTP API")
    worker.add_argument("--concurrency", type=_positive, help="tasks in flight in this process")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--metrics-port", type=_port, help="serve GET /metrics on this port")
    worker.add_argument("--metrics-host", help="address of --metrics-port (default TEXTGEN_HOST)")
    sub.add_parser("migrate", help="apply database migrations")
    accounts = sub.add_parser("accounts", help="manage accounts")
    acc = accounts.add_subparsers(dest="accounts_command", required=True)
    create = acc.add_parser("create")
    create.add_argument("name")
    create.add_argument("--credits", type=float)
    create.add_argument("--rate-limit", type=int, help="requests per minute")
    create.add_argument("--json", action="store_true")
    acc.add_parser("list", help="every account with its balance and state")
    credit = acc.add_parser("credit", help="add credits (negative: remove), with a reason")
    credit.add_argument("api_id")
    credit.add_argument("amount", type=float)
    credit.add_argument("--reason", default="textgen accounts credit")
    for name, what in (("disable", "refuse every request; fail pending tasks"), ("enable", "undo disable")):
        acc.add_parser(name, help=what).add_argument("api_id")
    create_key = acc.add_parser("create-key", help="a new API key (shown once)")
    create_key.add_argument("api_id")
    create_key.add_argument("--json", action="store_true")
    keys = acc.add_parser("keys", help="the account's keys (prefix, created, last used, revoked)")
    keys.add_argument("api_id")
    keys.add_argument("--json", action="store_true")
    revoke = acc.add_parser("revoke-key")
    revoke.add_argument("api_id")
    revoke.add_argument("key_id")
    show = acc.add_parser("show")
    show.add_argument("api_id")
    show.add_argument("--json", action="store_true")
    rl = acc.add_parser("set-rate-limit")
    rl.add_argument("api_id")
    rl.add_argument("rpm", type=int)
    rotate = acc.add_parser("rotate-webhook-secret")
    rotate.add_argument("api_id")
    rotate.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        _logging(settings)
        command = {"serve": cmd_serve, "worker": cmd_worker, "migrate": cmd_migrate, "accounts": cmd_accounts}
        return command[args.command](settings, args)
    except TextgenError as exc:
        print(f"textgen: {exc.message}", file=sys.stderr)
        return 2
