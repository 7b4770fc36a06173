"""The task queue: tasks created with their reservation, claimed under leases, and finished with settlement."""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from textgen import ids
from textgen.catalog import from_micro
from textgen.credits import settle
from textgen.errors import AccountDisabled, InsufficientCredits, NotFound
from textgen.notify import CANCEL_CHANNEL, DELIVERIES_CHANNEL, TASKS_CHANNEL
from textgen.states import Cancellation, DeliveryStatus, TaskMode, TaskStatus
from textgen.storage.accounts import ACCOUNT_BY_ID, INSERT_LEDGER
from textgen.storage.database import Database
from textgen.storage.idempotency import attach_task
from textgen.storage.outbox import insert_delivery, new_delivery_id
from textgen.storage.rows import Cursor, Outcome, TaskRow, task_row, task_values, utcnow
from textgen.storage.tables import accounts, ledger, tasks, webhook_deliveries

# Statements of the request path, built once: constructing and cache-keying them per call costs more than
# executing them on SQLite.
_b = sa.bindparam
_RESERVE = (
    accounts.update()
    .where(
        accounts.c.id == _b("account_id"),
        accounts.c.balance >= _b("amount"),
        accounts.c.disabled == sa.false(),
    )
    .values(balance=accounts.c.balance - _b("amount"))
    .returning(accounts.c.balance)
)
_ADD = (
    accounts.update()
    .where(accounts.c.id == _b("account_id"))
    .values(balance=accounts.c.balance + _b("amount"))
    .returning(accounts.c.balance)
)
_INSERT_TASK = tasks.insert()


_LEDGER_COLUMNS = ["account_id", "task_id", "kind", "amount", "balance_after", "created_at"]


def _with_ledger_row(
    changed: sa.CTE, task_id: sa.ColumnElement[Any], kind: sa.ColumnElement[Any], source: sa.FromClause
) -> sa.Insert:
    """PostgreSQL: a balance change (``changed``, the CTE of an UPDATE of one account returning its balance)
    and its ledger row as one statement, so that the account's row lock (every task of the account contends
    for it) is taken by the transaction's last statement and held only until COMMIT. No row when the update
    matched nothing."""
    values = sa.select(
        _b("account_id", type_=ledger.c.account_id.type),
        task_id,
        kind,
        _b("ledger_amount", type_=ledger.c.amount.type),
        changed.c.balance,
        _b("ledger_at", type_=ledger.c.created_at.type),  # not "created_at": the UPDATE would set that column
    ).select_from(source)
    return ledger.insert().from_select(_LEDGER_COLUMNS, values).returning(ledger.c.balance_after)


def _settle_statement() -> sa.Insert:
    """PostgreSQL: give back the unused part of a reservation and write its ledger row."""
    changed = _ADD.cte("changed")
    task_id = _b("task_id", type_=ledger.c.task_id.type)
    return _with_ledger_row(changed, task_id, _b("kind", type_=ledger.c.kind.type), changed)


def _create_statement() -> sa.Insert:
    """PostgreSQL: a task's creation as one statement: reserve its cost (when the balance covers it), insert
    the task and the reserve's ledger row; no row (and nothing written) when the reservation is refused."""
    changed = _RESERVE.cte("changed")
    columns = list(TaskRow.__dataclass_fields__)
    # The task's values are "t_"-prefixed: a parameter named like a column of accounts would be SET by the
    # UPDATE.
    values = sa.select(*(_b(f"t_{name}", type_=tasks.c[name].type) for name in columns)).select_from(changed)
    inserted = tasks.insert().from_select(columns, values).returning(tasks.c.id).cte("inserted")
    kind = sa.literal("reserve", ledger.c.kind.type)
    return _with_ledger_row(changed, inserted.c.id, kind, changed.join(inserted, sa.true()))


def _insert_ledger_row(
    conn: Connection,
    account_id: int,
    task_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    now: dt.datetime,
) -> None:
    """SQLite: the ledger row of a balance change just made in this transaction."""
    conn.execute(
        INSERT_LEDGER,
        {
            "account_id": account_id,
            "task_id": task_id,
            "kind": kind,
            "amount": amount,
            "balance_after": balance_after,
            "created_at": now,
        },
    )


_SETTLE = _settle_statement()
_CREATE = _create_statement()
_TASK_BY_ID = sa.select(tasks).where(tasks.c.id == _b("task_id"))
_TASK_OF_ACCOUNT = sa.select(tasks).where(tasks.c.id == _b("task_id"), tasks.c.account_id == _b("account_id"))
_HELD = sa.and_(
    tasks.c.id == _b("task_id"),
    tasks.c.status == TaskStatus.RUNNING,
    tasks.c.lease_owner == _b("worker_id"),
)
_HELD_AMONG = sa.and_(
    tasks.c.id.in_(sa.bindparam("ids", expanding=True)),
    tasks.c.status == TaskStatus.RUNNING,
    tasks.c.lease_owner == _b("worker_id"),
)
_RENEW_MANY = (
    tasks.update()
    .where(_HELD_AMONG)
    .values(lease_expires_at=_b("expires"))
    .returning(tasks.c.id, tasks.c.cancel_requested)
)
# PostgreSQL: the rows another transaction holds (a settlement group, a cancel) are skipped, not waited for: a
# renewal that waited while holding the rows it had locked could deadlock with a group settling the same tasks
# in another order. A skipped row is read without a lock instead, and keeps its lease until the next renewal.
_RENEW_MANY_SKIP_LOCKED = (
    tasks.update()
    .where(
        tasks.c.id.in_(
            sa.select(tasks.c.id).where(_HELD_AMONG).order_by(tasks.c.id).with_for_update(skip_locked=True)
        )
    )
    .values(lease_expires_at=_b("expires"))
    .returning(tasks.c.id, tasks.c.cancel_requested)
)
_HELD_NOW = sa.select(tasks.c.id, tasks.c.cancel_requested).where(_HELD_AMONG)
_RENEW_BATCH = 500  # ids per statement (SQLite allows 32,766 parameters)
_RELEASE = (
    tasks.update()
    .where(_HELD)
    .values(status=TaskStatus.PENDING, lease_owner=None, lease_expires_at=None, updated_at=_b("now"))
)


def _record_statement(condition: sa.ColumnElement[bool]) -> sa.Update:
    """Record an outcome on the task matching ``condition``; the settlement's charge comes as ``charged``."""
    return (
        tasks.update()
        .where(condition)
        .values(
            status=_b("status"),
            response_text=_b("response_text"),
            response_function_calls=_b("response_function_calls", type_=tasks.c.response_function_calls.type),
            failed_reason=_b("failed_reason"),
            finish_reason=_b("finish_reason"),
            input_tokens=_b("input_tokens"),
            output_tokens=_b("output_tokens"),
            credits_used=_b("charged"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=_b("now"),
        )
        # The rest of the finished row is known already: reading it back would decode its JSON again.
        .returning(tasks.c.cancel_requested)
    )


_FINISH = _record_statement(_HELD)
# A task nobody is running (pending, or running under a lease that has expired) is cancelled at once.
_CANCEL_NOW = _record_statement(
    sa.and_(
        tasks.c.id == _b("task_id"),
        sa.or_(
            tasks.c.status == TaskStatus.PENDING,
            sa.and_(tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at < _b("now")),
        ),
    )
)
_REQUEST_CANCEL = (
    tasks.update()
    .where(tasks.c.id == _b("task_id"), tasks.c.status == TaskStatus.RUNNING)
    .values(cancel_requested=True)
)
_TASK_DEPTH = (
    sa.select(tasks.c.status, sa.func.count())
    .where(tasks.c.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))
    .group_by(tasks.c.status)
)
_DELIVERY_BACKLOG = (
    sa.select(sa.func.count())
    .select_from(webhook_deliveries)
    .where(webhook_deliveries.c.status == DeliveryStatus.PENDING)
)


# How far back an account's finished tasks count as its use of the workers when claims are shared out.
FAIR_SHARE_SECONDS = 60.0


def _claimable(table: sa.FromClause) -> sa.ColumnElement[bool]:
    """Pending, or running under a lease that has expired (its process stopped)."""
    return sa.or_(
        table.c.status == TaskStatus.PENDING,
        sa.and_(table.c.status == TaskStatus.RUNNING, table.c.lease_expires_at < _b("now")),
    )


def _claim_statement(postgres: bool, models: str) -> sa.Update:
    """Claim up to ``limit`` claimable tasks in one statement, fairly between accounts.

    Each candidate's turn is its rank among its account's claimable tasks plus the account's recent use of
    the workers (its tasks running now and those that finished in the last ``FAIR_SHARE_SECONDS``), so an
    account with thousands queued, or hundreds running, never starves one with a single task: the least
    served account goes first. ``models`` restricts the claim to the models of providers with room: ``in``
    (the ``models`` parameter), ``not_in`` (tasks of models no provider serves, which fail at once) or ``any``.
    """
    candidate = tasks.alias("candidate")
    busy = (
        sa.select(tasks.c.account_id, sa.func.count().label("running"))
        .where(
            sa.or_(
                sa.and_(tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at >= _b("now")),
                sa.and_(
                    tasks.c.status.in_([TaskStatus.DONE, TaskStatus.FAILED]),
                    tasks.c.updated_at >= _b("recent"),
                ),
            )
        )
        .group_by(tasks.c.account_id)
        .subquery("busy")
    )
    rank = sa.func.row_number().over(
        partition_by=candidate.c.account_id, order_by=(candidate.c.created_at, candidate.c.id)
    )
    ranked = sa.select(
        candidate.c.id.label("id"),
        candidate.c.created_at.label("created_at"),
        (rank + sa.func.coalesce(busy.c.running, 0)).label("turn"),
    ).select_from(candidate.outerjoin(busy, busy.c.account_id == candidate.c.account_id))
    ranked = ranked.where(_claimable(candidate))
    if models == "in":
        ranked = ranked.where(candidate.c.model_name.in_(_b("models", expanding=True)))
    elif models == "not_in":
        ranked = ranked.where(candidate.c.model_name.not_in(_b("models", expanding=True)))
    turns = ranked.subquery("turns")
    if postgres:
        # Lock what is picked, skipping rows another worker is claiming: rank a few more candidates than
        # wanted so that concurrent claims each find unlocked ones.
        offered = (
            sa.select(turns.c.id, turns.c.turn, turns.c.created_at)
            .order_by(turns.c.turn, turns.c.created_at)
            .limit(_b("candidates"))
            .subquery("offered")
        )
        picked = (
            sa.select(tasks.c.id)
            .join(offered, offered.c.id == tasks.c.id)
            .where(_claimable(tasks))
            .order_by(offered.c.turn, offered.c.created_at)
            .limit(_b("limit"))
            .with_for_update(skip_locked=True, of=tasks)
        )
    else:
        picked = sa.select(turns.c.id).order_by(turns.c.turn, turns.c.created_at).limit(_b("limit"))
    return (
        tasks.update()
        .where(tasks.c.id.in_(picked.scalar_subquery()))
        .values(
            status=TaskStatus.RUNNING,
            lease_owner=_b("worker_id"),
            lease_expires_at=_b("expires"),
            attempts=tasks.c.attempts + 1,
            updated_at=_b("now"),
        )
        .returning(*tasks.c)
    )


class TaskQueue:
    """``payload`` renders a finished task as its webhook body (the webhooks package owns that format)."""

    def __init__(self, db: Database, payload: Callable[[TaskRow], str]) -> None:
        self.db = db
        self.payload = payload
        self._claims = {kind: _claim_statement(db.is_postgres, kind) for kind in ("in", "not_in", "any")}
        self._task_for_update = _TASK_OF_ACCOUNT.with_for_update() if db.is_postgres else _TASK_OF_ACCOUNT

    async def create(
        self,
        *,
        account_id: int,
        model_name: str,
        mode: TaskMode,
        request: dict[str, Any],
        webhook_url: str | None,
        reserve: int,
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
        notify: bool = False,
        provider: str = "",
        idempotency_key: str | None = None,
    ) -> TaskRow:
        """Reserve ``reserve`` micro-credits and insert the task, atomically; 402 if the balance is short.

        With ``lease_owner`` the task starts running and leased to the caller (sync and stream modes).
        ``notify`` wakes the workers of other processes once the task is committed (those with room for
        ``provider``, the NOTIFY's payload; all when empty).
        """
        now = utcnow()
        running = lease_owner is not None
        task = TaskRow(
            id=str(ids.random_uuid()),
            account_id=account_id,
            model_name=model_name,
            mode=mode,
            status=TaskStatus.RUNNING if running else TaskStatus.PENDING,
            request=request,
            webhook_url=webhook_url,
            response_text="",
            response_function_calls=[],
            failed_reason="",
            finish_reason=None,
            input_tokens=0,
            output_tokens=0,
            credits_reserved=reserve,
            credits_used=0,
            lease_owner=lease_owner,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds) if running else None,
            attempts=1 if running else 0,
            created_at=now,
            updated_at=now,
        )

        def refuse(conn: Connection) -> NoReturn:
            if conn.execute(ACCOUNT_BY_ID, {"account_id": account_id}).one().disabled:
                raise AccountDisabled("this account is disabled; ask the operator to enable it")
            raise InsufficientCredits(
                f"not enough credits: this request may cost up to {from_micro(reserve):g} credits"
            )

        def work(conn: Connection) -> None:
            if self.db.is_postgres:
                # One statement, which writes nothing when it refuses: a grouped write raises only before it
                # writes (see Database.run).
                values = {f"t_{name}": value for name, value in task_values(task).items()}
                values.update(account_id=account_id, amount=reserve, ledger_amount=-reserve, ledger_at=now)
                if conn.execute(_CREATE, values).first() is None:
                    refuse(conn)
            else:
                conn.execute(_INSERT_TASK, task_values(task))
                balance_after = conn.execute(_RESERVE, {"account_id": account_id, "amount": reserve}).scalar()
                if balance_after is None:
                    refuse(conn)  # in its own savepoint: the task inserted above is rolled back
                _insert_ledger_row(conn, account_id, task.id, "reserve", -reserve, balance_after, now)
            if idempotency_key is not None:
                attach_task(conn, account_id, idempotency_key, task.id)
            if notify:
                self.db.notify(conn, TASKS_CHANNEL, provider)

        await self.db.run(work, group=True)
        return task

    async def get(self, task_id: str, account_id: int | None = None) -> TaskRow:
        params: dict[str, Any]
        if account_id is None:
            statement, params = _TASK_BY_ID, {"task_id": task_id}
        else:
            statement, params = _TASK_OF_ACCOUNT, {"task_id": task_id, "account_id": account_id}
        row = await self.db.run(lambda conn: conn.execute(statement, params).first())
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return task_row(row)

    async def list(
        self,
        account_id: int,
        *,
        limit: int,
        status: TaskStatus | None = None,
        after: Cursor | None = None,
        before: Cursor | None = None,
    ) -> tuple[list[TaskRow], bool]:
        """Newest first. ``after`` pages towards older tasks, ``before`` towards newer ones.

        Returns the page and whether more rows exist beyond it in the paging direction.
        """
        key = sa.tuple_(tasks.c.created_at, tasks.c.id)
        query = sa.select(tasks).where(tasks.c.account_id == account_id)
        if status is not None:
            query = query.where(tasks.c.status == status)
        if before is not None:
            query = query.where(
                key > sa.tuple_(sa.literal(before.created_at, tasks.c.created_at.type), sa.literal(before.id))
            )
            query = query.order_by(tasks.c.created_at.asc(), tasks.c.id.asc())
        else:
            if after is not None:
                query = query.where(
                    key
                    < sa.tuple_(sa.literal(after.created_at, tasks.c.created_at.type), sa.literal(after.id))
                )
            query = query.order_by(tasks.c.created_at.desc(), tasks.c.id.desc())
        final = query.limit(limit + 1)
        rows = await self.db.run(lambda conn: [task_row(r) for r in conn.execute(final).all()])
        more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, more

    async def claim(self, worker_id: str, lease_seconds: float) -> TaskRow | None:
        """Atomically take the next claimable task (pending, or running under an expired lease)."""
        claimed = await self.claim_batch(worker_id, lease_seconds, limit=1)
        return claimed[0] if claimed else None

    async def claim_batch(
        self,
        worker_id: str,
        lease_seconds: float,
        *,
        limit: int,
        models: Sequence[str] | None = None,
        other_models: Sequence[str] | None = None,
    ) -> builtins.list[TaskRow]:
        """Take up to ``limit`` claimable tasks in one statement, fairly between accounts, oldest first
        within each account: of ``models`` only, or of any model but ``other_models``, or of any model."""
        if limit <= 0 or (models is not None and not models):
            return []
        now = utcnow()
        params: dict[str, Any] = {
            "now": now,
            "worker_id": worker_id,
            "expires": now + dt.timedelta(seconds=lease_seconds),
            "limit": limit,
            "candidates": limit * 4 + 16,
            "recent": now - dt.timedelta(seconds=FAIR_SHARE_SECONDS),
        }
        if models is not None:
            statement, params["models"] = self._claims["in"], list(models)
        elif other_models:
            statement, params["models"] = self._claims["not_in"], list(other_models)
        else:
            statement = self._claims["any"]
        rows = await self.db.run(lambda conn: conn.execute(statement, params).all())
        claimed = [task_row(row) for row in rows]
        claimed.sort(key=lambda task: task.created_at)
        return claimed

    async def renew_leases(
        self, task_ids: Sequence[str], worker_id: str, lease_seconds: float
    ) -> dict[str, bool]:
        """Extend the leases ``worker_id`` still holds among ``task_ids``, in one transaction: the ids held,
        each with whether someone asked to cancel it (an id missing was lost to another worker or ended)."""
        expires = utcnow() + dt.timedelta(seconds=lease_seconds)

        renew = _RENEW_MANY_SKIP_LOCKED if self.db.is_postgres else _RENEW_MANY

        def work(conn: Connection) -> dict[str, bool]:
            held: dict[str, bool] = {}
            for start in range(0, len(task_ids), _RENEW_BATCH):
                ids = task_ids[start : start + _RENEW_BATCH]
                params = {"ids": ids, "worker_id": worker_id, "expires": expires}
                held.update((row.id, bool(row.cancel_requested)) for row in conn.execute(renew, params))
                if self.db.is_postgres and (skipped := [task_id for task_id in ids if task_id not in held]):
                    params["ids"] = skipped
                    held.update(
                        (row.id, bool(row.cancel_requested)) for row in conn.execute(_HELD_NOW, params)
                    )
            return held

        return await self.db.run(work)

    async def release(self, task_id: str, worker_id: str, *, notify: bool = False) -> bool:
        """Give a running task back to the queue (graceful shutdown)."""

        def work(conn: Connection) -> bool:
            result = conn.execute(_RELEASE, {"task_id": task_id, "worker_id": worker_id, "now": utcnow()})
            if result.rowcount and notify:
                self.db.notify(conn, TASKS_CHANNEL)
            return bool(result.rowcount)

        return await self.db.run(work)

    async def finish(
        self, task: TaskRow, worker_id: str, outcome: Outcome, *, notify_delivery: bool = False
    ) -> TaskRow | None:
        """Record the outcome, settle credits and queue the webhook, all in one transaction.

        Returns None (and changes nothing) when ``worker_id`` no longer holds the task's lease.
        ``notify_delivery`` wakes other processes' webhook senders when a delivery is queued.
        """
        params = {"task_id": task.id, "worker_id": worker_id}
        return await self.db.run(
            lambda conn: self._record(conn, _FINISH, params, task, outcome, notify_delivery), group=True
        )

    async def cancel(
        self, task_id: str, account_id: int, outcome: Outcome, *, notify_delivery: bool = False
    ) -> tuple[Cancellation, TaskRow]:
        """Cancel a task of ``account_id``: one nobody runs ends now with ``outcome``; one that runs is asked
        to stop (its runner settles it; on PostgreSQL every process hears of it on the cancel channel)."""
        now = utcnow()
        params = {"task_id": task_id, "account_id": account_id}

        def work(conn: Connection) -> tuple[Cancellation, TaskRow]:
            row = conn.execute(self._task_for_update, params).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            task = task_row(row)
            if task.status.finished:
                return Cancellation.FINISHED, task
            if task.status == TaskStatus.PENDING or (
                task.lease_expires_at is not None and task.lease_expires_at < now
            ):
                done = self._record(conn, _CANCEL_NOW, {"task_id": task_id}, task, outcome, notify_delivery)
                assert done is not None  # the row is locked (or the one SQLite writer holds the file)
                return Cancellation.CANCELLED, done
            conn.execute(_REQUEST_CANCEL, {"task_id": task_id})
            self.db.notify(conn, CANCEL_CHANNEL, task_id)
            return Cancellation.REQUESTED, task

        return await self.db.run(work)

    def _give_back(self, conn: Connection, task: TaskRow, kind: str, amount: int, now: dt.datetime) -> None:
        """Return ``amount`` of the task's reservation to its account and write the ledger row: the last
        statement of the transaction, so the account's row lock is held the shortest time."""
        if self.db.is_postgres:
            values = {
                "account_id": task.account_id,
                "task_id": task.id,
                "kind": kind,
                "amount": amount,
                "ledger_amount": amount,
                "ledger_at": now,
            }
            conn.execute(_SETTLE, values).one()
            return
        balance_after = conn.execute(_ADD, {"account_id": task.account_id, "amount": amount}).scalar_one()
        _insert_ledger_row(conn, task.account_id, task.id, kind, amount, balance_after, now)

    def _record(
        self,
        conn: Connection,
        statement: sa.Update,
        params: dict[str, Any],
        task: TaskRow,
        outcome: Outcome,
        notify_delivery: bool,
    ) -> TaskRow | None:
        """Record ``outcome`` (if ``statement`` matches), settle the reservation, queue the webhook."""
        now = utcnow()
        settlement = settle(task.credits_reserved, outcome.cost)
        row = conn.execute(
            statement,
            {
                **params,
                "status": outcome.status,
                "response_text": outcome.response_text,
                "response_function_calls": outcome.function_calls,
                "failed_reason": outcome.failed_reason,
                "finish_reason": outcome.finish_reason,
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "charged": settlement.charged,
                "now": now,
            },
        ).first()
        if row is None:
            return None
        finished = dataclasses.replace(
            task,
            status=TaskStatus(outcome.status),
            response_text=outcome.response_text,
            response_function_calls=outcome.function_calls,
            failed_reason=outcome.failed_reason,
            finish_reason=outcome.finish_reason,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            credits_used=settlement.charged,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            cancel_requested=bool(row.cancel_requested),
        )
        if finished.webhook_url:
            insert_delivery(
                conn,
                delivery_id=new_delivery_id(),
                task_id=finished.id,
                account_id=finished.account_id,
                url=finished.webhook_url,
                payload=self.payload(finished),
            )
            if notify_delivery:
                self.db.notify(conn, DELIVERIES_CHANNEL)
        # "release": nothing was charged (a failure that used nothing); "settle": a charge.
        kind = "settle" if outcome.status == TaskStatus.DONE or settlement.charged else "release"
        self._give_back(conn, task, kind, settlement.returned, now)
        return finished

    async def counts(self) -> dict[str, int]:
        rows = await self.db.run(
            lambda conn: conn.execute(
                sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
            ).all()
        )
        return {str(status): int(count) for status, count in rows}

    async def depth(self) -> tuple[dict[str, int], int]:
        """Tasks pending and running, by status, and webhook deliveries pending (counts on status indexes)."""

        def work(conn: Connection) -> tuple[dict[str, int], int]:
            rows = conn.execute(_TASK_DEPTH).all()
            backlog = int(conn.execute(_DELIVERY_BACKLOG).scalar_one())
            return {str(status): int(count) for status, count in rows}, backlog

        return await self.db.run(work)
