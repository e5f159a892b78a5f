//! Micro-benchmarks of the decision path with the bundled SendGrid catalog
//! and routes, against the unavoidable work alone: one hash-map lookup plus
//! one SHA-256 of a 43-byte secret. Prints allocations per decision (counted
//! by an instrumented global allocator) and each ratio to its baseline.
//!
//! `cargo bench --bench decision` (add `-- --quick` for a fast pass).
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    reason = "measurement arithmetic and long report functions"
)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use keyward::authorizer::Authorizer;
use keyward::domain::catalog::Catalog;
use keyward::domain::decision::Decision;
use keyward::domain::key::{self, NewKey, PresentedKey, SecretHash};
use keyward::domain::path::canonical_path;
use keyward::domain::rate::RateLimit;
use keyward::domain::record::{Access, PreviousSecret};
use keyward::domain::route::{Method, RouteTable};
use keyward::domain::scope_set::ScopeSet;
use keyward::store::index::{Entry, Index, SecretUse, Usage};
use rustc_hash::FxBuildHasher;
use sha2::{Digest, Sha256};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];
/// Keys looked up in rotation, so large indexes pay their cache misses.
const SAMPLE: usize = 4096;

struct Fixture {
    authorizer: Authorizer,
    keys: Vec<String>,
    baseline: HashMap<[u8; 16], [u8; 32], FxBuildHasher>,
}

fn fixture(catalog: &Catalog, routes: &Arc<RouteTable>, size: usize) -> Fixture {
    let index = Index::with_capacity(size);
    let mut baseline = HashMap::with_capacity_and_hasher(size, FxBuildHasher);
    let scopes = catalog
        .resolve(&["mail.send", "alerts.read"])
        .expect("scopes");
    let account: Arc<str> = Arc::from("acme");
    let mut keys = Vec::with_capacity(SAMPLE);
    for i in 0..size {
        let new_key = key::generate().expect("rng");
        index.insert(
            new_key.id,
            entry(&new_key, scopes, Arc::clone(&account), |_| {}),
        );
        baseline.insert(*new_key.id.as_bytes(), *new_key.hash.as_bytes());
        if i % (size / SAMPLE).max(1) == 0 && keys.len() < SAMPLE {
            keys.push(new_key.text);
        }
    }
    Fixture {
        authorizer: Authorizer::new(Arc::new(index), Arc::clone(routes)),
        keys,
        baseline,
    }
}

/// The index entry of `key` as the store would load it, with `lifecycle`
/// settings applied.
fn entry(
    key: &NewKey,
    scopes: ScopeSet,
    account: Arc<str>,
    lifecycle: impl FnOnce(&mut Access),
) -> Entry {
    let mut access = Access::new(key.hash);
    lifecycle(&mut access);
    Entry::new(&access, scopes, account)
}

/// The unavoidable work: find the key by id, hash the secret, compare.
fn baseline(
    map: &HashMap<[u8; 16], [u8; 32], FxBuildHasher>,
    id: &[u8; 16],
    secret: &[u8],
) -> bool {
    let digest: [u8; 32] = Sha256::digest(secret).into();
    map.get(id).is_some_and(|stored| *stored == digest)
}

fn bench(c: &mut Criterion) {
    // As `keyward serve` runs: decisions read the cached clock.
    keyward::clock::start_clock();
    let catalog = Catalog::sendgrid();
    let routes = Arc::new(RouteTable::sendgrid(&catalog));
    let path = "/v3/mail/send";
    let method = Some(Method::Post);

    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    // Under `cargo test` (no --bench) each benchmark runs once: skip the
    // slow-to-build large indexes there.
    let benching = std::env::args().any(|a| a == "--bench");
    for (size, label) in SIZES
        .into_iter()
        .filter(|(size, _)| benching || *size <= 1_000)
    {
        let fixture = fixture(&catalog, &routes, size);
        // Parsed ids for the baseline, outside the timed loop (the full
        // decision parses the key itself).
        let parsed: Vec<([u8; 16], Vec<u8>)> = fixture
            .keys
            .iter()
            .map(|k| {
                (
                    *PresentedKey::parse(k).expect("valid").id.as_bytes(),
                    k.as_bytes()[26..].to_vec(),
                )
            })
            .collect();
        report_allocations(label, &fixture, method, path);
        let mut i = 0;
        group.bench_function(BenchmarkId::new("full", label), |b| {
            b.iter(|| {
                i = (i + 1) % fixture.keys.len();
                let decision = fixture.authorizer.decide(
                    black_box(&fixture.keys[i]),
                    None,
                    method,
                    black_box(path),
                );
                assert!(decision.allowed());
                decision
            });
        });
        let mut j = 0;
        group.bench_function(BenchmarkId::new("baseline", label), |b| {
            b.iter(|| {
                j = (j + 1) % parsed.len();
                let (id, secret) = &parsed[j];
                black_box(baseline(
                    &fixture.baseline,
                    black_box(id),
                    black_box(secret),
                ))
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("components");
    group.throughput(Throughput::Elements(1));
    let templated = "/v3/templates/t-123/versions/v-456/activate";
    group.bench_function("route_lookup", |b| {
        b.iter(|| routes.required(Method::Post, black_box(templated)));
    });
    // A parameter slot with sibling literals (pools, warmup, assigned, ...):
    // the value is compared with each, ignoring case, to refuse spellings a
    // case-insensitive upstream would route elsewhere.
    group.bench_function("route_lookup_sibling_checked", |b| {
        b.iter(|| routes.required(Method::Get, black_box("/v3/ips/192.0.2.7")));
    });
    group.bench_function("path_check", |b| {
        b.iter(|| canonical_path(black_box(templated)));
    });
    let have = catalog.full_access();
    let need = *routes.required(Method::Post, templated).expect("route");
    group.bench_function("scope_covers", |b| {
        b.iter(|| black_box(&have).covers(black_box(&need)));
    });
    let sample = key::generate().expect("rng").text;
    let index = Index::with_capacity(1);
    let one = key::generate().expect("rng");
    index.insert(one.id, entry(&one, have, Arc::from("acme"), |_| {}));
    let one_presented = PresentedKey::parse(&one.text).expect("valid");
    group.bench_function("index_verify_incl_sha256", |b| {
        b.iter(|| {
            index
                .pin()
                .verify(
                    black_box(&one_presented),
                    keyward::clock::recent_now_nanos(),
                    SecretUse::Decision,
                )
                .is_ok()
        });
    });

    // Lifecycle: the same decision for a key with none of the lifecycle
    // settings and with each of them; each difference is that check's cost.
    let lifecycle = Index::with_capacity(8);
    let account: Arc<str> = Arc::from("acme");
    let in_an_hour = keyward::clock::now_nanos() + 3_600_000_000_000;
    let ranges = vec!["10.0.0.0/8".to_owned(), "2001:db8::/32".to_owned()];
    // The most a key may have (a million a second, a burst of a million),
    // so admissions are measured; the budget is refilled between rounds.
    let limit = RateLimit::new(1_000_000, Duration::from_secs(1), 1_000_000).expect("valid");
    let with_limit = |access: &mut Access| access.limits.rate_limit = Some(limit);
    let plain = key::generate().expect("rng");
    lifecycle.insert(plain.id, entry(&plain, have, Arc::clone(&account), |_| {}));
    let expiring = key::generate().expect("rng");
    lifecycle.insert(
        expiring.id,
        entry(&expiring, have, Arc::clone(&account), |r| {
            r.limits.expires_at = Some(in_an_hour);
        }),
    );
    let listed = key::generate().expect("rng");
    lifecycle.insert(
        listed.id,
        entry(&listed, have, Arc::clone(&account), |r| {
            r.limits.allowed_cidrs.clone_from(&ranges);
        }),
    );
    let limited = key::generate().expect("rng");
    let limited_entry = entry(&limited, have, Arc::clone(&account), with_limit);
    let limited_usage = Arc::clone(&limited_entry.usage);
    lifecycle.insert(limited.id, limited_entry);
    // Everything at once, rotated with the overlap open: the current secret
    // is presented (the previous one is compared only when it does not match).
    let everything = key::generate().expect("rng");
    let previous = key::generate().expect("rng");
    let everything_entry = entry(&everything, have, Arc::clone(&account), |r| {
        r.limits.expires_at = Some(in_an_hour);
        r.limits.allowed_cidrs.clone_from(&ranges);
        r.previous = Some(PreviousSecret {
            hash: previous.hash,
            valid_until: in_an_hour,
        });
        with_limit(r);
    });
    let everything_usage = Arc::clone(&everything_entry.usage);
    lifecycle.insert(everything.id, everything_entry);

    let client: Option<std::net::IpAddr> = "10.1.2.3".parse().ok();
    let authorizer = Authorizer::new(Arc::new(lifecycle), Arc::clone(&routes));
    let decide = |text: &str, client: Option<std::net::IpAddr>| {
        let decision = authorizer.decide(
            black_box(text),
            black_box(client),
            Some(Method::Post),
            "/v3/mail/send",
        );
        debug_assert!(decision.allowed());
        decision
    };
    group.bench_function("decide_key_without_expiry", |b| {
        b.iter(|| decide(&plain.text, None));
    });
    group.bench_function("decide_key_with_allowlist", |b| {
        b.iter(|| decide(&listed.text, client));
    });
    group.bench_function("decide_key_with_expiry", |b| {
        b.iter(|| decide(&expiring.text, None));
    });
    for (name, text, usage) in [
        ("decide_key_with_rate_limit", &limited.text, &limited_usage),
        (
            "decide_key_with_all_lifecycle",
            &everything.text,
            &everything_usage,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| admitted_rounds(iters, usage, || decide(text, client)));
        });
    }

    group.bench_function("key_parse", |b| {
        b.iter(|| PresentedKey::parse(black_box(&sample)));
    });
    group.bench_function("sha256_43_bytes", |b| {
        b.iter(|| SecretHash::of(black_box(&sample.as_bytes()[26..])));
    });
    group.finish();
}

/// Times `iters` decisions of a rate-limited key, refilling its budget
/// (untimed) before the burst could run out, so every decision is an
/// admission.
fn admitted_rounds(iters: u64, usage: &Usage, mut decide: impl FnMut() -> Decision) -> Duration {
    const ROUND: u64 = 500_000;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let round = left.min(ROUND);
        usage.tat.store(0, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        for _ in 0..round {
            black_box(decide());
        }
        total += started.elapsed();
        left -= round;
    }
    total
}

fn report_allocations(label: &str, fixture: &Fixture, method: Option<Method>, path: &str) {
    const ROUNDS: usize = 10_000;
    let region = Region::new(GLOBAL);
    for i in 0..ROUNDS {
        black_box(fixture.authorizer.decide(
            &fixture.keys[i % fixture.keys.len()],
            None,
            method,
            path,
        ));
    }
    let stats = region.change();
    println!(
        "allocations per decision ({label} keys): {} ({} allocations, {} bytes over {ROUNDS} decisions)",
        stats.allocations as f64 / ROUNDS as f64,
        stats.allocations,
        stats.bytes_allocated
    );
}

/// Reads criterion's estimates and prints each decision's ratio to its baseline.
fn print_ratios() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || std::path::PathBuf::from("target"),
            std::path::PathBuf::from,
        )
        .join("criterion/decision");
    let mean = |name: &str, label: &str| -> Option<f64> {
        let text =
            std::fs::read_to_string(dir.join(name).join(label).join("new/estimates.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["mean"]["point_estimate"].as_f64()
    };
    println!("\nkeys   full decision   baseline (lookup+SHA-256)   ratio");
    for (_, label) in SIZES {
        if let (Some(full), Some(base)) = (mean("full", label), mean("baseline", label)) {
            println!(
                "{label:<6} {full:>10.1} ns   {base:>14.1} ns           {:.2}x",
                full / base
            );
        }
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
    print_ratios();
}
