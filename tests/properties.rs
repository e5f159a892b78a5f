//! Property tests for the key parser, path checker, route matcher and bitset
//! algebra.

use keyward::domain::catalog::Catalog;
use keyward::domain::key::{self, KeyId, PresentedKey};
use keyward::domain::path::canonical_path;
use keyward::domain::route::{Method, RouteTable};
use keyward::domain::scope_set::{MAX_SCOPES, ScopeId, ScopeSet};
use proptest::prelude::*;

fn scope_set() -> impl Strategy<Value = ScopeSet> {
    proptest::collection::vec(0..MAX_SCOPES, 0..64)
        .prop_map(|ids| ids.into_iter().filter_map(ScopeId::new).collect())
}

const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

proptest! {
    #[test]
    fn key_parser_never_panics(input in ".{0,100}") {
        let _ = PresentedKey::parse(&input);
    }

    #[test]
    fn generated_keys_parse_and_one_bad_char_breaks_them(position in 0usize..69, bad in "[^A-Za-z0-9_-]") {
        let generated = key::generate().expect("rng");
        let parsed = PresentedKey::parse(&generated.text).expect("parses");
        prop_assert_eq!(parsed.id, generated.id);
        prop_assert!(parsed.secret_hash().matches(&generated.hash));
        let mut chars: Vec<char> = generated.text.chars().collect();
        let original = chars[position];
        let replacement = bad.chars().next().unwrap_or('!');
        prop_assume!(replacement != original);
        chars[position] = replacement;
        let mutated: String = chars.into_iter().collect();
        prop_assert!(PresentedKey::parse(&mutated).is_err(), "{}", mutated);
    }

    #[test]
    fn key_ids_round_trip(bytes in proptest::array::uniform16(any::<u8>())) {
        let id = KeyId::from_bytes(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.len(), 22);
        prop_assert!(text.chars().all(|c| ALPHABET.contains(c)));
        prop_assert_eq!(text.parse::<KeyId>(), Ok(id));
    }

    #[test]
    fn accepted_paths_have_one_reading(input in "[/a-zA-Z0-9.%_?#\\\\-]{0,40}") {
        if let Ok(path) = canonical_path(&input) {
            prop_assert!(path.starts_with('/'));
            prop_assert!(input.starts_with(path), "a prefix of the input");
            prop_assert!(!path.contains('?') && !path.contains('#') && !path.contains('\\'));
            let lower = path.to_ascii_lowercase();
            for bad in ["//", "%2f", "%5c", "%25", "%00"] {
                prop_assert!(!lower.contains(bad), "{} in {}", bad, path);
            }
            if path != "/" {
                for segment in path[1..].split('/') {
                    let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
                    prop_assert!(decoded != "." && decoded != ".." && !segment.is_empty(), "{}", path);
                }
            }
        }
    }

    #[test]
    fn templates_match_any_single_segment_parameter(template in "[a-zA-Z0-9_~-]{1,24}", version in "[a-zA-Z0-9_~-]{1,24}") {
        let catalog = Catalog::sendgrid();
        let routes = RouteTable::sendgrid(&catalog);
        let path = format!("/v3/templates/{template}/versions/{version}/activate");
        let need = routes.required(Method::Post, &path).expect("matches");
        prop_assert_eq!(catalog.names(need), vec!["templates.versions.activate.create".to_owned()]);
        let deeper = format!("{path}/more");
        prop_assert!(routes.required(Method::Post, &deeper).is_none());
    }

    #[test]
    fn route_lookup_never_panics(path in "/[ -~]{0,80}") {
        let catalog = Catalog::sendgrid();
        let routes = RouteTable::sendgrid(&catalog);
        if let Ok(path) = canonical_path(&path) {
            let _ = routes.required(Method::Get, path);
        }
    }

    #[test]
    fn bitset_algebra(a in scope_set(), b in scope_set(), c in scope_set()) {
        prop_assert_eq!(a.covers(&b), a.intersection(&b) == b);
        prop_assert_eq!(a.missing(&b).union(&a.intersection(&b)), b);
        prop_assert!(a.missing(&b).intersection(&a).is_empty());
        prop_assert_eq!(a.union(&b), b.union(&a));
        prop_assert_eq!(a.intersection(&b.union(&c)), a.intersection(&b).union(&a.intersection(&c)));
        prop_assert!(a.union(&b).covers(&a));
        prop_assert_eq!(a.union(&b).len() + a.intersection(&b).len(), a.len() + b.len());
        prop_assert!(a.covers(&ScopeSet::EMPTY));
    }
}
