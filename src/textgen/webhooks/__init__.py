"""Webhook delivery: the outbox sender, its retry schedule and the address policy (SSRF guard)."""

from textgen.webhooks.addresses import AddressPolicy, RefusedDestination, address_class
from textgen.webhooks.retry import GiveUp, Retry, RetrySchedule
from textgen.webhooks.sender import WebhookSender, signature_header, webhook_headers

__all__ = [
    "AddressPolicy",
    "GiveUp",
    "RefusedDestination",
    "Retry",
    "RetrySchedule",
    "WebhookSender",
    "address_class",
    "signature_header",
    "webhook_headers",
]
