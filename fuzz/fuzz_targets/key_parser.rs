//! Any bytes as an API key: the parser never panics, and what it accepts has
//! the exact SendGrid shape and round-trips its id.
#![no_main]

use keyward_core::domain::key::{KEY_LEN, KeyId, PresentedKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = PresentedKey::parse(text) {
        assert_eq!(text.len(), KEY_LEN);
        assert!(text.starts_with("SG."));
        assert_eq!(text[3..25].parse::<KeyId>(), Ok(key.id));
        assert_eq!(key.id.to_string(), &text[3..25]);
        let _ = key.secret_hash();
    }
});
