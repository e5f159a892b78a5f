//! The decision feed (`keyward.v1.DecisionFeed`) on a real server: the
//! snapshot is the key set, every change follows in order, nothing carries
//! a secret, only the admin may read it, and its bounds hold.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::{TestServer, assert_status, bearer};
use keyward::domain::key::KeyId;
use keyward::pb::v1 as pb;
use keyward::pb::v1::decision_feed_client::DecisionFeedClient;
use keyward::pb::v1::feed_event::Event;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

fn id_bytes(key_id: &str) -> Vec<u8> {
    KeyId::from_str(key_id).expect("key id").as_bytes().to_vec()
}

async fn watch(server: &TestServer) -> Streaming<pb::FeedEvent> {
    DecisionFeedClient::new(server.channel().await)
        .watch(bearer(&server.admin, pb::WatchRequest {}))
        .await
        .expect("admin watches")
        .into_inner()
}

/// The next event, heartbeats included.
async fn next_any(stream: &mut Streaming<pb::FeedEvent>) -> Event {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event in time")
        .expect("stream healthy")
        .expect("stream open")
        .event
        .expect("event set")
}

/// The next event that is not a heartbeat.
async fn next(stream: &mut Streaming<pb::FeedEvent>) -> Event {
    loop {
        let event = next_any(stream).await;
        if !matches!(event, Event::Heartbeat(_)) {
            return event;
        }
    }
}

#[tokio::test]
async fn snapshot_then_changes_in_order_and_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut secrets = Vec::new();
    let mut ids = Vec::new();
    for i in 0..300 {
        let (id, secret) = server
            .create_key(&format!("acct-{}", i % 3), &["mail.send"])
            .await;
        ids.push(id_bytes(&id));
        secrets.push(secret);
    }
    let mut stream = watch(&server).await;
    let Event::Tables(tables) = next(&mut stream).await else {
        panic!("tables first");
    };
    assert!(tables.catalog.contains("mail.send"), "the catalog's text");
    assert!(tables.routes.contains("/v3/mail/send"), "the routes' text");
    let mut seen = Vec::new();
    let synced = loop {
        match next(&mut stream).await {
            Event::Put(key) => {
                assert_eq!(key.secret_hash.len(), 32);
                let encoded = prost::Message::encode_to_vec(&key);
                for secret in &secrets {
                    let tail = secret.rsplit('.').next().expect("secret part");
                    assert!(
                        !encoded.windows(tail.len()).any(|w| w == tail.as_bytes()),
                        "a secret in the feed"
                    );
                }
                seen.push(key.id);
            }
            Event::Synced(synced) => break synced,
            other => panic!("unexpected before synced: {other:?}"),
        }
    };
    assert_eq!(synced.keys, 300);
    seen.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(seen, expected, "the snapshot is exactly the key set");

    // Changes follow, in order: a revocation, then a scope change.
    let mut manager = server.manager().await;
    let (revoked, kept) = (ids[0].clone(), ids[1].clone());
    let revoked_text = KeyId::from_bytes(revoked.clone().try_into().expect("16")).to_string();
    let kept_text = KeyId::from_bytes(kept.clone().try_into().expect("16")).to_string();
    manager
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest {
                key_id: revoked_text,
            },
        ))
        .await
        .expect("revoke");
    manager
        .update_key(bearer(
            &server.admin,
            pb::UpdateKeyRequest {
                key_id: kept_text,
                name: "narrowed".into(),
                scopes: vec!["alerts.read".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("update");
    assert_eq!(next(&mut stream).await, Event::Delete(revoked));
    let Event::Put(updated) = next(&mut stream).await else {
        panic!("the update");
    };
    assert_eq!(updated.id, kept);
}

#[tokio::test]
async fn only_the_admin_reads_the_feed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server
        .create_key("acct", &["api_keys.read", "api_keys.create"])
        .await;
    let mut client = DecisionFeedClient::new(server.channel().await);
    let anonymous = client.watch(pb::WatchRequest {}).await;
    assert_status(
        anonymous.map(|_| ()),
        Code::Unauthenticated,
        "authorization",
    );
    let key = client.watch(bearer(&secret, pb::WatchRequest {})).await;
    assert_status(key.map(|_| ()), Code::PermissionDenied, "admin tokens only");
    let report = client
        .report_use(bearer(&secret, pb::ReportUseRequest::default()))
        .await;
    assert_status(
        report.map(|_| ()),
        Code::PermissionDenied,
        "admin tokens only",
    );
    let trade = client
        .trade_leases(bearer(&secret, pb::TradeLeasesRequest::default()))
        .await;
    assert_status(
        trade.map(|_| ()),
        Code::PermissionDenied,
        "admin tokens only",
    );
}

/// `TradeLeases` checks every trade before it trades any, and says when
/// this sidecar's limits are not global (a standalone sidecar without a
/// usage store): the caller's limits are then its own.
#[tokio::test]
async fn lease_trades_are_checked_and_answered_local_without_a_usage_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, _) = server.create_key("acct", &["mail.send"]).await;
    let id = id_bytes(&id);
    let mut client = DecisionFeedClient::new(server.channel().await);
    let trade = |id: Vec<u8>| pb::LeaseTrade {
        id,
        give: 0,
        owed: 0,
        want: 10,
    };
    let short = client
        .trade_leases(bearer(
            &server.admin,
            pb::TradeLeasesRequest {
                trades: vec![trade(id.clone()), trade(vec![1; 15])],
            },
        ))
        .await;
    assert_status(short.map(|_| ()), Code::InvalidArgument, "trades.id");
    let twice = client
        .trade_leases(bearer(
            &server.admin,
            pb::TradeLeasesRequest {
                trades: vec![trade(id.clone()), trade(id.clone())],
            },
        ))
        .await;
    assert_status(twice.map(|_| ()), Code::InvalidArgument, "once a call");
    let many = client
        .trade_leases(bearer(
            &server.admin,
            pb::TradeLeasesRequest {
                trades: vec![trade(id.clone()); 10_001],
            },
        ))
        .await;
    assert_status(many.map(|_| ()), Code::InvalidArgument, "trades");
    let answer = client
        .trade_leases(bearer(
            &server.admin,
            pb::TradeLeasesRequest {
                trades: vec![trade(id.clone())],
            },
        ))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(
        answer,
        pb::TradeLeasesResponse {
            global: false,
            grants: Vec::new()
        },
        "no usage store: limits are each decider's own"
    );
}

#[tokio::test]
async fn the_feed_reader_token_reads_the_feed_and_manages_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = keyward::config::ServeConfig::with_data_dir(dir.path().join("data"));
    let token_file = dir.path().join("feed/token");
    config.feed_token_file = Some(token_file.clone());
    let server = TestServer::start_with(config).await;
    let reader = std::fs::read_to_string(&token_file).expect("the token file was created");
    let reader = reader.trim();
    assert!(reader.starts_with("kwfeed_"), "{reader}");
    let mut stream = DecisionFeedClient::new(server.channel().await)
        .watch(bearer(reader, pb::WatchRequest {}))
        .await
        .expect("the reader watches")
        .into_inner();
    assert!(matches!(next(&mut stream).await, Event::Tables(_)));
    let manage = server
        .manager()
        .await
        .list_keys(bearer(
            reader,
            pb::ListKeysRequest {
                account_id: "acct".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_status(manage.map(|_| ()), Code::Unauthenticated, "authorization");
}

#[tokio::test]
async fn reported_uses_become_last_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, _) = server.create_key("acct", &["mail.send"]).await;
    let mut client = DecisionFeedClient::new(server.channel().await);
    let at = keyward::clock::now_nanos();
    let applied = client
        .report_use(bearer(
            &server.admin,
            pb::ReportUseRequest {
                uses: vec![
                    pb::KeyUse {
                        id: id_bytes(&id),
                        at_unix_nanos: at,
                    },
                    pb::KeyUse {
                        id: vec![7; 16],
                        at_unix_nanos: at,
                    },
                ],
                ..Default::default()
            },
        ))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(applied.applied, 1, "a key that does not exist is dropped");
    let key = server
        .manager()
        .await
        .get_key(bearer(&server.admin, pb::GetKeyRequest { key_id: id }))
        .await
        .expect("get")
        .into_inner();
    let used = key.last_used_at.expect("last used set").seconds;
    let at_seconds = at / 1_000_000_000;
    assert!(
        (at_seconds - 60..=at_seconds).contains(&used),
        "{used} vs {at_seconds}"
    );

    for (uses, field) in [
        (
            vec![pb::KeyUse {
                id: vec![1; 3],
                at_unix_nanos: at,
            }],
            "uses.id",
        ),
        (
            vec![pb::KeyUse {
                id: vec![1; 16],
                at_unix_nanos: at + 3_600_000_000_000,
            }],
            "uses.at_unix_nanos",
        ),
    ] {
        let refused = client
            .report_use(bearer(
                &server.admin,
                pb::ReportUseRequest {
                    uses,
                    ..Default::default()
                },
            ))
            .await;
        assert_status(refused.map(|_| ()), Code::InvalidArgument, field);
    }
}

/// Issue 29 (7): streams at once stay bounded, but idle ones cannot lock
/// a live reader out: a new reader at the cap displaces the oldest (told
/// ABORTED), so 16 idle streams never stop a module from syncing.
#[tokio::test]
async fn streams_at_once_are_bounded_and_idle_ones_never_lock_a_reader_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    server.create_key("acct", &["mail.send"]).await;
    // Idle readers: each took its first event, then reads nothing more.
    let mut idle = Vec::new();
    for _ in 0..keyward::grpc::feed::MAX_WATCHERS {
        let mut stream = watch(&server).await;
        assert!(matches!(next(&mut stream).await, Event::Tables(_)));
        idle.push(stream);
    }
    let mut live = watch(&server).await;
    assert!(matches!(next(&mut live).await, Event::Tables(_)));
    let mut synced = false;
    while !synced {
        synced = matches!(next(&mut live).await, Event::Synced(_));
    }
    // The oldest idle reader was told why it ended; the others stay.
    let oldest = loop {
        match tokio::time::timeout(WAIT, idle[0].message())
            .await
            .expect("the oldest stream ends in time")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(oldest.code(), Code::Aborted, "{oldest:?}");
    assert!(oldest.message().contains("displaced"), "{oldest:?}");
    // Every open stream is a reader in the metrics (the displaced one is
    // not, once its task has ended).
    let readers = format!(
        "\nkeyward_feed_readers {}\n",
        keyward::grpc::feed::MAX_WATCHERS
    );
    tokio::time::timeout(WAIT, async {
        while !server.scrape().await.contains(&readers) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("sixteen readers in the metrics");
    // Another sixteen newcomers, all kept open: every one gets its stream
    // (each displacing an older one, never by a place left free).
    let mut newcomers = Vec::new();
    for _ in 0..keyward::grpc::feed::MAX_WATCHERS {
        let mut stream = watch(&server).await;
        assert!(matches!(next(&mut stream).await, Event::Tables(_)));
        newcomers.push(stream);
    }
}

/// Issue 29 (7): uses are noted only for keys the reporter could have
/// decided on: not a disabled key, not one expired by the time reported,
/// so a report can never hide a dead key from `--unused-for`.
#[tokio::test]
async fn reported_uses_of_keys_that_could_not_decide_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (disabled, _) = server.create_key("acct", &["mail.send"]).await;
    let (expiring, _) = server.create_key("acct", &["mail.send"]).await;
    let mut manager = server.manager().await;
    manager
        .disable_key(bearer(
            &server.admin,
            pb::DisableKeyRequest {
                key_id: disabled.clone(),
            },
        ))
        .await
        .expect("disable");
    // Far enough ahead that setting it on a loaded machine never finds it
    // past; the use is then reported after it, within the allowed skew.
    let expires = keyward::clock::now_nanos() + 20_000_000_000;
    manager
        .set_key_expiry(bearer(
            &server.admin,
            pb::SetKeyExpiryRequest {
                key_id: expiring.clone(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: expires / 1_000_000_000,
                    nanos: 0,
                }),
            },
        ))
        .await
        .expect("expiry");
    let mut client = DecisionFeedClient::new(server.channel().await);
    // A use "reported" after the expiry (within the allowed clock skew).
    let after_expiry = expires + 5_000_000_000;
    let applied = client
        .report_use(bearer(
            &server.admin,
            pb::ReportUseRequest {
                uses: vec![
                    pb::KeyUse {
                        id: id_bytes(&disabled),
                        at_unix_nanos: keyward::clock::now_nanos(),
                    },
                    pb::KeyUse {
                        id: id_bytes(&expiring),
                        at_unix_nanos: after_expiry,
                    },
                ],
                ..Default::default()
            },
        ))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(applied.applied, 0, "neither could have been used");
    for id in [disabled, expiring] {
        let key = manager
            .get_key(bearer(&server.admin, pb::GetKeyRequest { key_id: id }))
            .await
            .expect("get")
            .into_inner();
        assert!(key.last_used_at.is_none(), "never used: {key:?}");
    }
}

/// Issue 29 (7): with key management on its own listener (loopback in the
/// shipped manifests), the decision feed is served there, never on the
/// decision port that faces the pod network.
#[tokio::test]
async fn the_feed_is_served_with_key_management() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = keyward::config::ServeConfig::with_data_dir(dir.path().join("data"));
    config.manage_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    let on_decisions = DecisionFeedClient::new(server.channel().await)
        .watch(bearer(&server.admin, pb::WatchRequest {}))
        .await;
    assert_status(on_decisions.map(|_| ()), Code::Unimplemented, "");
    let manage = server.manage_addr.expect("manage listener");
    let channel = common::connect(&format!("http://{manage}")).await;
    let mut stream = DecisionFeedClient::new(channel)
        .watch(bearer(&server.admin, pb::WatchRequest {}))
        .await
        .expect("the feed, with key management")
        .into_inner();
    assert!(matches!(next(&mut stream).await, Event::Tables(_)));
}

/// A snapshot read while keys are created and revoked, stitched to the
/// changes after it, is the key set: nothing lost, nothing resurrected.
#[tokio::test]
async fn a_snapshot_during_writes_converges_to_the_key_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = std::sync::Arc::new(TestServer::start(&dir).await);
    // One connection for all the writes (a connection a call would make
    // the test about connection churn, not the feed).
    let create = |manager: &mut KeyManagerClient<Channel>, account: &str, scope: &str| {
        let request = bearer(
            &server.admin,
            pb::CreateKeyRequest {
                name: "busy".into(),
                account_id: account.to_owned(),
                scopes: vec![scope.to_owned()],
                ..Default::default()
            },
        );
        let mut manager = manager.clone();
        async move {
            tokio::time::timeout(WAIT, manager.create_key(request))
                .await
                .expect("a creation answered in time")
                .expect("create")
                .into_inner()
                .key
                .expect("key")
                .key_id
        }
    };
    let mut manager = tokio::time::timeout(WAIT, server.manager())
        .await
        .expect("connected in time");
    let mut ids = Vec::new();
    for i in 0..400 {
        let account = format!("busy-{}", i % 8);
        ids.push((create(&mut manager, &account, "mail.send").await, account));
    }
    let writer = {
        let admin = server.admin.clone();
        let doomed: Vec<(String, String)> = ids.iter().step_by(2).cloned().collect();
        let creates: Vec<_> = doomed
            .iter()
            .map(|(_, account)| create(&mut manager, account, "alerts.read"))
            .collect();
        let mut manager = manager.clone();
        tokio::spawn(async move {
            for ((id, _), created) in doomed.into_iter().zip(creates) {
                tokio::time::timeout(
                    WAIT,
                    manager.delete_key(bearer(&admin, pb::DeleteKeyRequest { key_id: id })),
                )
                .await
                .expect("a revocation answered in time")
                .expect("revoke");
                created.await;
            }
        })
    };
    let mut stream = watch(&server).await;
    let mut copy = std::collections::HashSet::new();
    let mut synced = false;
    let mut writes_done = false;
    let mut marker = None;
    let (mut puts, mut deletes, mut heartbeats) = (0, 0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck: synced {synced}, writes done {writes_done}, writer finished {}, marker {marker:?}, {puts} puts, {deletes} deletes, {heartbeats} heartbeats",
            writer.is_finished()
        );
        let event = next_any(&mut stream).await;
        match &event {
            Event::Put(_) => puts += 1,
            Event::Delete(_) => deletes += 1,
            Event::Heartbeat(_) => heartbeats += 1,
            _ => {}
        }
        match event {
            Event::Tables(_) | Event::Heartbeat(_) => {}
            Event::Put(key) => {
                if marker.as_ref() == Some(&key.id) {
                    break;
                }
                copy.insert(key.id);
            }
            Event::Delete(id) => {
                copy.remove(&id);
            }
            Event::Synced(_) => synced = true,
        }
        if !writes_done && writer.is_finished() {
            writes_done = true;
            let (id, _) = tokio::time::timeout(WAIT, server.create_key("marker", &["mail.send"]))
                .await
                .expect("the marker created in time");
            marker = Some(id_bytes(&id));
        }
    }
    assert!(synced);
    let mut live = std::collections::HashSet::new();
    for account in 0..8 {
        for key in server.list(&format!("busy-{account}")).await {
            live.insert(id_bytes(&key.key_id));
        }
    }
    assert_eq!(live.len(), 400);
    assert_eq!(copy, live, "the copy is the key set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_counts_join_the_keys_usage_and_bad_ones_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, _) = server.create_key("acct", &["mail.send"]).await;
    let mut client = DecisionFeedClient::new(server.channel().await);
    let now = keyward::clock::now_nanos() / 1_000_000_000;
    let minute = now - now.rem_euclid(60);
    let counts = |id: Vec<u8>, minute: i64, label: &str| pb::KeyCounts {
        id,
        minute_unix: minute,
        outcomes: [("allowed".to_owned(), 5), (label.to_owned(), 2)].into(),
    };
    let report = |counts: Vec<pb::KeyCounts>| {
        bearer(
            &server.admin,
            pb::ReportUseRequest {
                counts,
                ..Default::default()
            },
        )
    };
    // Malformed: an unknown outcome, a minute out of range, a short id.
    for bad in [
        counts(id_bytes(&id), minute, "made_up"),
        counts(id_bytes(&id), minute - 7200, "rate_limited"),
        counts(id_bytes(&id), minute + 7, "rate_limited"),
        counts(vec![1; 15], minute, "rate_limited"),
    ] {
        let refused = client.report_use(report(vec![bad])).await;
        assert_status(refused.map(|_| ()), Code::InvalidArgument, "counts.");
    }
    // A live key's counts are kept; a key that is not live is dropped.
    let applied = client
        .report_use(report(vec![
            counts(id_bytes(&id), minute, "rate_limited"),
            counts(vec![7; 16], minute, "rate_limited"),
        ]))
        .await
        .expect("reported")
        .into_inner();
    assert_eq!(applied.counts_applied, 1);
    let usage = common::await_usage(server.manager().await, &server.admin, &id, |usage| {
        usage.allowed == 5
    })
    .await;
    assert_eq!(usage.denied_by_reason.get("rate_limited"), Some(&2));
}

/// A key with credits reaches a module only in a form a module built
/// before credits refuses (no hash it can match): an older module would
/// not know to spend credits, and would allow the key without limit.
#[tokio::test]
async fn a_key_with_credits_reaches_modules_in_a_form_older_ones_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, _) = metered_key(&server).await;
    let mut stream = watch(&server).await;
    let key = loop {
        match next(&mut stream).await {
            Event::Put(key) if key.id == id_bytes(&id) => break key,
            Event::Synced(_) => panic!("the key was not in the snapshot"),
            _ => {}
        }
    };
    assert!(key.credits);
    assert_eq!(
        key.secret_hash,
        vec![0; 32],
        "nothing an old module can match"
    );
    assert!(key.previous_hash.is_empty());
    assert_eq!(key.credits_secret_hash.len(), 32);
    assert_ne!(key.credits_secret_hash, vec![0; 32]);
}

/// `LendCredits` lends from the sidecar's own lease and takes back at most
/// what it lent: a caller giving back credits it never borrowed adds none,
/// so the key still allows exactly what it was given.
#[tokio::test]
async fn lent_credits_come_back_and_never_more_than_were_lent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, secret) = metered_key(&server).await;
    let id = id_bytes(&id);
    let mut client = DecisionFeedClient::new(server.channel().await);
    let loan = |want: u64, give: u64, period: i64| pb::CreditLoan {
        id: id.clone(),
        want,
        give,
        period,
    };
    let twice = client
        .lend_credits(bearer(
            &server.admin,
            pb::LendCreditsRequest {
                loans: vec![loan(1, 0, 0), loan(1, 0, 0)],
            },
        ))
        .await;
    assert_status(twice.map(|_| ()), Code::InvalidArgument, "once a call");
    let lent = client
        .lend_credits(bearer(
            &server.admin,
            pb::LendCreditsRequest {
                loans: vec![loan(3, 0, 0)],
            },
        ))
        .await
        .expect("lent")
        .into_inner()
        .grants
        .remove(0);
    assert!((1..=3).contains(&lent.granted), "{lent:?}");
    // A thousand back, of which only what was lent counts.
    client
        .lend_credits(bearer(
            &server.admin,
            pb::LendCreditsRequest {
                loans: vec![loan(0, 1000, lent.period)],
            },
        ))
        .await
        .expect("given back");
    let mut authorizer =
        keyward::pb::v1::authorizer_client::AuthorizerClient::new(server.channel().await);
    let mut allowed = 0;
    for _ in 0..30 {
        let reply = authorizer
            .authorize(pb::AuthorizeRequest {
                key: secret.clone(),
                method: "POST".into(),
                path: "/v3/mail/send".into(),
                client_ip: String::new(),
            })
            .await
            .expect("replies")
            .into_inner();
        allowed += u32::from(reply.allowed);
    }
    assert_eq!(allowed, 10, "the credits given, not one more");
}

/// A `mail.send` key with 10 credits on `server`: (id, secret).
async fn metered_key(server: &TestServer) -> (String, String) {
    server
        .create(pb::CreateKeyRequest {
            name: "metered".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            credits: Some(pb::Credits {
                remaining: 10,
                refill: None,
                next_refill_at: None,
            }),
            ..Default::default()
        })
        .await
}
