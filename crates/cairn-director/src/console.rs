//! The web console: three static files, built into the binary, over the REST API.
//!
//! The console holds no state of its own and no secret: it asks for a token, keeps it in the
//! tab's session storage, and calls `/api/` with it like any client; every check is the API's.
//! Its pages are served with a strict Content-Security-Policy (scripts and styles from these
//! files only, no inline code, no other origin), so a VM name or a log line shown by it can
//! never run as code; the script also never builds HTML from text.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

const POLICY: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; \
                      connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn page(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The console's routes: `/`, `/console/app.js`, `/console/app.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", INDEX) }))
        .route("/console/app.js", get(|| async { page("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/console/app.css", get(|| async { page("text/css; charset=utf-8", STYLE) }))
}
