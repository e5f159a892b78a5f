//! Writes racing decisions: once a write is acknowledged, no decision that
//! starts later may see the old state.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, bearer};
use keyward::pb::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_decision_after_an_acknowledged_write_uses_the_old_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (narrowed_id, narrowed) = server
        .create_key("acme", &["mail.send", "alerts.read"])
        .await;
    let (revoked_id, revoked) = server.create_key("acme", &["mail.send"]).await;
    let stop = Arc::new(AtomicBool::new(false));

    let mut deciders = Vec::new();
    for task in 0..8 {
        let mut client = server.authorizer().await;
        let stop = Arc::clone(&stop);
        let key = if task % 2 == 0 {
            narrowed.clone()
        } else {
            revoked.clone()
        };
        deciders.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let reply = client
                    .authorize(pb::AuthorizeRequest {
                        key: key.clone(),
                        method: "POST".into(),
                        path: "/v3/mail/send".into(),
                        client_ip: String::new(),
                    })
                    .await
                    .expect("authorize")
                    .into_inner();
                seen.push((sent, reply.allowed));
            }
            (task % 2 == 0, seen)
        }));
    }

    let mut manager = server.manager().await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    manager
        .update_key(bearer(
            &server.admin,
            pb::UpdateKeyRequest {
                key_id: narrowed_id,
                name: "narrowed".into(),
                scopes: vec!["alerts.read".into()],
                access: HashMap::new(),
            },
        ))
        .await
        .expect("narrow");
    let narrowed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    manager
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest { key_id: revoked_id },
        ))
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut before, mut after) = (0, 0);
    for decider in deciders {
        let (is_narrowed, seen) = decider.await.expect("decider");
        let acked = if is_narrowed { narrowed_at } else { revoked_at };
        for (sent, allowed) in seen {
            if sent > acked {
                assert!(
                    !allowed,
                    "a decision started after the acknowledgement used the old state"
                );
                after += 1;
            } else if allowed {
                before += 1;
            }
        }
    }
    assert!(
        before > 100,
        "the keys were in use before the writes ({before})"
    );
    assert!(
        after > 100,
        "and decisions kept racing after them ({after})"
    );
}
