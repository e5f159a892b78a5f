//! The scope catalog: scope names ↔ bits, categories, access levels, aliases.

use std::collections::{BTreeMap, HashMap};

use super::load_error::{LoadError, directives};
use super::scope_set::{MAX_SCOPES, ScopeId, ScopeSet};

/// The SendGrid v3 catalog shipped inside the binary.
pub const SENDGRID_CATALOG: &str = include_str!("../../../../data/sendgrid.catalog");

/// An access level a category can be granted at, as SendGrid's UI offers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessLevel {
    /// No scope of the category.
    None,
    /// The category's `.read` scopes (GET endpoints).
    Read,
    /// The category's other scopes (POST, PUT, PATCH, DELETE endpoints).
    Write,
    /// Every scope of the category.
    Full,
}

impl AccessLevel {
    /// The level's name as written in catalog files.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Read => "read",
            Self::Write => "write",
            Self::Full => "full",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        [Self::None, Self::Read, Self::Write, Self::Full]
            .into_iter()
            .find(|level| level.as_str() == word)
    }
}

/// The kind of a key, derived from its scopes the way SendGrid presents it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Every non-exclusive scope of the catalog at the time of the grant.
    FullAccess,
    /// Any other subset of non-exclusive scopes.
    RestrictedAccess,
    /// Scopes of an exclusive (billing) category only.
    Billing,
}

/// A group of scopes granted together through an access level.
#[derive(Debug, Clone)]
pub struct Category {
    /// Stable id used in requests, e.g. `mail`.
    pub id: String,
    /// Display name, e.g. `Mail Send`.
    pub title: String,
    /// What its scopes reach, one sentence (empty if the file gives none).
    pub description: String,
    /// Levels the category offers, in order.
    pub levels: Vec<AccessLevel>,
    /// Member scopes, in the order the file lists them.
    pub scopes: Vec<ScopeId>,
    /// Whether its scopes may never combine with any scope outside it (billing).
    pub exclusive: bool,
    read: ScopeSet,
    all: ScopeSet,
}

impl Category {
    /// The scopes granted at `level`.
    #[must_use]
    pub fn grant(&self, level: AccessLevel) -> ScopeSet {
        match level {
            AccessLevel::None => ScopeSet::EMPTY,
            AccessLevel::Read => self.read,
            AccessLevel::Write => self.all.difference(&self.read),
            AccessLevel::Full => self.all,
        }
    }

    /// Every scope of the category as a set.
    #[must_use]
    pub fn scope_set(&self) -> ScopeSet {
        self.all
    }
}

/// Why a list of scope names could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// A name the catalog does not define: shown quoted if it is shaped like
    /// a scope name, never otherwise (a secret pasted into the wrong field
    /// must not be echoed back or logged).
    #[error("unknown scope {0}")]
    Unknown(String),
    /// The same scope twice (possibly once under a legacy alias).
    #[error("duplicate scope {0}")]
    Duplicate(String),
}

/// A requested scope name as an error may show it: quoted when it is shaped
/// like one (lowercase letters, digits, `.`, `_`, `-`; at most 64), else a
/// placeholder.
fn shown(name: &str) -> String {
    let scope_shaped = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if scope_shaped {
        format!("{name:?}")
    } else {
        "(an entry that is not a scope name, not shown)".to_owned()
    }
}

/// Every scope keyward knows, their categories and legacy aliases.
#[derive(Debug)]
pub struct Catalog {
    names: Vec<String>,
    by_name: HashMap<String, ScopeId>,
    aliases: BTreeMap<String, String>,
    categories: Vec<Category>,
    exclusive: ScopeSet,
    all: ScopeSet,
}

impl Catalog {
    /// The bundled SendGrid v3 catalog.
    #[must_use]
    pub fn sendgrid() -> Self {
        Self::parse("<bundled sendgrid.catalog>", SENDGRID_CATALOG)
            .expect("the bundled catalog is checked by unit tests")
    }

    /// Parses a catalog file (format in `data/sendgrid.catalog`): each
    /// directive in turn ([`Reader`]), then the aliases against every scope
    /// the file defines, then the sets the decision needs.
    pub fn parse(file: &str, text: &str) -> Result<Self, LoadError> {
        let mut reader = Reader {
            file,
            names: Vec::new(),
            by_name: HashMap::new(),
            alias_lines: Vec::new(),
            categories: Vec::new(),
        };
        for (line, text) in directives(text) {
            reader.directive(line, text)?;
        }
        reader.finish()
    }

    /// The id of a canonical or legacy scope name.
    #[must_use]
    pub fn lookup(&self, name: &str) -> Option<ScopeId> {
        self.by_name.get(name).copied()
    }

    /// The canonical name of `id`.
    #[must_use]
    pub fn name(&self, id: ScopeId) -> &str {
        &self.names[id.index()]
    }

    /// How many canonical scopes the catalog defines.
    #[must_use]
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the catalog is empty (never true for a loaded catalog).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Categories in file order.
    #[must_use]
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// The category with this id.
    #[must_use]
    pub fn category(&self, id: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    /// Legacy name → canonical name.
    #[must_use]
    pub fn aliases(&self) -> &BTreeMap<String, String> {
        &self.aliases
    }

    /// Every scope.
    #[must_use]
    pub fn all(&self) -> ScopeSet {
        self.all
    }

    /// What a Full Access key gets: every scope outside exclusive categories.
    #[must_use]
    pub fn full_access(&self) -> ScopeSet {
        self.all.difference(&self.exclusive)
    }

    /// Resolves names (canonical or legacy) to a set, refusing unknown and
    /// repeated scopes.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<ScopeSet, ScopeError> {
        let mut set = ScopeSet::EMPTY;
        for name in names {
            let name = name.as_ref();
            let id = self
                .lookup(name)
                .ok_or_else(|| ScopeError::Unknown(self.unknown(name)))?;
            if set.contains(id) {
                return Err(ScopeError::Duplicate(shown(name)));
            }
            set.insert(id);
        }
        Ok(set)
    }

    /// An unknown scope as an error shows it, with the closest scope this
    /// catalog defines when one is near (a typo): `"mail.sned" (did you mean
    /// "mail.send"?)`. Only scope-shaped names are shown or matched.
    fn unknown(&self, name: &str) -> String {
        let shown = shown(name);
        if !shown.starts_with('"') {
            return shown;
        }
        let nearest = self
            .names
            .iter()
            .map(|known| (strsim::levenshtein(name, known), known))
            .min_by_key(|(distance, _)| *distance)
            .filter(|(distance, _)| *distance <= 2.max(name.len() / 5));
        match nearest {
            Some((_, known)) => format!("{shown} (did you mean {known:?}?)"),
            None => shown,
        }
    }

    /// Resolves stored names leniently: names this catalog no longer defines
    /// grant nothing but are reported, so a catalog edit never widens a key.
    #[must_use]
    pub fn resolve_stored<'a>(&self, names: &'a [String]) -> (ScopeSet, Vec<&'a str>) {
        let mut set = ScopeSet::EMPTY;
        let mut unknown = Vec::new();
        for name in names {
            match self.lookup(name) {
                Some(id) => set.insert(id),
                None => unknown.push(name.as_str()),
            }
        }
        (set, unknown)
    }

    /// Canonical names of a set, sorted.
    #[must_use]
    pub fn names(&self, set: &ScopeSet) -> Vec<String> {
        let mut names: Vec<String> = set.iter().map(|id| self.name(id).to_owned()).collect();
        names.sort_unstable();
        names
    }

    /// The exclusive category `set` illegally mixes with other scopes, if any.
    #[must_use]
    pub fn exclusivity_violation(&self, set: &ScopeSet) -> Option<&Category> {
        self.categories.iter().filter(|c| c.exclusive).find(|c| {
            let inside = set.intersection(&c.all);
            !inside.is_empty() && inside != *set
        })
    }

    /// The kind SendGrid would show for a key holding `set`.
    #[must_use]
    pub fn kind_of(&self, set: &ScopeSet) -> KeyKind {
        let in_exclusive = self
            .categories
            .iter()
            .any(|c| c.exclusive && !set.is_empty() && c.all.covers(set));
        if in_exclusive {
            KeyKind::Billing
        } else if *set == self.full_access() {
            KeyKind::FullAccess
        } else {
            KeyKind::RestrictedAccess
        }
    }
}

/// A catalog file being read, one directive at a time: what it has
/// defined so far.
struct Reader<'a> {
    /// The file's name, for errors.
    file: &'a str,
    names: Vec<String>,
    by_name: HashMap<String, ScopeId>,
    /// `alias` lines, resolved once every scope is known.
    alias_lines: Vec<(usize, String, String)>,
    categories: Vec<Category>,
}

impl Reader<'_> {
    /// An error at `line` of the file.
    fn err(&self, line: usize, problem: String) -> LoadError {
        LoadError::new(self.file, line, problem)
    }

    /// One directive: a `[category]` header, its description, an alias, or
    /// a line of the current category.
    fn directive(&mut self, line: usize, text: &str) -> Result<(), LoadError> {
        if let Some(rest) = text.strip_prefix('[') {
            return self.header(line, rest);
        }
        if let Some(description) = text.strip_prefix("description ") {
            let category = self.categories.last_mut().ok_or_else(|| {
                LoadError::new(
                    self.file,
                    line,
                    "\"description\" appears before any [category]",
                )
            })?;
            description.trim().clone_into(&mut category.description);
            return Ok(());
        }
        let mut words = text.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first == "alias" {
            return match (words.next(), words.next(), words.next()) {
                (Some(legacy), Some(canonical), None) => {
                    self.alias_lines
                        .push((line, legacy.to_owned(), canonical.to_owned()));
                    Ok(())
                }
                _ => Err(self.err(line, "alias needs `alias <legacy> <canonical>`".into())),
            };
        }
        if self.categories.is_empty() {
            return Err(self.err(line, format!("{first:?} appears before any [category]")));
        }
        match first {
            "levels" => self.levels(line, words),
            "exclusive" => {
                self.current().exclusive = true;
                Ok(())
            }
            scope => {
                if words.next().is_some() {
                    return Err(self.err(line, "one scope per line".into()));
                }
                self.scope(line, scope)
            }
        }
    }

    /// The category the next lines belong to (there is one: checked
    /// before).
    fn current(&mut self) -> &mut Category {
        self.categories
            .last_mut()
            .expect("a category line follows a [category] header")
    }

    /// `[id] Title`: a new category, at levels none, read and full until
    /// its `levels` line says otherwise.
    fn header(&mut self, line: usize, rest: &str) -> Result<(), LoadError> {
        let (id, title) = rest
            .split_once(']')
            .ok_or_else(|| self.err(line, "category header needs `[id] Title`".into()))?;
        let id = id.trim();
        if !is_identifier(id) {
            return Err(self.err(line, format!("bad category id {id:?}")));
        }
        if self.categories.iter().any(|c| c.id == id) {
            return Err(self.err(line, format!("duplicate category {id:?}")));
        }
        self.categories.push(Category {
            id: id.to_owned(),
            title: title.trim().to_owned(),
            description: String::new(),
            levels: vec![AccessLevel::None, AccessLevel::Read, AccessLevel::Full],
            scopes: Vec::new(),
            exclusive: false,
            read: ScopeSet::EMPTY,
            all: ScopeSet::EMPTY,
        });
        Ok(())
    }

    /// `levels read full …`: the levels the current category offers.
    fn levels<'w>(
        &mut self,
        line: usize,
        words: impl Iterator<Item = &'w str>,
    ) -> Result<(), LoadError> {
        let levels = words
            .map(|w| {
                AccessLevel::parse(w)
                    .ok_or_else(|| self.err(line, format!("unknown access level {w:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if levels.is_empty() {
            return Err(self.err(line, "levels needs at least one level".into()));
        }
        self.current().levels = levels;
        Ok(())
    }

    /// A scope of the current category: numbered at its first sight in the
    /// file (a scope may belong to several categories), at most once per
    /// category; a `….read` scope is granted at the read level.
    fn scope(&mut self, line: usize, scope: &str) -> Result<(), LoadError> {
        if !is_scope_name(scope) {
            return Err(self.err(line, format!("bad scope name {scope:?}")));
        }
        let id = if let Some(id) = self.by_name.get(scope) {
            *id
        } else {
            let id = ScopeId::new(self.names.len())
                .ok_or_else(|| self.err(line, format!("more than {MAX_SCOPES} scopes")))?;
            self.names.push(scope.to_owned());
            self.by_name.insert(scope.to_owned(), id);
            id
        };
        let file = self.file;
        let category = self.current();
        if category.all.contains(id) {
            return Err(LoadError::new(
                file,
                line,
                format!("duplicate scope {scope:?} in [{}]", category.id),
            ));
        }
        category.scopes.push(id);
        category.all.insert(id);
        if scope.rsplit('.').next() == Some("read") {
            category.read.insert(id);
        }
        Ok(())
    }

    /// The catalog: at least one scope, every alias naming a scope and
    /// taking no name already in use, and the sets of every scope and of
    /// the exclusive ones.
    fn finish(mut self) -> Result<Catalog, LoadError> {
        if self.names.is_empty() {
            return Err(self.err(0, "the catalog defines no scope".into()));
        }
        let mut aliases = BTreeMap::new();
        for (line, legacy, canonical) in std::mem::take(&mut self.alias_lines) {
            if !is_scope_name(&legacy) {
                return Err(self.err(line, format!("bad alias name {legacy:?}")));
            }
            let id = *self.by_name.get(&canonical).ok_or_else(|| {
                self.err(line, format!("alias target {canonical:?} is not a scope"))
            })?;
            if self.by_name.insert(legacy.clone(), id).is_some() {
                return Err(self.err(
                    line,
                    format!("alias {legacy:?} is already a scope or alias"),
                ));
            }
            aliases.insert(legacy, canonical);
        }
        let all: ScopeSet = (0..self.names.len()).filter_map(ScopeId::new).collect();
        let exclusive = self
            .categories
            .iter()
            .filter(|c| c.exclusive)
            .fold(ScopeSet::EMPTY, |acc, c| acc.union(&c.all));
        Ok(Catalog {
            names: self.names,
            by_name: self.by_name,
            aliases,
            categories: self.categories,
            exclusive,
            all,
        })
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `resource.action`: dot-separated lowercase identifiers, at least two parts.
fn is_scope_name(s: &str) -> bool {
    s.len() <= 128 && s.split('.').count() >= 2 && s.split('.').all(is_identifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_catalog_holds_every_seed_scope() {
        let catalog = Catalog::sendgrid();
        assert_eq!(catalog.len(), 202);
        for name in [
            "mail.send",
            "alerts.read",
            "suppression.bounces.update",
            "templates.versions.activate.create",
            "user.timezone.update",
            "teammates.delete",
            "billing.create",
        ] {
            assert!(catalog.lookup(name).is_some(), "{name}");
        }
    }

    #[test]
    fn legacy_aliases_resolve_to_canonical_scopes() {
        let catalog = Catalog::sendgrid();
        assert_eq!(
            catalog.lookup("suppressions.read"),
            catalog.lookup("suppression.read")
        );
        let set = catalog.resolve(&["suppressions.read"]).expect("alias");
        assert_eq!(catalog.names(&set), vec!["suppression.read"]);
        assert_eq!(
            catalog.resolve(&["suppression.read", "suppressions.read"]),
            Err(ScopeError::Duplicate("\"suppressions.read\"".into()))
        );
    }

    #[test]
    fn an_unknown_scope_near_a_known_one_suggests_it() {
        let catalog = Catalog::sendgrid();
        assert_eq!(
            catalog.resolve(&["mail.sned"]),
            Err(ScopeError::Unknown(
                "\"mail.sned\" (did you mean \"mail.send\"?)".into()
            ))
        );
        let secretish = catalog.resolve(&["Not.A.Scope"]).expect_err("unknown");
        assert!(!secretish.to_string().contains("Not.A"), "{secretish}");
    }

    #[test]
    fn resolve_refuses_unknown_names() {
        let catalog = Catalog::sendgrid();
        assert_eq!(
            catalog.resolve(&["mail.send", "mail.fly"]),
            Err(ScopeError::Unknown("\"mail.fly\"".into()))
        );
    }

    #[test]
    fn access_levels_split_read_and_write() {
        let catalog = Catalog::sendgrid();
        let alerts = catalog.category("alerts").expect("alerts");
        assert_eq!(
            catalog.names(&alerts.grant(AccessLevel::Read)),
            vec!["alerts.read"]
        );
        assert_eq!(
            catalog.names(&alerts.grant(AccessLevel::Write)),
            vec!["alerts.create", "alerts.delete", "alerts.update"]
        );
        assert_eq!(alerts.grant(AccessLevel::Full).len(), 4);
        assert!(alerts.grant(AccessLevel::None).is_empty());
        let campaigns = catalog.category("marketing_campaigns").expect("mc");
        assert_eq!(campaigns.levels, vec![AccessLevel::None, AccessLevel::Full]);
    }

    #[test]
    fn billing_is_exclusive_and_kinds_follow_scopes() {
        let catalog = Catalog::sendgrid();
        let billing = catalog
            .resolve(&["billing.read", "billing.update"])
            .expect("ok");
        let mixed = catalog.resolve(&["billing.read", "mail.send"]).expect("ok");
        let mail = catalog.resolve(&["mail.send"]).expect("ok");
        assert!(catalog.exclusivity_violation(&billing).is_none());
        assert_eq!(
            catalog.exclusivity_violation(&mixed).map(|c| c.id.as_str()),
            Some("billing")
        );
        assert_eq!(catalog.kind_of(&billing), KeyKind::Billing);
        assert_eq!(catalog.kind_of(&mail), KeyKind::RestrictedAccess);
        assert_eq!(catalog.kind_of(&catalog.full_access()), KeyKind::FullAccess);
        assert!(
            !catalog
                .full_access()
                .contains(catalog.lookup("billing.read").expect("b"))
        );
    }

    #[test]
    fn every_bundled_category_describes_itself() {
        let catalog = Catalog::sendgrid();
        for category in catalog.categories() {
            assert!(
                category.description.ends_with('.') && category.description.len() > 20,
                "[{}] {:?}",
                category.id,
                category.description
            );
        }
        let custom =
            Catalog::parse("t", "[a] A\ndescription What a reaches.\nx.read\n").expect("parses");
        assert_eq!(custom.categories()[0].description, "What a reaches.");
    }

    #[test]
    fn bad_files_name_line_and_problem() {
        let cases = [
            ("mail.send\n", 1, "before any [category]"),
            ("[a] A\nx.read\nx.read\n", 3, "duplicate scope"),
            ("[a] A\n[a] B\n", 2, "duplicate category"),
            ("[a] A\nlevels none most\n", 2, "unknown access level"),
            ("[a] A\nNot A Scope\n", 2, "one scope per line"),
            ("[a] A\nBAD\n", 2, "bad scope name"),
            ("[a] A\nx.read\nalias y.read z.read\n", 3, "is not a scope"),
            ("# nothing\n", 0, "no scope"),
            (
                "description Early\n[a] A\nx.read\n",
                1,
                "before any [category]",
            ),
        ];
        for (text, line, problem) in cases {
            let err = Catalog::parse("test.catalog", text).expect_err(text);
            assert_eq!(err.line, line, "{text}: {err}");
            assert!(err.problem.contains(problem), "{text}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("test.catalog:{line}:"))
            );
        }
    }

    #[test]
    fn too_many_scopes_is_a_load_error() {
        let scopes = (0..=MAX_SCOPES)
            .map(|i| format!("big.s{i}.read"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = format!("[big] Big\n{scopes}");
        let err = Catalog::parse("big.catalog", &text).expect_err("too big");
        assert!(err.problem.contains("more than 256"), "{err}");
    }
}
