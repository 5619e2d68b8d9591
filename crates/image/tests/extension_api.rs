//! Simple-signing signatures from a registry's signature extension API
//! (`GET /extensions/v2/<repo>/signatures/<digest>`, as OpenShift's registry serves them), from
//! a real HTTP server on loopback.

use axum::{extract::Path, routing::get, Json, Router};
use base64::{engine::general_purpose::STANDARD, Engine};
use coffer_image::{
    source::{Source, SourceOptions},
    ImageRef,
};
use serde_json::json;

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

async fn signatures(
    Path((ns, repo, digest)): Path<(String, String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if ns != "team" || repo != "app" || digest != DIGEST {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    Json(json!({"signatures": [
        {"version": 2, "type": "atomic", "name": format!("{DIGEST}@one"), "content": STANDARD.encode(b"sig-one")},
        {"version": 2, "type": "other", "name": format!("{DIGEST}@two"), "content": STANDARD.encode(b"skip")},
        {"version": 2, "type": "atomic", "name": format!("{DIGEST}@three"), "content": STANDARD.encode(b"sig-three")}
    ]}))
    .into_response()
}

/// Serves [`signatures`] at the extension API's path on loopback; returns its address.
async fn serve_signatures() -> std::net::SocketAddr {
    let app = Router::new().route(
        "/extensions/v2/{ns}/{repo}/signatures/{digest}",
        get(signatures),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn atomic_signatures_are_read_and_absent_ones_are_empty() {
    let addr = serve_signatures().await;
    let source = |repo: &str| {
        Source::new(
            &ImageRef::parse(&format!("docker://{addr}/team/{repo}:v1")).unwrap(),
            &SourceOptions {
                plain_http: true,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let sigs = source("app").extension_signatures(DIGEST).await.unwrap();
    assert_eq!(sigs, vec![b"sig-one".to_vec(), b"sig-three".to_vec()]);
    assert!(source("other")
        .extension_signatures(DIGEST)
        .await
        .unwrap()
        .is_empty());
}

/// Through the configured proxy (a guest whose registry traffic goes through the host's
/// forwarder): the registry itself is not reachable, the proxy answers for it.
#[tokio::test]
async fn the_extension_api_goes_through_the_proxy() {
    let proxy = serve_signatures().await;
    // Nothing listens on loopback port 1: only the proxy can answer.
    let source = Source::new(
        &ImageRef::parse("docker://127.0.0.1:1/team/app:v1").unwrap(),
        &SourceOptions {
            plain_http: true,
            proxy: Some(format!("http://{proxy}")),
            ..Default::default()
        },
    )
    .unwrap();
    let sigs = source.extension_signatures(DIGEST).await.unwrap();
    assert_eq!(sigs, vec![b"sig-one".to_vec(), b"sig-three".to_vec()]);
}
