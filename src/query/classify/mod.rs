//! Statement classification with libpg_query (the real Postgres parser).
//!
//! A statement is parsed once. Its relations read and written and the functions it calls come
//! from a walk of that tree ([`refs`]), the rest from an exhaustive walk of it ([`super::tree`]):
//! locks, `SELECT INTO`, SQL-value functions, time words, `TABLESAMPLE`, the types it evaluates,
//! and the settings it changes; its fingerprint and normalized text from the lexer's tokens
//! ([`super::digest`]).
//!
//! Cacheability is an allow-list: only a single plain SELECT can be [`Kind::Select`]; anything
//! whose effect is not understood is [`Kind::Opaque`] and is treated as a write to unknown
//! tables.

use std::sync::Arc;

use pg_query::protobuf::{DiscardMode, ExplainStmt, RawStmt, TransactionStmt, TransactionStmtKind, VariableSetKind};
use pg_query::{NodeEnum, NodeRef};

mod refs;

use super::hold::Hold;
use super::point::Point;
use super::relation::Relation;
use super::tree::{Facts, custom_setting};

/// Transaction control statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// BEGIN / START TRANSACTION; `plain` when no isolation level or mode is given.
    Begin {
        plain: bool,
    },
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: inside a transaction, no effect on its end.
    Savepoint,
    /// SET TRANSACTION ...: changes the current transaction's isolation or mode.
    SetTransaction,
    /// PREPARE TRANSACTION / COMMIT PREPARED / ROLLBACK PREPARED.
    TwoPhase,
}

/// Statements that change session state pgcache keys on or must track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// SET / RESET / SET ROLE / SET SESSION AUTHORIZATION and the like.
    Setting,
    /// DISCARD ALL / PLANS / SEQUENCES / TEMP.
    Discard,
    /// Creates a temporary object, whose contents are private to the session.
    CreatesTemp,
}

/// What kind of statement it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A single read-only SELECT: may be served from the cache.
    Select,
    /// Changes the rows of the relations in `writes`.
    Write,
    /// Changes schema, privileges or functions; invalidates `writes`, or everything when it
    /// names no relation.
    Ddl,
    Transaction(TxControl),
    Session(SessionChange),
    /// Reads or does nothing that can change query results (SHOW, LISTEN, VACUUM, COPY TO...).
    Neutral,
    /// Effects unknown (DO, CALL, EXECUTE, unrecognised statements): treated as a write to
    /// unknown tables.
    Opaque,
    /// The parser refused it; Postgres will too, but it is still treated as [`Kind::Opaque`].
    Unparseable,
}

/// What a statement does to session settings, which the cache key is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsChange {
    /// It may change settings: `SET`, `RESET`, `DISCARD`, `set_config()`.
    pub changes: bool,
    /// Custom (placeholder) settings it names, lower case (`app.tenant`): Postgres does not
    /// list those in `pg_settings`, so the session keeps track of them.
    pub custom: Vec<String>,
    /// It calls `set_config` with a name that is not a literal.
    pub unnamed: bool,
    /// It runs code pgcache cannot see (DO, CALL, a statement it cannot classify), which may
    /// set settings under any name. (EXECUTE runs a statement whose PREPARE was seen.)
    pub unseen: bool,
    /// `RESET ALL` or `DISCARD ALL`: every setting returns to its start-up value.
    pub resets_all: bool,
}

/// The classification of one statement: what every text of its shape shares, and the key
/// values this text pins.
///
/// Statements that differ only in literals share one [`Shape`] behind an `Arc` (see
/// [`super::classifier`]): a text of a known shape costs a reference count and its own
/// [`Point`], not a copy of the relation lists. The shape's fields are read through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    shape: Arc<Shape>,
    /// The columns a SELECT or a write pins to values (for invalidation by key).
    pub point: Option<Point>,
}

/// What a statement does, as far as its shape tells: the same for every text of the shape.
#[derive(Debug, PartialEq, Eq)]
pub struct Shape {
    pub kind: Kind,
    pub reads: Vec<Relation>,
    pub writes: Vec<Relation>,
    /// Functions called, with their schema when qualified.
    pub functions: Vec<Relation>,
    /// Operators used, with their schema when written `OPERATOR(schema.op)`: a user-defined
    /// one runs its function.
    pub operators: Vec<Relation>,
    /// Calls SQL-value functions (`CURRENT_TIMESTAMP`, `current_user`, ...) or uses literals
    /// such as `'now'`: stable, not immutable.
    pub stable_builtins: bool,
    /// Types named in casts and typed literals, with their schema when qualified: their
    /// input and cast functions run, and some read the catalog (`'t'::regclass`).
    pub types: Vec<Relation>,
    /// What it does to session settings.
    pub settings: SettingsChange,
    /// Why this SELECT may never be cached whatever the rules say.
    pub never_cache: Option<&'static str>,
    /// Session state this statement takes or gives back that lives only in its backend
    /// connection (LISTEN, WITH HOLD cursors, SQL-level PREPARE, advisory locks, temporary
    /// objects).
    pub holds: Option<Hold>,
    /// Fingerprint of the statement's shape (literals and parameters ignored), for rules.
    pub fingerprint: u64,
    /// Normalized text (literals replaced by `$n`), for reports and logs.
    pub normalized: Arc<str>,
}

impl std::ops::Deref for Classified {
    type Target = Shape;

    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl Classified {
    fn opaque(kind: Kind, sql: &str) -> Self {
        Classified::new(Shape::opaque(kind, sql), None)
    }

    /// A statement that could not be read (e.g. not valid UTF-8): effects unknown.
    pub fn unparseable() -> Self {
        Classified::opaque(Kind::Unparseable, "")
    }

    fn new(shape: Shape, point: Option<Point>) -> Self {
        Classified { shape: Arc::new(shape), point }
    }

    /// This statement's classification for another text of its shape, which pins `point`.
    pub fn with_point(&self, point: Option<Point>) -> Self {
        Classified { shape: self.shape.clone(), point }
    }

    /// What identifies the shape this statement shares with others, while `self` lives.
    pub fn shape_id(&self) -> usize {
        Arc::as_ptr(&self.shape) as usize
    }

    /// The shared part, to keep `shape_id` from being reused while a memo holds it.
    pub fn shape(&self) -> &Arc<Shape> {
        &self.shape
    }
}

impl Shape {
    fn opaque(kind: Kind, sql: &str) -> Self {
        let unseen = matches!(kind, Kind::Opaque | Kind::Unparseable);
        Shape {
            kind,
            reads: Vec::new(),
            writes: Vec::new(),
            functions: Vec::new(),
            operators: Vec::new(),
            stable_builtins: false,
            types: Vec::new(),
            settings: SettingsChange { unseen, ..SettingsChange::default() },
            never_cache: Some("not a plain SELECT"),
            holds: None,
            fingerprint: 0,
            normalized: Arc::from(sql),
        }
    }

    /// Whether the statement may change data in ways pgcache cannot attribute to relations.
    pub fn writes_unknown(&self) -> bool {
        matches!(self.kind, Kind::Opaque | Kind::Unparseable) || (self.kind == Kind::Ddl && self.writes.is_empty())
    }
}

/// Classifies one SQL string, which may hold several statements. It is parsed once; a string
/// of several statements is cut at their boundaries and each part classified as its own text
/// (its fingerprint, normalized form and literal positions are its own).
pub fn classify(sql: &str) -> Vec<Classified> {
    let tree = match pg_query::parse(sql, 0) {
        Ok(tree) => tree.protobuf,
        Err(_) => return vec![Classified::opaque(Kind::Unparseable, sql)],
    };
    match tree.stmts.as_slice() {
        [] | [_] => vec![classify_parsed(sql, 0, tree.stmts.first())],
        several => several
            .iter()
            .map(|s| match statement_text(sql, s) {
                Some((text, start)) => classify_parsed(text, start, Some(s)),
                None => Classified::opaque(Kind::Unparseable, sql),
            })
            .collect(),
    }
}

/// The text of one statement of a string of several, as the parser delimits it (a length of
/// zero means "to the end"), and where it starts.
fn statement_text<'a>(sql: &'a str, stmt: &RawStmt) -> Option<(&'a str, usize)> {
    let start = usize::try_from(stmt.stmt_location).ok()?;
    let end = match usize::try_from(stmt.stmt_len).ok()? {
        0 => sql.len(),
        len => start + len,
    };
    Some((sql.get(start..end)?, start))
}

/// Classifies the one statement `sql` whose parse tree is `stmt` (`None`: only comments or
/// semicolons); `sql` starts at byte `base` of the string parsed.
fn classify_parsed(sql: &str, base: usize, stmt: Option<&RawStmt>) -> Classified {
    let Some(top) = stmt.and_then(|s| s.stmt.as_ref()).and_then(|s| s.node.as_ref()) else {
        return Classified::new(Shape { never_cache: Some("empty query"), ..Shape::opaque(Kind::Neutral, sql) }, None);
    };
    let node = top.to_ref();
    let facts = Facts::of(node);
    let refs = refs::of(node);
    let (mut reads, mut writes, only_select) = (refs.reads, refs.writes, refs.only_select);
    let calls_functions = !refs.functions.is_empty();
    let functions: Vec<Relation> = refs.functions.into_iter().collect();

    // EXECUTE, or EXPLAIN ANALYZE EXECUTE: runs a statement whose PREPARE was classified.
    let runs_prepared = match node {
        NodeRef::ExecuteStmt(_) => true,
        NodeRef::ExplainStmt(e) => {
            matches!(e.query.as_deref().and_then(|q| q.node.as_ref()), Some(NodeEnum::ExecuteStmt(_)))
        }
        _ => false,
    };
    let kind = match node {
        NodeRef::SelectStmt(_) if only_select && writes.is_empty() && !facts.into => Kind::Select,
        NodeRef::SelectStmt(_)
        | NodeRef::InsertStmt(_)
        | NodeRef::UpdateStmt(_)
        | NodeRef::DeleteStmt(_)
        | NodeRef::MergeStmt(_) => Kind::Write,
        NodeRef::CopyStmt(copy) if copy.is_from => {
            // A COPY's relation is read as a query's are: COPY FROM writes it.
            writes.append(&mut reads);
            Kind::Write
        }
        NodeRef::CopyStmt(_) if writes.is_empty() => Kind::Neutral,
        NodeRef::CopyStmt(_) => Kind::Write,
        NodeRef::TruncateStmt(_) | NodeRef::RefreshMatViewStmt(_) => {
            writes.append(&mut reads);
            Kind::Write
        }
        NodeRef::TransactionStmt(t) => Kind::Transaction(tx_control(t)),
        NodeRef::VariableSetStmt(set) if set.name == "TRANSACTION" => Kind::Transaction(TxControl::SetTransaction),
        NodeRef::VariableSetStmt(_) => Kind::Session(SessionChange::Setting),
        NodeRef::DiscardStmt(_) => Kind::Session(SessionChange::Discard),
        NodeRef::VariableShowStmt(_)
        | NodeRef::ListenStmt(_)
        | NodeRef::UnlistenStmt(_)
        | NodeRef::NotifyStmt(_)
        | NodeRef::VacuumStmt(_)
        | NodeRef::CheckPointStmt(_)
        | NodeRef::LockStmt(_)
        | NodeRef::DeallocateStmt(_)
        | NodeRef::PrepareStmt(_)
        | NodeRef::ClusterStmt(_)
        | NodeRef::ReindexStmt(_)
        | NodeRef::LoadStmt(_)
        | NodeRef::ClosePortalStmt(_) => {
            // Maintenance and session plumbing: no rows change, whatever relations they name.
            writes.clear();
            Kind::Neutral
        }
        // A cursor's query runs on FETCH (and MOVE); a writable one is a write now.
        NodeRef::DeclareCursorStmt(_) | NodeRef::FetchStmt(_) if writes.is_empty() => Kind::Neutral,
        NodeRef::ExplainStmt(e) if !explain_analyze(e) => Kind::Neutral,
        // EXPLAIN ANALYZE runs the statement: what an EXECUTE runs is not seen here, and
        // even a SELECT may call a function that writes.
        NodeRef::ExplainStmt(_) if runs_prepared => Kind::Opaque,
        NodeRef::ExplainStmt(_) => Kind::Write,
        NodeRef::DoStmt(_) | NodeRef::CallStmt(_) | NodeRef::ExecuteStmt(_) => Kind::Opaque,
        other if is_ddl(super::walk::name(other)) => {
            if facts.temp {
                Kind::Session(SessionChange::CreatesTemp)
            } else {
                // DDL touches whatever it names, read or written.
                writes.append(&mut reads);
                Kind::Ddl
            }
        }
        _ => Kind::Opaque,
    };
    let mut settings = settings_change(node, &facts);
    settings.unseen = kind == Kind::Opaque && !runs_prepared;
    let never_cache = if kind != Kind::Select {
        Some("not a plain SELECT")
    } else if facts.locks {
        Some("locks rows (FOR UPDATE/SHARE)")
    } else if facts.tablesample {
        Some("uses TABLESAMPLE")
    } else if reads.iter().any(Relation::is_temp) {
        Some("reads a temporary table")
    } else if reads.iter().any(Relation::is_system) {
        Some("reads a system catalog or statistics view")
    } else if facts.reads_unnamed_setting {
        Some("reads a setting named by an expression (current_setting of a non-literal)")
    } else {
        None
    };
    let holds = super::hold::hold_of(node, &functions, kind == Kind::Session(SessionChange::CreatesTemp));
    let point = match kind {
        Kind::Select | Kind::Write => super::point::of(sql, base, node, calls_functions),
        _ => None,
    };
    // The parser took the text, so the lexer does: `None` is not expected.
    let digest = super::digest::digest(sql);
    let shape = Shape {
        kind,
        holds,
        reads: reads.into_iter().collect(),
        writes: writes.into_iter().collect(),
        functions,
        operators: facts.operators.iter().cloned().collect(),
        stable_builtins: facts.stable_builtins,
        types: facts.types.into_iter().collect(),
        settings,
        never_cache,
        fingerprint: digest.as_ref().map_or(0, |d| d.fingerprint),
        normalized: Arc::from(digest.as_ref().map_or(sql, |d| d.normalized.as_str()).trim()),
    };
    Classified::new(shape, point)
}

/// Statement node types that define or alter objects.
fn is_ddl(node: &str) -> bool {
    node.starts_with("Create")
        || node.starts_with("Alter")
        || node.starts_with("Drop")
        || matches!(
            node,
            "IndexStmt"
                | "ViewStmt"
                | "RenameStmt"
                | "GrantStmt"
                | "GrantRoleStmt"
                | "RuleStmt"
                | "CommentStmt"
                | "SecLabelStmt"
                | "DefineStmt"
                | "CompositeTypeStmt"
                | "ReassignOwnedStmt"
                | "ImportForeignSchemaStmt"
                | "CreateTableAsStmt"
                | "CreateSchemaStmt"
        )
}

fn explain_analyze(explain: &ExplainStmt) -> bool {
    explain.options.iter().any(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) => d.defname.eq_ignore_ascii_case("analyze"),
        _ => false,
    })
}

fn tx_control(t: &TransactionStmt) -> TxControl {
    use TransactionStmtKind as K;
    match K::try_from(t.kind) {
        Ok(K::TransStmtBegin | K::TransStmtStart) => TxControl::Begin { plain: t.options.is_empty() },
        Ok(K::TransStmtCommit) => TxControl::Commit,
        Ok(K::TransStmtRollback) => TxControl::Rollback,
        Ok(K::TransStmtSavepoint | K::TransStmtRelease | K::TransStmtRollbackTo) => TxControl::Savepoint,
        Ok(K::TransStmtPrepare | K::TransStmtCommitPrepared | K::TransStmtRollbackPrepared) => TxControl::TwoPhase,
        // Not a kind this parser knows: the current transaction's mode may change.
        Ok(K::Undefined) | Err(_) => TxControl::SetTransaction,
    }
}

/// What the statement `node` does to session settings.
fn settings_change(node: NodeRef<'_>, facts: &Facts) -> SettingsChange {
    let mut change = SettingsChange {
        changes: facts.calls_set_config,
        custom: facts.custom_settings.iter().cloned().collect(),
        unnamed: facts.unnamed_setting,
        unseen: false,
        resets_all: false,
    };
    match node {
        NodeRef::VariableSetStmt(set) => {
            change.changes = true;
            change.resets_all = set.kind == VariableSetKind::VarResetAll as i32;
            if let Some(custom) = custom_setting(&set.name) {
                change.custom.push(custom);
            }
        }
        NodeRef::DiscardStmt(discard) => {
            change.changes = true;
            change.resets_all = discard.target == DiscardMode::DiscardAll as i32;
        }
        _ => {}
    }
    change
}

#[cfg(test)]
mod tests;
