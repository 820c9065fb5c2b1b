//! The key check on every route, what the mock records, injected replies and the app's own
//! routes.

use bytes::Bytes;
use dify_gateway::mock::Reply;
use http::{Method, StatusCode};

use super::{bytes_body, mock, KEY};

/// One request per route.
const ROUTES: [(&str, &str); 17] = [
    (
        "GET",
        "/v1/workflows/run/3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c",
    ),
    ("POST", "/v1/workflows/run"),
    (
        "POST",
        "/v1/workflows/0b7a1f9c-2d3e-4f50-8a6b-7c8d9e0f1a2b/run",
    ),
    ("POST", "/v1/workflows/tasks/t-1/stop"),
    (
        "GET",
        "/v1/workflow/3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c/events?user=a",
    ),
    ("GET", "/v1/workflows/logs"),
    ("POST", "/v1/files/upload"),
    ("GET", "/v1/files/f-1/preview"),
    ("GET", "/v1/info"),
    ("GET", "/v1/parameters"),
    ("GET", "/v1/meta"),
    ("GET", "/v1/site"),
    ("GET", "/v1/end-users/u-1"),
    ("POST", "/v1/audio-to-text"),
    ("POST", "/v1/text-to-audio"),
    ("GET", "/v1/form/human_input/tok"),
    ("POST", "/v1/form/human_input/tok"),
];

#[tokio::test]
async fn every_route_checks_the_app_key() {
    let (up, http) = mock().await;
    for auth in ["", "Bearer app-wrong", KEY] {
        for (method, path) in ROUTES {
            let got = http
                .call(
                    method.parse().unwrap(),
                    path,
                    &[
                        ("authorization", auth),
                        ("content-type", "application/json"),
                    ],
                    bytes_body(r#"{"inputs": {}, "user": "a"}"#),
                )
                .await;
            assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(
                got.text(),
                "{\"code\": \"unauthorized\", \"message\": \"Access token is invalid\", \"status\": 401}\n"
            );
            assert_eq!(got.header("www-authenticate"), Some("Bearer realm=\"api\""));
        }
    }
    assert!(up.runs().is_empty());
    assert_eq!(up.total(), 3 * ROUTES.len() as u64);
}

#[tokio::test]
async fn requests_are_recorded_as_they_arrived() {
    let (up, http) = mock().await;
    let body = r#"{ "inputs" : {"q": "x"},"user":"a" }"#;
    http.call(
        Method::POST,
        "/v1/workflows/run?debug=1",
        &[
            ("content-type", "application/json; charset=utf-8"),
            ("x-trace-id", "trace-1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("cookie", "session=s3cr3t"),
        ],
        bytes_body(body),
    )
    .await;
    http.get("/v1/info?x=1&x=2").await;
    let recs = up.requests();
    assert_eq!(recs.len(), 2);
    let run = &recs[0];
    assert_eq!(run.method, Method::POST);
    assert_eq!(run.path, "/v1/workflows/run");
    assert_eq!(run.query.as_deref(), Some("debug=1"));
    assert_eq!(run.body_text(), Some(body));
    assert_eq!(
        run.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(run.header("x-trace-id"), Some("trace-1"));
    assert!(run.header("traceparent").is_some());
    assert_eq!(run.header("cookie"), Some("session=s3cr3t"));
    assert_eq!(
        run.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let shown = format!("{run:?}");
    assert!(!shown.contains(KEY) && !shown.contains("s3cr3t"), "{shown}");
    assert_eq!(recs[1].body, None);
    assert_eq!(up.queries("/v1/info"), ["x=1&x=2"]);
    assert_eq!(up.last_request().unwrap().path, "/v1/info");
}

#[tokio::test]
async fn injected_replies_come_first_then_the_route_again() {
    let (up, http) = mock().await;
    up.fail_next(
        "/v1/workflows/run",
        vec![
            Reply::dify_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests.",
            ),
            Reply::dify_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "Quota exceeded.",
            ),
        ],
    );
    let start = r#"{"inputs": {}, "user": "a"}"#;
    let first = http.post_json("/v1/workflows/run", start).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.json()["code"], "too_many_requests");
    assert_eq!(first.header("retry-after"), Some("1"));
    let second = http.post_json("/v1/workflows/run", start).await;
    assert_eq!(second.json()["code"], "rate_limit_error");
    let third = http.post_json("/v1/workflows/run", start).await;
    assert_eq!(third.status, StatusCode::OK);
    assert_eq!(up.runs().len(), 1);
    // The injected requests' bodies were still read and recorded.
    assert_eq!(
        up.requests_to("/v1/workflows/run")[0].body_text(),
        Some(start)
    );
}

#[tokio::test]
async fn the_apps_descriptions_are_counted_per_path() {
    let (up, http) = mock().await;
    for (path, key) in [
        ("/v1/info", "mode"),
        ("/v1/parameters", "user_input_form"),
        ("/v1/meta", "tool_icons"),
        ("/v1/site", "title"),
    ] {
        let got = http.get(path).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert!(got.json().get(key).is_some(), "{path}");
    }
    http.get("/v1/parameters").await;
    assert_eq!(up.path_hits("/v1/parameters"), 2);
    assert_eq!(up.path_hits("/v1/site"), 1);
    let head = http
        .call(Method::HEAD, "/v1/info", &[], bytes_body(Bytes::new()))
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn human_input_forms_end_users_and_unknown_routes() {
    let (_up, http) = mock().await;
    let form = http.get("/v1/form/human_input/tok-1").await;
    assert_eq!(form.json()["user_actions"][0]["id"], "approve");
    assert!(form.json()["expiration_time"].is_u64());
    let path = "/v1/form/human_input/tok-1";
    let answered = http
        .post_json(
            path,
            r#"{"inputs": {"comment": "ok"}, "action": "approve", "user": "a"}"#,
        )
        .await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.text(), "{}");
    let wrong = http
        .post_json(path, r#"{"inputs": {}, "action": "launch", "user": "a"}"#)
        .await;
    assert_eq!(wrong.json()["code"], "invalid_param");
    assert_eq!(
        http.get("/v1/end-users/nobody").await.status,
        StatusCode::NOT_FOUND
    );
    let unknown = http.get("/v1/chat-messages").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["code"], "not_found");
    let wrong_method = http.post_json("/v1/info", "{}").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.json()["code"], "method_not_allowed");
}
