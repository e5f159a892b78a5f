//! The ext_authz Check adapter over loopback gRPC, in the forms Envoy sends.

mod common;

use std::collections::HashMap;

use common::TestServer;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};

fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<HashMap<_, _>>(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(server: &TestServer, request: CheckRequest) -> CheckResponse {
    AuthorizationClient::new(server.channel().await)
        .check(request)
        .await
        .expect("a deny is still an OK reply")
        .into_inner()
}

fn code(response: &CheckResponse) -> i32 {
    response.status.as_ref().map_or(-1, |s| s.code)
}

#[tokio::test]
async fn allow_sets_identity_and_strips_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (key_id, secret) = server.create_key("acme", &["mail.send"]).await;
    let auth = format!("Bearer {secret}");
    let response = check(
        &server,
        check_request("POST", "/v3/mail/send?x=1", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(code(&response), 0);
    let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
        panic!("expected an OkHttpResponse: {response:?}");
    };
    let headers: HashMap<_, _> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(headers.get("x-keyward-key-id"), Some(&key_id.as_str()));
    assert_eq!(headers.get("x-keyward-account-id"), Some(&"acme"));
    assert_eq!(ok.headers_to_remove, vec!["authorization"]);
}

#[tokio::test]
async fn raw_header_map_form_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let mut request = check_request("POST", "/v3/mail/send", &[]);
    if let Some(http) = request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "Authorization".into(),
                value: String::new(),
                raw_value: format!("Bearer {secret}").into_bytes(),
            }],
        });
    }
    assert_eq!(code(&check(&server, request).await), 0);
}

#[tokio::test]
async fn denies_carry_status_body_and_missing_scopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let auth = format!("Bearer {secret}");
    let cases = [
        (
            check_request("GET", "/v3/alerts", &[("authorization", &auth)]),
            403,
            Some("alerts.read"),
        ),
        (check_request("GET", "/v3/alerts", &[]), 401, None),
        (
            check_request(
                "GET",
                "/v3/alerts",
                &[("authorization", "Basic dXNlcjpwYXNz")],
            ),
            401,
            None,
        ),
        (
            check_request("GET", "/v3/a/../alerts", &[("authorization", &auth)]),
            403,
            None,
        ),
        (
            check_request("", "/v3/alerts", &[("authorization", &auth)]),
            400,
            None,
        ),
        (CheckRequest::default(), 400, None),
    ];
    for (request, status, missing) in cases {
        let response = check(&server, request).await;
        assert_ne!(code(&response), 0, "denied");
        let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
            panic!("expected a DeniedHttpResponse: {response:?}");
        };
        assert_eq!(denied.status.as_ref().map(|s| s.code), Some(status));
        let body: serde_json::Value = serde_json::from_str(&denied.body).expect("json");
        assert!(body["errors"][0]["message"].is_string(), "{body}");
        assert!(!denied.body.contains(&secret[26..]));
        let header = |name: &str| {
            denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == name)
                .map(|h| h.value.clone())
        };
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        assert_eq!(header("x-keyward-missing-scopes").as_deref(), missing);
    }
}

/// Check validates a request exactly as Authorize does: the same limits,
/// the same message naming the field.
#[tokio::test]
async fn check_refuses_what_authorize_refuses_with_the_same_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let auth = format!("Bearer {secret}");
    let long = format!("/v3/mail/send/{}", "a".repeat(8192));
    for (method, path) in [
        ("POST", long.as_str()),
        ("PO ST", "/v3/mail/send"),
        ("POST", ""),
    ] {
        let refused = server
            .authorizer()
            .await
            .authorize(keyward::pb::v1::AuthorizeRequest {
                key: secret.clone(),
                method: method.into(),
                path: path.into(),
                client_ip: String::new(),
            })
            .await
            .expect_err("Authorize refuses it");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let response = check(
            &server,
            check_request(method, path, &[("authorization", &auth)]),
        )
        .await;
        assert_eq!(
            code(&response),
            tonic::Code::InvalidArgument as i32,
            "{path:.20}"
        );
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("expected a deny: {response:?}");
        };
        assert_eq!(denied.status.map(|s| s.code), Some(400));
        assert!(
            denied.body.contains(refused.message()),
            "{:?} should carry {:?}",
            denied.body,
            refused.message()
        );
    }
}

/// Check shares Authorize's path rules: the review's confusions are denied.
#[tokio::test]
async fn check_denies_spellings_an_upstream_reads_as_another_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["ips.read"]).await;
    let auth = format!("Bearer {secret}");
    for path in ["/v3/ips/%70ools", "/v3/ips/pools;x=1", "/v3/ips/POOLS"] {
        let response = check(
            &server,
            check_request("GET", path, &[("authorization", &auth)]),
        )
        .await;
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("{path} must be denied: {response:?}");
        };
        assert_eq!(denied.status.map(|s| s.code), Some(403), "{path}");
        assert!(
            denied.headers.iter().any(|h| h
                .header
                .as_ref()
                .is_some_and(|h| h.value == "ambiguous_path")),
            "{path}: {denied:?}"
        );
    }
    let response = check(
        &server,
        check_request("GET", "/v3/ips/2001:db8::1", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(code(&response), 0, "an IPv6 address still passes");
}
