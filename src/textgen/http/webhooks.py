"""HTTP handlers to inspect a task's webhook deliveries and to queue a redelivery."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from textgen.errors import BadRequest
from textgen.http.routes import authorize, json_response, services
from textgen.storage.store import TERMINAL
from textgen.webhooks.protocol import WebhookDeliveryList, delivery_view


async def list_deliveries(request: Request) -> Response:
    account, quota = await authorize(request)
    svc = services(request)
    task = await svc.tasks.get(account, str(request.path_params["task_id"]))
    rows = await svc.store.deliveries_for_task(task.id)
    body = WebhookDeliveryList(task_id=task.id, results=[delivery_view(r) for r in rows])
    return json_response(body.model_dump(mode="json"), 200, quota)


async def redeliver(request: Request) -> Response:
    """Queue a new delivery (a new webhook-id) of a finished task's payload to its webhook_url."""
    account, quota = await authorize(request)
    svc = services(request)
    task = await svc.tasks.get(account, str(request.path_params["task_id"]))
    if task.status not in TERMINAL:
        raise BadRequest(f"task {task.id} is {task.status}; only finished tasks can be redelivered")
    if not task.webhook_url:
        raise BadRequest(f"task {task.id} has no webhook_url")
    delivery_id = await svc.store.queue_delivery(task, task.webhook_url)
    rows = await svc.store.deliveries_for_task(task.id)
    created = next(delivery_view(r) for r in rows if r["id"] == delivery_id)
    return json_response(created.model_dump(mode="json"), 201, quota)


def webhook_routes() -> list[Route]:
    return [
        Route("/sse/text_generator/{task_id:str}/webhooks/", list_deliveries, methods=["GET"]),
        Route("/sse/text_generator/{task_id:str}/webhooks/redeliver/", redeliver, methods=["POST"]),
    ]
