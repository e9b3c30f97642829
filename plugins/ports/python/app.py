"""The default order rules (plugins/order-rules), ported to Python line for line. The
conformance test (engine/tests/conformance.rs) checks that it decides exactly like the
native reference."""

from typing import List, Optional

from wit_world import exports
from wit_world.imports.types import (
    Decision,
    Decision_Reject,
    Decision_Skip,
    Decision_Upsert,
    EventKind,
    FinancialStatus,
    FulfillmentStatus,
    Order,
    OrderEvent,
    OrderFields,
    RuleInput,
    Status,
)

KIND_NAMES = {EventKind.CREATED: "created", EventKind.UPDATED: "updated", EventKind.CANCELLED: "cancelled"}


def shipping_fee_cents(total_cents: int) -> int:
    if total_cents < 5_000:
        return 999
    if total_cents < 10_000:
        return 799
    if total_cents < 20_000:
        return 599
    return 0


def mapped_status(financial: Optional[FinancialStatus], fulfillment: Optional[FulfillmentStatus]) -> Optional[Status]:
    if fulfillment is not None:
        return {
            FulfillmentStatus.FULFILLED: Status.SHIPPED,
            FulfillmentStatus.PARTIAL: Status.CONFIRMED,
            FulfillmentStatus.RESTOCKED: Status.CANCELLED,
        }[fulfillment]
    if financial is None:
        return None
    if financial in (FinancialStatus.PENDING, FinancialStatus.AUTHORIZED):
        return Status.PENDING
    if financial in (FinancialStatus.PAID, FinancialStatus.PARTIALLY_PAID, FinancialStatus.PARTIALLY_REFUNDED):
        return Status.CONFIRMED
    return Status.CANCELLED


class Rules(exports.Rules):
    def decide(self, event: OrderEvent, current: Optional[Order]) -> Decision:
        p = event.payload
        if event.kind == EventKind.CREATED and current is not None:
            return Decision_Skip("order already exists")
        if event.source == "shopify" and current is not None and current.source_updated_at_ms is not None:
            last = current.source_updated_at_ms
            if event.occurred_at_ms < last:
                return Decision_Skip(
                    f"discarded: stale delivery (updated_at {event.occurred_at_ms} is older than {last})"
                )
        if p.total_cents is not None and p.total_cents < 0:
            return Decision_Reject(f"negative total_cents {p.total_cents}")
        if p.shipping_fee_cents is not None and p.shipping_fee_cents < 0:
            return Decision_Reject(f"negative shipping_fee_cents {p.shipping_fee_cents}")
        before = current.fields if current is not None else None
        if before is not None:
            fields = OrderFields(**vars(before))
        elif p.customer is None or p.tier is None or p.total_cents is None:
            return Decision_Reject(
                f"order {event.order_id} does not exist and the {KIND_NAMES[event.kind]} event lacks "
                "customer, tier or total_cents"
            )
        else:
            fields = OrderFields(
                shopify_order_id=None,
                customer=p.customer,
                tier=p.tier,
                status=Status.PENDING,
                total_cents=p.total_cents,
                shipping_fee_cents=shipping_fee_cents(p.total_cents),
                currency="USD",
                note="",
            )
        for name in ("shopify_order_id", "customer", "tier", "currency", "note"):
            value = getattr(p, name)
            if value is not None:
                setattr(fields, name, value)
        if p.total_cents is not None:
            fields.total_cents = p.total_cents
            fields.shipping_fee_cents = shipping_fee_cents(p.total_cents)
        if p.shipping_fee_cents is not None:
            fields.shipping_fee_cents = p.shipping_fee_cents
        status = mapped_status(p.financial_status, p.fulfillment_status)
        if status is None:
            status = p.status
        if event.kind == EventKind.CANCELLED:
            status = Status.CANCELLED
        # A late or stale event never moves the order back along the lattice.
        if status is not None and status.value >= fields.status.value:
            fields.status = status
        if before is not None and before == fields:
            return Decision_Skip("no change")
        return Decision_Upsert(fields)

    def decide_batch(self, inputs: List[RuleInput]) -> List[Decision]:
        return [self.decide(i.event, i.current) for i in inputs]
