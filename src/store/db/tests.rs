//! Tests of the sled store: page tokens and the replica's revision notes.

use super::*;

#[test]
fn cursor_tokens_round_trip_and_reject_garbage() {
    let key = PageKey::random().expect("random");
    let cursor = Cursor {
        created_nanos: 1_700_000_000_000_000_000,
        id: KeyId::from_bytes([3; 16]),
    };
    let token = cursor.token("acme", &key);
    assert_eq!(token.len(), Cursor::TOKEN_CHARS);
    assert_eq!(Cursor::parse(&token, "acme", &key), Some(cursor));
    assert_eq!(
        Cursor::parse(&token, "globex", &key),
        None,
        "another account's"
    );
    let other = PageKey::random().expect("random");
    assert_eq!(
        Cursor::parse(&token, "acme", &other),
        None,
        "another process's"
    );
    let mut forged = token.into_bytes();
    forged[3] = if forged[3] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    let chars = Cursor::TOKEN_CHARS;
    for bad in ["", "x", &"!".repeat(chars), &"A".repeat(chars), &forged] {
        assert_eq!(Cursor::parse(bad, "acme", &key), None, "{bad:?}");
    }
}

#[test]
fn replica_notes_survive_a_reopen_until_the_floor_passes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = |byte| KeyId::from_bytes([byte; 16]);
    {
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.replica().expect("read"), None, "not a replica yet");
        store.set_replica(10, 5).expect("mark");
        store.note_revision(&id(1), 12).expect("note");
        store.note_revision(&id(2), 15).expect("note");
        store.flush().expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let mut replica = store.replica().expect("read").expect("a replica");
    replica.ahead.sort_unstable();
    assert_eq!(
        replica,
        Replica {
            revision: 10,
            synced_at: 5,
            ahead: vec![(id(1), 12), (id(2), 15)],
        }
    );
    store.set_replica(12, 6).expect("advance");
    let replica = store.replica().expect("read").expect("a replica");
    assert_eq!((replica.revision, replica.ahead), (12, vec![(id(2), 15)]));
}
