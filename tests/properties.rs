//! Property tests for the key parser, path checker, route matcher and bitset
//! algebra.

use keyward::domain::catalog::Catalog;
use keyward::domain::key::{self, KeyId, PresentedKey};
use keyward::domain::path::canonical_path;
use keyward::domain::route::{Method, RouteTable};
use keyward::domain::scope_set::{MAX_SCOPES, ScopeId, ScopeSet};
use std::fmt::Write as _;

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
        prop_assert!(routes.required(Method::Post, &deeper).is_err());
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

/// The bundled routes as (method, template).
fn bundled_routes() -> Vec<(Method, String)> {
    keyward::domain::route::SENDGRID_ROUTES
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let method = Method::parse(words.next()?).ok()??;
            Some((method, words.next()?.to_owned()))
        })
        .collect()
}

/// For each `{param}` of `template`: the literal segments other bundled
/// routes have at that position under the same prefix (an independent
/// reading of the table, not keyward's).
fn sibling_literals(template: &str) -> Vec<Vec<String>> {
    let segments: Vec<&str> = template.split('/').collect();
    let routes = bundled_routes();
    (0..segments.len())
        .filter(|&at| segments[at].starts_with('{'))
        .map(|at| {
            let mut literals: Vec<String> = routes
                .iter()
                .map(|(_, other)| other.split('/').collect::<Vec<_>>())
                .filter(|other| {
                    other.len() > at
                        && !other[at].starts_with('{')
                        && (0..at).all(|i| {
                            other[i] == segments[i]
                                || (other[i].starts_with('{') && segments[i].starts_with('{'))
                        })
                })
                .map(|other| other[at].to_owned())
                .collect();
            literals.sort();
            literals.dedup();
            literals
        })
        .collect()
}

/// A parameter value: plain, a sibling's literal in any case, an email, an
/// IPv6 address.
fn param_value(siblings: Vec<String>) -> BoxedStrategy<String> {
    let mut options = vec![
        "[a-zA-Z0-9_-]{1,12}".boxed(),
        Just("alice@example.com".to_owned()).boxed(),
        Just("2001:db8::1".to_owned()).boxed(),
    ];
    if !siblings.is_empty() {
        let spelled = (0..siblings.len(), any::<u32>()).prop_map(move |(i, case)| {
            siblings[i]
                .chars()
                .enumerate()
                .map(|(n, c)| {
                    if case >> (n % 32) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect::<String>()
        });
        options.push(spelled.clone().boxed());
        options.push(spelled.boxed());
    }
    proptest::strategy::Union::new(options).boxed()
}

/// A bundled route and values for its parameters.
fn route_and_values() -> impl Strategy<Value = (usize, Vec<String>)> {
    (0..bundled_routes().len()).prop_flat_map(|route| {
        let values: Vec<BoxedStrategy<String>> = sibling_literals(&bundled_routes()[route].1)
            .into_iter()
            .map(param_value)
            .collect();
        (Just(route), values)
    })
}

static SENDGRID: std::sync::LazyLock<(Catalog, RouteTable)> = std::sync::LazyLock::new(|| {
    let catalog = Catalog::sendgrid();
    let routes = RouteTable::sendgrid(&catalog);
    (catalog, routes)
});

/// keyward's decision on a path as received: the mask of the route it
/// matched, or `None` for any deny (ambiguous, unknown).
fn keyward_decides(routes: &RouteTable, method: Method, raw: &str) -> Option<ScopeSet> {
    let path = canonical_path(raw).ok()?;
    routes.required(method, path).ok().copied()
}

/// What a decoding upstream acts on (WSGI, servlet containers): `;`
/// parameters stripped, percent-escapes decoded, segment by segment.
fn decoded(raw: &str) -> Option<String> {
    let mut out = String::new();
    for segment in raw.split('/').skip(1) {
        let segment = segment.split(';').next().unwrap_or_default();
        let mut bytes = Vec::new();
        let mut rest = segment.as_bytes();
        while let Some((&first, tail)) = rest.split_first() {
            if first == b'%' && tail.len() >= 2 {
                bytes.push(u8::from_str_radix(std::str::from_utf8(&tail[..2]).ok()?, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(first);
                rest = tail;
            }
        }
        out.push('/');
        out.push_str(&String::from_utf8(bytes).ok()?);
    }
    Some(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// The outside review's path confusion, as a property over the whole
    /// bundled table: however a route's path is spelled (escapes of any
    /// character, `;` parameters, parameter values that spell a sibling's
    /// literal in any case), keyward either denies it or decides it exactly
    /// as a decoding, case-insensitive upstream would route it.
    #[test]
    fn every_spelling_is_denied_or_decided_as_the_upstream_reads_it(
        (route, values) in route_and_values(),
        spelling in proptest::collection::vec(0u8..16, 120),
        parameters in proptest::collection::vec(0u8..8, 12),
    ) {
        let (catalog, routes) = &*SENDGRID;
        let (method, template) = &bundled_routes()[route];
        let mut params = values.iter();
        let segments: Vec<(bool, String)> = template
            .split('/')
            .skip(1)
            .map(|s| if s.starts_with('{') {
                (true, params.next().cloned().unwrap_or_else(|| "x".into()))
            } else {
                (false, s.to_owned())
            })
            .collect();

        // Spell it: escape some characters (upper or lower hex), add some
        // `;` parameters.
        let mut choices = spelling.iter().cycle();
        let mut spelled = String::new();
        for (n, (_, segment)) in segments.iter().enumerate() {
            spelled.push('/');
            for c in segment.chars() {
                match choices.next().copied().unwrap_or_default() {
                    0 => { let _ = write!(spelled, "%{:02X}", c as u32); }
                    1 => { let _ = write!(spelled, "%{:02x}", c as u32); }
                    _ => spelled.push(c),
                }
            }
            if parameters.get(n).copied() == Some(0) {
                spelled.push_str(";x=1");
            }
        }

        if let Some(mask) = keyward_decides(routes, *method, &spelled) {
            let upstream = decoded(&spelled).expect("decodes");
            prop_assert_eq!(
                routes.required(*method, &upstream).ok().copied(), Some(mask),
                "{} allowed as {:?} but a decoding upstream serves {}", spelled, catalog.names(&mask), upstream
            );
            // A case-insensitive upstream folds the case of parameter values.
            let folded: String = segments
                .iter()
                .zip(upstream.split('/').skip(1))
                .map(|((param, _), s)| if *param { format!("/{}", s.to_ascii_lowercase()) } else { format!("/{s}") })
                .collect();
            prop_assert_eq!(
                routes.required(*method, &folded).ok().copied(), Some(mask),
                "{} allowed as {:?} but a case-insensitive upstream serves {}", spelled, catalog.names(&mask), folded
            );
        }
    }
}
