//! The management flows over a real key store (standalone sled in a
//! temporary directory), called as the front doors call them.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::authorizer::Authorizer;
use crate::domain::key::SecretHash;
use crate::domain::route::RouteTable;
use crate::guessing::FailureGuard;
use crate::keys::Settings;
use crate::metrics::Metrics;

const ADMIN_TOKEN: &str = "an operator's own admin token";

fn manager(dir: &std::path::Path) -> Manager {
    let catalog = Arc::new(Catalog::sendgrid());
    let settings = Settings {
        max_per_account: 3,
        write_timeout: Duration::from_secs(5),
        last_used_every: Duration::from_secs(60),
        replication: None,
        on_demand: None,
    };
    let (keys, index) = Keys::open(
        dir.join("db"),
        Arc::clone(&catalog),
        &settings,
        Arc::new(Metrics::new()),
    )
    .expect("store opens");
    let authorizer = Authorizer::new(index, Arc::new(RouteTable::sendgrid(&catalog)));
    let guard = FailureGuard::new(
        10,
        Duration::from_secs(60),
        100,
        prometheus_client::metrics::counter::Counter::default(),
    );
    let access = Authenticator::new(
        authorizer,
        SecretHash::of(ADMIN_TOKEN.as_bytes()),
        Arc::new(guard),
    );
    Manager::new(Arc::new(keys), access)
}

fn scopes(names: &[&str]) -> GrantInput {
    GrantInput {
        scopes: Some(names.iter().map(|&n| n.to_owned()).collect()),
        access: Vec::new(),
    }
}

fn new_key(name: &str, grant: GrantInput) -> NewKey {
    NewKey {
        name: name.into(),
        grant,
        ..NewKey::default()
    }
}

/// A key's own principal, as authentication would find it.
fn as_key(manager: &Manager, record: &KeyRecord) -> Principal {
    let (held, _) = manager.catalog().resolve_stored(&record.scopes);
    Principal::Key {
        id: record.id,
        account: Arc::from(record.account.as_str()),
        scopes: held,
    }
}

fn field(error: &KeyError) -> Option<&'static str> {
    match error {
        KeyError::Invalid { field, .. } | KeyError::Beyond { field, .. } => Some(field),
        _ => None,
    }
}

#[tokio::test]
async fn create_checks_in_order_then_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manager = manager(dir.path());
    let admin = Principal::Admin;
    // The account is refused before a body nobody could read.
    let unread = Err(KeyError::Invalid {
        field: "body",
        problem: "malformed JSON".into(),
    });
    let error = manager
        .create(&admin, Ok(""), unread)
        .await
        .expect_err("refused");
    assert_eq!(field(&error), Some("account_id"));
    // The admin token pasted into a field is refused, never stored.
    for (account, name) in [(ADMIN_TOKEN, "ci"), ("acme", ADMIN_TOKEN)] {
        let error = manager
            .create(
                &admin,
                Ok(account),
                Ok(new_key(name, GrantInput::default())),
            )
            .await
            .expect_err("refused");
        assert!(error.to_string().contains(CREDENTIAL_REFUSED), "{error}");
    }
    let (record, secret) = manager
        .create(
            &admin,
            Ok("acme"),
            Ok(new_key("ci", scopes(&["mail.send"]))),
        )
        .await
        .expect("created");
    assert_eq!(record.scopes, vec!["mail.send".to_owned()]);
    assert_eq!(secret.len(), 69);
    let full = manager
        .create(
            &admin,
            Ok("acme"),
            Ok(new_key("all", GrantInput::default())),
        )
        .await
        .expect("created")
        .0;
    assert!(full.scopes.len() > 1, "no scopes given: Full Access");
}

#[tokio::test]
async fn a_key_acts_only_within_its_scopes_and_account() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manager = manager(dir.path());
    let admin = Principal::Admin;
    let grant = scopes(&["api_keys.create", "api_keys.read", "mail.send"]);
    let (manager_key, _) = manager
        .create(&admin, Ok("acme"), Ok(new_key("manager", grant)))
        .await
        .expect("created");
    let caller = as_key(&manager, &manager_key);
    let error = manager
        .create(
            &caller,
            Ok("globex"),
            Ok(new_key("x", GrantInput::default())),
        )
        .await
        .expect_err("another account");
    assert!(matches!(error, KeyError::Beyond { .. }), "{error}");
    let error = manager
        .create(&caller, Ok(""), Ok(new_key("x", scopes(&["alerts.read"]))))
        .await
        .expect_err("beyond its scopes");
    assert_eq!(field(&error), Some("scopes"));
    let (child, _) = manager
        .create(
            &caller,
            Ok(""),
            Ok(new_key("child", scopes(&["mail.send"]))),
        )
        .await
        .expect("within its scopes");
    assert_eq!(child.account, "acme");
    // It may not delete (no api_keys.delete), and is refused before the id
    // is even read.
    let error = manager
        .delete(&caller, ("not an id", Ok("")))
        .await
        .expect_err("refused");
    assert!(matches!(error, KeyError::PermissionDenied(_)), "{error}");
    // The admin acting for another account finds no key of this one.
    let id = child.id.to_string();
    let error = manager
        .get(&admin, &id, Ok("globex"))
        .await
        .expect_err("confined");
    assert!(matches!(error, KeyError::NotFound(_)), "{error}");
    assert_eq!(
        manager
            .get(&admin, &id, Ok("acme"))
            .await
            .expect("found")
            .id,
        child.id
    );
    let error = manager
        .backup(&caller, Origin::new("test", ""))
        .await
        .expect_err("admin only");
    assert!(matches!(error, BackupError::Refused(_)));
}

#[tokio::test]
async fn changes_to_one_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manager = manager(dir.path());
    let admin = Principal::Admin;
    let (record, secret) = manager
        .create(
            &admin,
            Ok("acme"),
            Ok(new_key("ci", scopes(&["mail.send"]))),
        )
        .await
        .expect("created");
    let id = record.id.to_string();
    let key = || (id.as_str(), Ok(""));
    let replacement = Replacement {
        name: "ci".into(),
        grant: GrantInput::default(),
        grant_required: "required: say which",
    };
    let error = manager
        .update(&admin, key(), Ok(replacement))
        .await
        .expect_err("scopes required");
    assert_eq!(error.to_string(), "scopes: required: say which");
    let renamed = manager
        .rename(&admin, key(), Ok("deploy".into()))
        .await
        .expect("renamed");
    assert_eq!(renamed.name, "deploy");
    let disabled = manager
        .set_disabled(&admin, key(), true)
        .await
        .expect("disabled");
    assert!(disabled.access.disabled);
    let past = Some(UnixTime {
        seconds: 1,
        nanos: 0,
    });
    let error = manager
        .set_expiry(&admin, key(), Ok(past))
        .await
        .expect_err("in the past");
    assert_eq!(field(&error), Some("expires_at"));
    let limit = RateLimitInput {
        requests: 10,
        period: Some(Some(Duration::from_secs(1))),
        burst: 0,
    };
    let limited = manager
        .set_rate_limit(&admin, key(), Ok(Some(limit)))
        .await
        .expect("limited");
    assert!(limited.access.limits.rate_limit.is_some());
    let (_, rotated) = manager
        .rotate(&admin, key(), Ok(Some(Some(Duration::from_secs(60)))))
        .await
        .expect("rotated");
    assert_ne!(rotated, secret);
    manager.delete(&admin, key()).await.expect("deleted");
    let error = manager.get(&admin, &id, Ok("")).await.expect_err("gone");
    assert!(matches!(error, KeyError::NotFound(_)));
}
