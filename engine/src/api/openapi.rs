//! The OpenAPI document served at `/openapi.json`.

use utoipa::OpenApi;

use crate::domain::{EventKind, FinancialStatus, FulfillmentStatus, Order, OrderChange, OrderEvent, Priority, Status, Tier};
use crate::engine::OrderEdit;
use crate::store::{HistoryEntry, Outcome};

#[derive(OpenApi)]
#[openapi(
    info(title = "Atomic Order Orchestrator", description = "Priority order pipeline with versioned, idempotent storage. \
        WebSocket: GET /ws pushes {\"type\":\"order.synced\",\"order\":{...}} per applied change, and {\"type\":\"resync\"} when a client fell behind."),
    paths(
        super::health, super::metrics, super::post_events, super::list_orders,
        super::get_order, super::order_history, super::patch_order,
    ),
    components(schemas(
        Order, OrderEvent, OrderChange, OrderEdit, HistoryEntry, Outcome, Tier, Priority, Status,
        EventKind, FinancialStatus, FulfillmentStatus, super::ErrorBody, super::Accepted, super::Health,
    ))
)]
pub struct ApiDoc;
