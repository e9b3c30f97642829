"""{{name}}: order rules for the Atomic Order Orchestrator, in Python.

A new order takes its fields from its created event; an update changes only what it
names. The house rule: shipping is free from 100.00 for GOLD and DIAMOND customers, and
costs 4.99 below that.
"""

from typing import List, Optional

from wit_world import exports
from wit_world.imports.types import (
    Decision,
    Decision_Reject,
    Decision_Skip,
    Decision_Upsert,
    EventKind,
    Order,
    OrderEvent,
    OrderFields,
    RuleInput,
    Status,
    Tier,
)


def shipping_fee_cents(tier: Tier, total_cents: int) -> int:
    if tier in (Tier.GOLD, Tier.DIAMOND) and total_cents >= 10_000:
        return 0
    return 499


class Rules(exports.Rules):
    def decide(self, event: OrderEvent, current: Optional[Order]) -> Decision:
        change = event.payload
        if change.total_cents is not None and change.total_cents < 0:
            return Decision_Reject("the total is negative")
        if current is not None and event.kind == EventKind.CREATED:
            return Decision_Skip(f"order {current.id} exists already")
        if current is not None:
            fields = current.fields
        elif change.customer is None or change.tier is None or change.total_cents is None:
            return Decision_Reject("a new order needs a customer, a tier and a total")
        else:
            fields = OrderFields(
                shopify_order_id=None,
                customer=change.customer,
                tier=change.tier,
                status=Status.PENDING,
                total_cents=change.total_cents,
                shipping_fee_cents=0,
                currency="USD",
                note="",
            )
        for name in ("customer", "tier", "total_cents", "currency", "note", "status"):
            value = getattr(change, name)
            if value is not None:
                setattr(fields, name, value)
        if event.kind == EventKind.CANCELLED:
            fields.status = Status.CANCELLED
        fields.shipping_fee_cents = shipping_fee_cents(fields.tier, fields.total_cents)
        return Decision_Upsert(fields)

    def decide_batch(self, inputs: List[RuleInput]) -> List[Decision]:
        return [self.decide(i.event, i.current) for i in inputs]
