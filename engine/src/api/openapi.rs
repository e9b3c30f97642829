//! The OpenAPI document served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::domain::{
    EventKind, FinancialStatus, FulfillmentStatus, Order, OrderChange, OrderEvent, Priority, Status, Tier,
};
use crate::engine::OrderEdit;
use crate::store::{HistoryEntry, Outcome};

#[derive(OpenApi)]
#[openapi(
    info(title = "Atomic Order Orchestrator", description = "Priority order pipeline with versioned, idempotent storage. \
        WebSocket: GET /ws pushes {\"type\":\"order.synced\",\"order\":{...}} per applied change, {\"type\":\"run.phase\",\"run\":{...}} at each phase of a run, \
        {\"type\":\"run.progress\",\"elapsed_ms\":N,\"run\":{...}} at most once per 250 ms of the engine clock while it goes, and {\"type\":\"resync\"} when a client fell behind."),
    paths(
        super::health, super::metrics, super::recent_logs, super::post_events, super::list_orders,
        super::get_order, super::order_history, super::patch_order,
        super::plugins::list, super::plugins::deploy, super::plugins::promote, super::plugins::rollback,
        super::plugins::discard, super::plugins::shadow_report, super::plugins::dead_letters, super::plugins::replay,
        super::webhooks::receive, super::webhooks::deliveries, super::audit,
        super::runs::start, super::runs::current, super::runs::list, super::runs::get, super::runs::cancel,
        super::runs::pause, super::runs::resume, super::runs::queue_state, super::runs::reset,
    ),
    modifiers(&BearerToken),
    components(schemas(
        Order, OrderEvent, OrderChange, OrderEdit, HistoryEntry, Outcome, Tier, Priority, Status,
        EventKind, FinancialStatus, FulfillmentStatus, super::ErrorBody, super::Accepted, super::Health,
        crate::store::ActionRecord,
    ))
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme that mutating calls name.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
