//! Any bytes as a request path: the checker never panics, and what it
//! accepts has exactly one reading (no dot segments, empty segments,
//! encoded separators or double encoding), with the query removed.
#![no_main]

use keyward_core::domain::path::canonical_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = canonical_path(raw) {
        assert!(raw.starts_with(path));
        assert!(path.starts_with('/'));
        assert!(!path.contains('?') && !path.contains('#') && !path.contains('\\'));
        let lower = path.to_ascii_lowercase();
        for bad in ["//", "%2f", "%5c", "%25", "%00"] {
            assert!(!lower.contains(bad), "{bad} in {path}");
        }
        if path != "/" {
            assert!(!path.ends_with('/'));
            for segment in path[1..].split('/') {
                let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
                assert!(decoded != "." && decoded != "..", "{path}");
            }
        }
    }
});
