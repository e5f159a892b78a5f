//! The monitoring kit (`k8s/monitoring/`) against the real thing: a real
//! Prometheus scrapes a real `keyward serve` under traffic, loads the
//! rules, and runs every dashboard query through its HTTP API. Plus the
//! checks that need no Prometheus: the PrometheusRule is rules.yaml, every
//! alert has its annotations, a runbook section and a promtool test, and
//! every dashboard panel is described in the docs.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{bearer, connect, spawn_serve};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const RULES: &str = include_str!("../k8s/monitoring/rules.yaml");
const RULES_TEST: &str = include_str!("../k8s/monitoring/rules.test.yaml");
const PROMETHEUS_RULE: &str = include_str!("../k8s/monitoring/prometheusrule.yaml");
const DASHBOARD: &str = include_str!("../k8s/monitoring/dashboard.json");
const OPERATIONS: &str = include_str!("../docs/operations.md");
const RUNBOOKS: &str = "https://github.com/keyward/keyward/blob/main/docs/operations.md#";

/// Dashboard queries that may return nothing under this test's traffic,
/// and why. Every other query must return data.
const MAY_BE_EMPTY: [(&str, &str); 6] = [
    (
        "Replica staleness",
        "replicated mode only; the test's sidecar is standalone",
    ),
    (
        "Replica revision",
        "replicated mode only; the test's sidecar is standalone",
    ),
    (
        "Replica connected",
        "replicated mode only; the test's sidecar is standalone",
    ),
    (
        "First sights by outcome",
        "on-demand replicas only; the test's sidecar is standalone",
    ),
    (
        "Module lease trade calls by limits",
        "an Envoy module's TradeLeases calls only; the test runs no module",
    ),
    (
        "TLS certificate expires in",
        "exported only with --tls-cert; the test serves plain loopback gRPC",
    ),
];

/// The alert names rules.yaml defines, in order, once each.
fn alerts() -> Vec<&'static str> {
    let mut names: Vec<&str> = RULES
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    names.dedup();
    names
}

/// Every panel's (title, queries) in dashboard.json.
fn panels() -> Vec<(String, Vec<String>)> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|panel| panel["type"] != "row")
        .map(|panel| {
            let title = panel["title"].as_str().expect("a title").to_owned();
            let queries = panel["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|target| target["expr"].as_str().expect("expr").to_owned())
                .collect();
            (title, queries)
        })
        .collect()
}

/// The operator renders the rules from the PrometheusRule: it must be
/// rules.yaml (which promtool checks and tests), line for line.
#[test]
fn the_prometheus_rule_is_rules_yaml() {
    let header_end = PROMETHEUS_RULE.find("\nspec:\n").expect("spec:") + "\nspec:\n".len();
    let expected: String = PROMETHEUS_RULE[..header_end].to_owned()
        + &RULES
            .split_inclusive('\n')
            .map(|line| {
                if line.trim().is_empty() {
                    line.to_owned()
                } else {
                    format!("  {line}")
                }
            })
            .collect::<String>();
    assert!(
        PROMETHEUS_RULE == expected,
        "k8s/monitoring/prometheusrule.yaml differs from rules.yaml; it should be:\n{expected}"
    );
}

/// Every alert says what happened and links its runbook, which exists;
/// every alert has a promtool test.
#[test]
fn every_alert_has_annotations_a_runbook_and_a_test() {
    let names = alerts();
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        let blocks: Vec<&str> = RULES
            .split("- alert: ")
            .filter(|block| block.starts_with(&format!("{name}\n")))
            .collect();
        assert!(!blocks.is_empty(), "{name}");
        for block in blocks {
            for annotation in ["summary: ", "description: ", "runbook_url: "] {
                assert!(block.contains(annotation), "{name} lacks {annotation}");
            }
            let anchor = name.to_lowercase();
            assert!(
                block.contains(&format!("runbook_url: {RUNBOOKS}{anchor}\n")),
                "{name}'s runbook_url"
            );
        }
        assert!(
            OPERATIONS.contains(&format!("\n#### {name}\n")),
            "docs/operations.md has no runbook section for {name}"
        );
        assert!(
            RULES_TEST.contains(&format!("alertname: {name}\n")),
            "rules.test.yaml does not test {name}"
        );
    }
}

/// Every panel is described in the docs with its queries, and filters by
/// the dashboard's namespace and pod variables.
#[test]
fn every_panel_is_documented_and_follows_the_variables() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    assert!(variables.is_superset(&BTreeSet::from(["namespace", "pod"])));
    for (title, queries) in panels() {
        assert!(
            OPERATIONS.contains(&format!("| {title} |")),
            "docs/operations.md does not describe the panel {title:?}"
        );
        for query in queries {
            assert!(query.contains("namespace=~\"$namespace\""), "{query}");
            assert!(
                OPERATIONS.contains(&query.replace('|', "\\|")),
                "docs/operations.md does not show {title:?}'s query {query}"
            );
        }
    }
}

/// A minimal HTTP/1.1 client for Prometheus's API.
struct Api {
    base: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<hyper::body::Bytes>,
    >,
}

impl Api {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    /// GET `path`: (status, body), or `None` while nothing listens.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use http_body_util::BodyExt;
        let uri = format!("{}{path}", self.base).parse().expect("uri");
        let response = self.client.get(uri).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `/api/v1/query`: the result vector, or Prometheus's error.
    async fn query(&self, query: &str) -> Result<Vec<serde_json::Value>, String> {
        let encoded = serde_urlencoded::to_string([("query", query)]).expect("encode");
        let (status, body) = self
            .get(&format!("/api/v1/query?{encoded}"))
            .await
            .ok_or("Prometheus did not answer")?;
        let reply: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
        if reply["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `/api/v1/<path>`'s `data`.
    async fn data(&self, path: &str) -> serde_json::Value {
        let (_, body) = self.get(&format!("/api/v1/{path}")).await.expect(path);
        let reply: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(reply["status"], "success", "{body}");
        reply["data"].clone()
    }
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Grafana's variables, as a user who picked this test's namespace and
/// pod would send them (`$__rate_interval` is at least four scrape
/// intervals).
fn substitute(query: &str) -> String {
    query
        .replace("$namespace", "monitoring-test")
        .replace("$pod", "keyward-0")
        .replace("$__rate_interval", "10s")
}

/// One round of traffic: allowed and denied decisions, key changes, a
/// refused KeyManager call and a guessed key.
async fn traffic(url: &str, admin: &str, round: usize) {
    let mut manager = KeyManagerClient::new(connect(url).await);
    let mut authorizer = AuthorizerClient::new(connect(url).await);
    let created = manager
        .create_key(bearer(
            admin,
            pb::CreateKeyRequest {
                name: format!("round {round}"),
                scopes: vec!["mail.send".to_owned()],
                account_id: "acme".to_owned(),
                ..Default::default()
            },
        ))
        .await
        .expect("admin creates a key")
        .into_inner();
    let key_id = created.key.expect("key").key_id;
    for (path, method) in [
        ("/v3/mail/send", "POST"),
        ("/v3/mail/send", "POST"),
        ("/v3/alerts", "GET"),
        ("/v3/nowhere", "GET"),
    ] {
        authorizer
            .authorize(pb::AuthorizeRequest {
                key: created.secret.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
                client_ip: String::new(),
            })
            .await
            .expect("a decision");
    }
    // The key's id with a wrong secret, four times: denied, and past
    // --failed-auth-limit 3 guessing is detected.
    let mut wrong: Vec<char> = created.secret.chars().collect();
    let at = wrong.len() - 10;
    wrong[at] = if wrong[at] == 'A' { 'B' } else { 'A' };
    let wrong: String = wrong.into_iter().collect();
    for _ in 0..4 {
        authorizer
            .authorize(pb::AuthorizeRequest {
                key: wrong.clone(),
                method: "POST".to_owned(),
                path: "/v3/mail/send".to_owned(),
                client_ip: String::new(),
            })
            .await
            .expect("a decision");
    }
    // A refused management call (no credentials), a read and a delete.
    let _ = manager
        .list_keys(pb::ListKeysRequest {
            account_id: "acme".to_owned(),
            ..Default::default()
        })
        .await;
    common::list_keys(&mut manager, admin, "acme").await;
    if round % 2 == 1 {
        manager
            .delete_key(bearer(admin, pb::DeleteKeyRequest { key_id }))
            .await
            .expect("admin deletes a key");
    }
}

/// Prometheus: its own TSDB in `dir`, a free loopback port, scraping
/// `metrics` every second under the job and labels the rules and the
/// dashboard expect (in Kubernetes the operator adds namespace and pod),
/// with the shipped rules loaded.
fn start_prometheus(prometheus: &str, dir: &std::path::Path, metrics: &str) -> (Killed, Api) {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/monitoring/rules.yaml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n- {rules}\n\
             scrape_configs:\n- job_name: keyward\n  static_configs:\n  - targets: ['{metrics}']\n    labels:\n      namespace: monitoring-test\n      pod: keyward-0\n",
            rules = rules.display()
        ),
    )
    .expect("prometheus.yml");
    let web = common::free_port();
    let prometheus_log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(std::process::Stdio::null())
        .stderr(prometheus_log)
        .spawn()
        .expect("prometheus starts");
    (Killed(child), Api::new(web))
}

/// The rules loaded, every one evaluates without error, and no alert but
/// the guessing one fires for a healthy sidecar.
async fn rules_loaded_and_healthy(api: &Api) {
    let groups = api.data("rules").await;
    let mut alerting = BTreeSet::new();
    for group in groups["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            assert_eq!(rule["health"], "ok", "{rule}");
            if rule["type"] == "alerting" {
                alerting.insert(rule["name"].as_str().expect("name").to_owned());
            }
        }
    }
    assert_eq!(
        alerting,
        alerts().into_iter().map(str::to_owned).collect(),
        "every alert in rules.yaml is loaded"
    );
    let active = api
        .query(r#"ALERTS{alertstate="firing"}"#)
        .await
        .expect("ALERTS");
    let names: BTreeSet<&str> = active
        .iter()
        .filter_map(|alert| alert["metric"]["alertname"].as_str())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["KeywardGuessingDetected"]),
        "{active:?}"
    );
}

#[tokio::test]
async fn a_real_prometheus_scrapes_keyward_and_answers_every_dashboard_query() {
    let Some(prometheus) = common::tool(
        "KEYWARD_PROMETHEUS",
        "prometheus",
        "apt-get install prometheus",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, port) = spawn_serve(
        BIN,
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--failed-auth-limit",
            "3",
            "--shutdown-grace-ms",
            "0",
        ],
    );
    let _keyward = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let admin = common::admin_token(&dir.path().join("data"));
    let metrics =
        common::await_logged_address(&dir.path().join("serve.log"), "serving metrics at /metrics");

    let (_prometheus, api) = start_prometheus(&prometheus, dir.path(), &metrics);
    let prometheus_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // Rounds of traffic until every query that must return data does (and
    // the guessing alert fires), within a generous bound for a slow
    // machine; no duration is asserted.
    let queries: Vec<(String, String)> = panels()
        .into_iter()
        .flat_map(|(title, queries)| queries.into_iter().map(move |q| (title.clone(), q)))
        .collect();
    let may_be_empty: BTreeSet<&str> = MAY_BE_EMPTY.iter().map(|(title, _)| *title).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut round = 0;
    let (empty, firing) = loop {
        traffic(&url, &admin, round).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut empty = BTreeSet::new();
        for (title, query) in &queries {
            match api.query(&substitute(query)).await {
                Ok(result) if result.is_empty() => {
                    empty.insert(title.as_str());
                }
                Ok(_) => {}
                // Not up yet: try again next round.
                Err(error) if error == "Prometheus did not answer" => {
                    empty.insert(title.as_str());
                }
                Err(error) => panic!("{title:?}: {query}: not valid PromQL here: {error}"),
            }
        }
        let firing = api
            .query(r#"ALERTS{alertname="KeywardGuessingDetected", alertstate="firing"}"#)
            .await
            .unwrap_or_default();
        if (empty.is_subset(&may_be_empty) && !firing.is_empty())
            || std::time::Instant::now() > deadline
        {
            break (empty, firing);
        }
    };
    let unexpected: Vec<&&str> = empty.difference(&may_be_empty).collect();
    assert!(
        unexpected.is_empty(),
        "panels without data after {round} rounds of traffic: {unexpected:?}\n{}",
        prometheus_log()
    );
    eprintln!("empty under this traffic (allowed): {empty:?}");
    assert_eq!(
        firing[0]["metric"]["pod"], "keyward-0",
        "KeywardGuessingDetected fires for the guessed key: {firing:?}"
    );

    rules_loaded_and_healthy(&api).await;

    // The dashboard's variables: Grafana's label_values(metric, label),
    // through the same API Grafana calls.
    let namespaces = api
        .data("label/namespace/values?match[]=keyward_decisions_total")
        .await;
    assert_eq!(namespaces, serde_json::json!(["monitoring-test"]));
    let pods = api
        .data("label/pod/values?match[]=keyward_decisions_total%7Bnamespace%3D~%22monitoring-test%22%7D")
        .await;
    assert_eq!(pods, serde_json::json!(["keyward-0"]));
}
