"""HTTP handlers to inspect a task's webhook deliveries and to queue a redelivery."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from textgen.http.routes import authorize, json_response, services
from textgen.presentation import deliveries_json, delivery_json


async def list_deliveries(request: Request) -> Response:
    account, quota = await authorize(request)
    task, histories = await services(request).tasks.deliveries(account, str(request.path_params["task_id"]))
    return json_response(deliveries_json(task.id, histories), 200, quota)


async def redeliver(request: Request) -> Response:
    """Queue a new delivery (a new webhook-id) of a finished task's payload to its webhook_url."""
    account, quota = await authorize(request)
    created = await services(request).tasks.redeliver(account, str(request.path_params["task_id"]))
    return json_response(delivery_json(created), 201, quota)


def webhook_routes() -> list[Route]:
    return [
        Route("/sse/text_generator/{task_id:str}/webhooks/", list_deliveries, methods=["GET"]),
        Route("/sse/text_generator/{task_id:str}/webhooks/redeliver/", redeliver, methods=["POST"]),
    ]
