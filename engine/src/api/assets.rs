//! The operator dashboard's static files (built from `dashboard/` by build.rs), embedded in the binary.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!(concat!(env!("OUT_DIR"), "/dashboard/index.html"));
const JS: &str = include_str!(concat!(env!("OUT_DIR"), "/dashboard/dashboard.js"));
const WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dashboard/dashboard_bg.wasm"));
const CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/dashboard/style.css"));

/// `/`, `/ui/*` and `/dashboard/*`; generic over the state so it merges into any router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX.as_bytes()) }))
        .route("/dashboard", get(|| async { asset("text/html; charset=utf-8", INDEX.as_bytes()) }))
        // The dashboard's own pages: every /ui path loads the app, which reads the path.
        .route("/ui", get(|| async { asset("text/html; charset=utf-8", INDEX.as_bytes()) }))
        .route("/ui/{*page}", get(|| async { asset("text/html; charset=utf-8", INDEX.as_bytes()) }))
        .route("/dashboard/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", JS.as_bytes()) }))
        .route("/dashboard/dashboard_bg.wasm", get(|| async { asset("application/wasm", WASM) }))
        .route("/dashboard/style.css", get(|| async { asset("text/css; charset=utf-8", CSS.as_bytes()) }))
}

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    // no-cache (revalidate each load): file names are not content-hashed, and a stale
    // JS glue beside a new .wasm would fail to instantiate after an upgrade.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
