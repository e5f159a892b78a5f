//! The route table: (HTTP method, path template) → required scopes, as masks
//! precomputed at load so a decision is one trie walk and one AND.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxBuildHasher;

use super::catalog::Catalog;
use super::load_error::{LoadError, directives};
use super::scope_set::ScopeSet;

/// The SendGrid v3 route table shipped inside the binary.
pub const SENDGRID_ROUTES: &str = include_str!("../../../../data/sendgrid.routes");

/// The HTTP methods a route can name. HEAD is answered by GET routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET (and HEAD).
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

const METHODS: usize = 5;

/// A method string that is not an HTTP token at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("method must be an HTTP method token such as GET or POST")]
pub struct BadMethod;

impl Method {
    /// Parses a request method. `Ok(None)` is a valid token no route can
    /// name (OPTIONS, lower-case `get`, ...): such a request matches no route.
    pub fn parse(token: &str) -> Result<Option<Self>, BadMethod> {
        if token.is_empty()
            || token.len() > 32
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(BadMethod);
        }
        Ok(match token {
            "GET" | "HEAD" => Some(Self::Get),
            "POST" => Some(Self::Post),
            "PUT" => Some(Self::Put),
            "PATCH" => Some(Self::Patch),
            "DELETE" => Some(Self::Delete),
            _ => None,
        })
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// Why a request gets no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMiss {
    /// No route has this method and path: denied (fail closed).
    Unknown,
    /// A `{param}` value spells, ignoring ASCII case, a literal segment that
    /// a sibling route has at that position (`/v3/ips/POOLS` against
    /// `/v3/ips/{ip_address}` and `/v3/ips/pools`): an upstream matching
    /// case-insensitively would serve the sibling, so it is denied.
    Ambiguous,
}

/// Per `{param}` of one template, in path order: the literal segments its
/// sibling templates have at that position.
type Siblings = Box<[Box<[Box<str>]>]>;

/// Every route, compiled. Lookups allocate nothing.
#[derive(Debug)]
pub struct RouteTable {
    /// Templates without parameters, matched by one hash lookup; matchit
    /// would prefer them over any parameterised template anyway.
    exact: HashMap<Box<str>, usize, FxBuildHasher>,
    router: matchit::Router<usize>,
    masks: Vec<[Option<ScopeSet>; METHODS]>,
    /// Per template, per `{param}` in path order: the literal segments other
    /// templates have at that position under the same prefix; `None` when
    /// there are none at any parameter.
    siblings: Vec<Option<Siblings>>,
    len: usize,
}

impl RouteTable {
    /// The bundled SendGrid v3 routes against the bundled catalog.
    #[must_use]
    pub fn sendgrid(catalog: &Catalog) -> Self {
        Self::parse("<bundled sendgrid.routes>", SENDGRID_ROUTES, catalog)
            .expect("the bundled routes are checked by unit tests")
    }

    /// Parses a route file (format in `data/sendgrid.routes`), resolving every
    /// scope against `catalog`.
    pub fn parse(file: &str, text: &str, catalog: &Catalog) -> Result<Self, LoadError> {
        let err = |line, problem: String| LoadError::new(file, line, problem);
        // template → (line first seen, per-method masks)
        let mut templates: BTreeMap<&str, (usize, [Option<ScopeSet>; METHODS])> = BTreeMap::new();
        let mut len = 0;
        for (line, text) in directives(text) {
            let mut words = text.split_whitespace();
            let (Some(method_word), Some(template)) = (words.next(), words.next()) else {
                return Err(err(line, "a route needs `METHOD /path scope...`".into()));
            };
            let method = match Method::parse(method_word) {
                Ok(Some(method)) if method_word != "HEAD" => method,
                _ => {
                    return Err(err(
                        line,
                        format!("unknown method {method_word:?} (GET, POST, PUT, PATCH, DELETE)"),
                    ));
                }
            };
            check_template(template).map_err(|problem| err(line, problem))?;
            let scopes: Vec<&str> = words.collect();
            let mask = match scopes.as_slice() {
                [] => return Err(err(line, "a route needs at least one scope, or '*'".into())),
                ["*"] => ScopeSet::EMPTY,
                names => {
                    let mut mask = ScopeSet::EMPTY;
                    for name in names {
                        let id = catalog
                            .lookup(name)
                            .ok_or_else(|| err(line, format!("unknown scope {name:?}")))?;
                        if mask.contains(id) {
                            return Err(err(line, format!("duplicate scope {name:?}")));
                        }
                        mask.insert(id);
                    }
                    mask
                }
            };
            let entry = templates.entry(template).or_insert((line, [None; METHODS]));
            let slot = &mut entry.1[method.slot()];
            if slot.is_some() {
                return Err(err(
                    line,
                    format!("duplicate route {method_word} {template}"),
                ));
            }
            *slot = Some(mask);
            len += 1;
        }

        let mut router = matchit::Router::new();
        let mut exact = HashMap::with_hasher(FxBuildHasher);
        let mut masks = Vec::with_capacity(templates.len());
        let mut siblings = Vec::with_capacity(templates.len());
        let all: Vec<&str> = templates.keys().copied().collect();
        for (template, (line, methods)) in templates {
            router
                .insert(template, masks.len())
                .map_err(|e| err(line, format!("bad template {template:?}: {e}")))?;
            if !template.contains('{') {
                exact.insert(Box::from(template), masks.len());
            }
            masks.push(methods);
            let literals = sibling_literals(template, &all);
            siblings.push(literals.iter().any(|l| !l.is_empty()).then_some(literals));
        }
        Ok(Self {
            exact,
            router,
            masks,
            siblings,
            len,
        })
    }

    /// The scopes a request needs. `path` must already have passed
    /// [`super::path::canonical_path`].
    #[inline]
    pub fn required(&self, method: Method, path: &str) -> Result<&ScopeSet, RouteMiss> {
        let slot = if let Some(slot) = self.exact.get(path) {
            *slot
        } else {
            let matched = self.router.at(path).map_err(|_| RouteMiss::Unknown)?;
            let slot = *matched.value;
            // Most templates have no sibling literal at any parameter.
            if let Some(siblings) = &self.siblings[slot] {
                for ((_, value), literals) in matched.params.iter().zip(siblings.iter()) {
                    if literals.iter().any(|l| l.eq_ignore_ascii_case(value)) {
                        return Err(RouteMiss::Ambiguous);
                    }
                }
            }
            slot
        };
        self.masks[slot][method.slot()]
            .as_ref()
            .ok_or(RouteMiss::Unknown)
    }

    /// How many (method, template) routes the table holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// For each `{param}` of `template`, in path order, the literal segments
/// that other templates have at its position under the same prefix (any
/// parameter matches any parameter: matchit requires them to share names).
fn sibling_literals(template: &str, all: &[&str]) -> Siblings {
    let is_param = |segment: &str| segment.starts_with('{');
    let segments: Vec<&str> = template.split('/').collect();
    let same = |a: &str, b: &str| a == b || (is_param(a) && is_param(b));
    segments
        .iter()
        .enumerate()
        .filter(|(_, segment)| is_param(segment))
        .map(|(at, _)| {
            let mut literals: Vec<Box<str>> = all
                .iter()
                .map(|other| other.split('/').collect::<Vec<_>>())
                .filter(|other| {
                    other.len() > at
                        && !is_param(other[at])
                        && other[..at]
                            .iter()
                            .zip(&segments[..at])
                            .all(|(a, b)| same(a, b))
                })
                .map(|other| Box::from(other[at]))
                .collect();
            literals.sort();
            literals.dedup();
            literals.into_boxed_slice()
        })
        .collect()
}

/// Templates obey the same rules as request paths, and every `{param}` is a
/// whole segment, so matching never depends on how a segment is split.
fn check_template(template: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("bad template {template:?}: {why}"));
    let Some(rest) = template.strip_prefix('/') else {
        return bad("must start with '/'");
    };
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return bad("empty segment");
        }
        if segment == "." || segment == ".." {
            return bad("dot segment");
        }
        if let Some(name) = segment.strip_prefix('{') {
            let Some(name) = name.strip_suffix('}') else {
                return bad("a parameter must be a whole segment like {name}");
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return bad("parameter names use letters, digits and '_'");
            }
        } else if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()+,=:@".contains(&b))
        {
            return bad("literal segments use unreserved URL characters only");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (Catalog, RouteTable) {
        let catalog = Catalog::sendgrid();
        let routes = RouteTable::sendgrid(&catalog);
        (catalog, routes)
    }

    fn names(catalog: &Catalog, set: Option<&ScopeSet>) -> Option<Vec<String>> {
        set.map(|s| catalog.names(s))
    }

    #[test]
    fn bundled_routes_cover_every_catalog_scope() {
        let (catalog, routes) = table();
        assert!(routes.len() > 200);
        let text = SENDGRID_ROUTES;
        for id in catalog.all().iter() {
            let name = catalog.name(id);
            assert!(
                text.split_whitespace().any(|w| w == name),
                "no bundled route needs {name}"
            );
        }
    }

    #[test]
    fn sendgrid_examples_match() {
        let (catalog, routes) = table();
        let cases = [
            (Method::Post, "/v3/mail/send", Some(vec!["mail.send"])),
            (
                Method::Get,
                "/v3/suppression/bounces",
                Some(vec!["suppression.bounces.read"]),
            ),
            (
                Method::Post,
                "/v3/templates/t1/versions/v9/activate",
                Some(vec!["templates.versions.activate.create"]),
            ),
            (Method::Get, "/v3/scopes", Some(vec![])),
            (Method::Get, "/v3/ips/pools", Some(vec!["ips.pools.read"])),
            (Method::Get, "/v3/ips/10.0.0.1", Some(vec!["ips.read"])),
            (Method::Put, "/v3/scopes", None),
            (Method::Get, "/v3/nothing", None),
            (Method::Get, "/v3/mail/send/extra", None),
        ];
        for (method, path, want) in cases {
            let want = want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(
                names(&catalog, routes.required(method, path).ok()),
                want,
                "{method:?} {path}"
            );
        }
    }

    #[test]
    fn methods_parse_as_tokens() {
        assert_eq!(Method::parse("GET"), Ok(Some(Method::Get)));
        assert_eq!(Method::parse("HEAD"), Ok(Some(Method::Get)));
        assert_eq!(Method::parse("OPTIONS"), Ok(None));
        assert_eq!(Method::parse("get"), Ok(None));
        assert_eq!(Method::parse(""), Err(BadMethod));
        assert_eq!(Method::parse("GE T"), Err(BadMethod));
        assert_eq!(Method::parse("G\nET"), Err(BadMethod));
    }

    #[test]
    fn bad_route_files_name_line_and_problem() {
        let catalog = Catalog::sendgrid();
        let cases = [
            ("GET /v3/x\n", 1, "at least one scope"),
            ("GET /v3/x mail.fly\n", 1, "unknown scope"),
            ("GET /v3/x mail.send mail.send\n", 1, "duplicate scope"),
            (
                "\nGET /v3/x mail.send\nGET /v3/x alerts.read\n",
                3,
                "duplicate route",
            ),
            ("FETCH /v3/x mail.send\n", 1, "unknown method"),
            ("GET v3/x mail.send\n", 1, "must start with '/'"),
            ("GET /v3//x mail.send\n", 1, "empty segment"),
            ("GET /v3/../x mail.send\n", 1, "dot segment"),
            ("GET /v3/x{id} mail.send\n", 1, "literal segments"),
            ("GET /v3/{a b} mail.send\n", 1, "bad template"),
            ("GET\n", 1, "needs"),
        ];
        for (text, line, problem) in cases {
            let err = RouteTable::parse("t.routes", text, &catalog).expect_err(text);
            assert_eq!(err.line, line, "{text}: {err}");
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
    }
}
