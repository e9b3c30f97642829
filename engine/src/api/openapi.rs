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
    info(
        title = "Atomic Order Orchestrator",
        description = "Priority order pipeline with versioned, idempotent storage. \
            WebSocket: GET /ws pushes {\"type\":\"order.synced\",\"order\":{...}} per applied change \
            (GET /ws?batch=true: {\"type\":\"orders.synced\",\"orders\":[...]} per send cycle instead), \
            {\"type\":\"run.phase\",\"run\":{...}} at each phase of a run, \
            {\"type\":\"run.progress\",\"elapsed_ms\":N,\"run\":{...}} at most once per 250 ms of the engine clock \
            while it goes, {\"type\":\"resync\"} when a client fell behind, and the engine's pulse: \
            {\"type\":\"stats\",\"sample\":{...}} each second, its last 10 minutes as \
            {\"type\":\"stats.history\",\"samples\":[...]} right after {\"type\":\"hello\"}."
    ),
    paths(
        super::health, super::metrics, super::recent_logs, super::post_events, super::list_orders,
        super::order_counts, super::cluster_view,
        super::get_order, super::order_history, super::order_journey, super::patch_order,
        super::plugins::list, super::plugins::deploy, super::plugins::promote, super::plugins::rollback,
        super::plugins::activate, super::plugins::what_if,
        super::plugins::discard, super::plugins::shadow_report, super::plugins::dead_letters, super::plugins::replay,
        super::plugins::replay_many, super::plugins::purge_many,
        super::webhooks::receive, super::webhooks::deliveries, super::webhooks::reconcile,
        super::webhooks::shop, super::webhooks::activate_shop, super::webhooks::compliance_requests,
        super::webhooks::compliance_request, super::webhooks::retry_compliance_request, super::audit,
        super::runs::start, super::runs::current, super::runs::list, super::runs::get, super::runs::cancel,
        super::runs::pause, super::runs::resume, super::runs::queue_state, super::runs::reset,
    ),
    modifiers(&BearerToken, &EdgeAnswers),
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

/// What the edges add to every operation, so generated clients see every answer:
/// path parameters declared, the access policy's 401 and 403 (and the bearer scheme) where
/// a token can be needed, 400 where input is parsed, 404 where a path names something,
/// 413 and 415 where a body is read, and 503 when the log or the store fails.
struct EdgeAnswers;

impl Modify for EdgeAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use axum::http::Method;
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ObjectBuilder, Required, Type};

        use super::auth::{Need, need};
        for (path, item) in doc.paths.paths.iter_mut() {
            let names: Vec<&str> =
                path.split('/').filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
            let ops = [
                (Method::GET, &mut item.get),
                (Method::POST, &mut item.post),
                (Method::PUT, &mut item.put),
                (Method::PATCH, &mut item.patch),
                (Method::DELETE, &mut item.delete),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                let params = op.parameters.get_or_insert_with(Vec::new);
                for name in &names {
                    if !params.iter().any(|p| p.name == *name && p.parameter_in == ParameterIn::Path) {
                        let schema = ObjectBuilder::new().schema_type(Type::String).build();
                        let param = ParameterBuilder::new()
                            .name(*name)
                            .parameter_in(ParameterIn::Path)
                            .required(Required::True)
                            .schema(Some(schema))
                            .build();
                        params.push(param);
                    }
                }
                let needs = need(&method, path);
                let mut add = |code: &str, why: &str| {
                    op.responses.responses.entry(code.to_string()).or_insert_with(|| error_answer(why));
                };
                if matches!(needs, Some(Need::Role(_) | Need::Read)) {
                    add("401", "No token, or one that matches none (reads: off a loopback bind only)");
                    add("403", "The token's role is too low");
                }
                add("400", "Invalid input; `detail` says which");
                if !names.is_empty() {
                    add("404", "Nothing by that name");
                }
                if op.request_body.is_some() || method == Method::PUT {
                    add("408", "The body came too slowly");
                    add("413", "The body is too large");
                }
                // Only JSON bodies are checked for their type (a plugin upload is not).
                if op.request_body.as_ref().is_some_and(|b| b.content.contains_key("application/json")) {
                    add("415", "The body is not declared `application/json`");
                }
                add("503", "The log or the store is unavailable");
                if matches!(needs, Some(Need::Role(_))) && op.security.is_none() {
                    let bearer = utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new());
                    op.security = Some(vec![bearer]);
                }
            }
        }
    }
}

/// A response whose body is the API's error.
fn error_answer(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    ResponseBuilder::new().description(description).content("application/json", content).build().into()
}
