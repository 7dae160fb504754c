//! The exhaustive walk of a statement's parse tree, for what it does besides reading and writing
//! relations and calling functions ([`super::classify`]'s `refs`). The walk reads pg_query's typed nodes and goes through every field of every node type
//! ([`super::walk`]), so no node type can be missed: `FOR UPDATE/SHARE`, `SELECT INTO`, SQL-value functions (`CURRENT_TIMESTAMP`,
//! `current_user`), literals whose meaning changes with time (`'now'`), `TABLESAMPLE`,
//! temporary objects, every type the statement names (casts and typed literals run the type's
//! input and cast functions, and some of those read the catalog), the operators it uses (a
//! user-defined one runs its function), and what it does to session settings (`set_config`
//! calls).

use std::collections::BTreeSet;

use pg_query::protobuf::{Node, a_const};
use pg_query::{NodeEnum, NodeRef};

use super::relation::Relation;
use super::walk::{strings, walk};

/// Literals whose value depends on when they are evaluated (Postgres docs, "Special Date/Time
/// Inputs").
pub(super) const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

/// What the walk finds.
#[derive(Debug, Default)]
pub(super) struct Facts {
    pub locks: bool,
    pub into: bool,
    pub stable_builtins: bool,
    pub tablesample: bool,
    pub temp: bool,
    /// Types named in casts, typed literals, column definition lists (every `TypeName`).
    pub types: BTreeSet<Relation>,
    /// `set_config` is called.
    pub calls_set_config: bool,
    /// Custom settings named by `set_config` calls (lower case).
    pub custom_settings: BTreeSet<String>,
    /// A `set_config` call whose setting name is not a literal.
    pub unnamed_setting: bool,
    /// A `current_setting` call whose setting name is not a literal: what it reads cannot be
    /// part of a cache key.
    pub reads_unnamed_setting: bool,
    /// Operators used, with their schema when written `OPERATOR(schema.op)`.
    pub operators: BTreeSet<Relation>,
}

impl Facts {
    /// The facts of `node` and everything below it.
    pub fn of(node: NodeRef<'_>) -> Facts {
        let mut facts = Facts::default();
        walk(node, &mut |n| facts.visit(n));
        facts
    }

    fn visit(&mut self, node: NodeRef<'_>) {
        match node {
            NodeRef::SqlvalueFunction(_) => self.stable_builtins = true,
            NodeRef::RangeTableSample(_) => self.tablesample = true,
            NodeRef::SelectStmt(s) => {
                self.locks |= !s.locking_clause.is_empty();
                self.into |= s.into_clause.is_some();
            }
            NodeRef::RangeVar(r) => self.temp |= r.relpersistence == "t",
            // Identifiers are `String` nodes too: a column named "now" counts, which only
            // errs on the safe side.
            NodeRef::String(s) => self.stable_builtins |= is_time_word(&s.sval),
            NodeRef::TypeName(t) => self.type_name(&t.names),
            NodeRef::FuncCall(f) => self.func_call(&f.funcname, &f.args),
            NodeRef::AExpr(e) => self.operator(&e.name),
            NodeRef::SortBy(s) => self.operator(&s.use_op),
            NodeRef::SubLink(s) => self.operator(&s.oper_name),
            _ => {}
        }
    }

    /// A TypeName: `[schema.]name`, array bounds ignored (an array's elements are read with
    /// the element type's input function).
    fn type_name(&mut self, names: &[Node]) {
        match strings(names).as_slice() {
            [name] => self.types.insert(Relation::new(None, name)),
            [.., schema, name] => self.types.insert(Relation::new(Some(schema), name)),
            [] => false,
        };
    }

    /// An operator's name list (`[schema.]op`). `BETWEEN` and its variants stand for `>=`
    /// and `<=`.
    fn operator(&mut self, names: &[Node]) {
        match strings(names).as_slice() {
            [name] if name.starts_with("BETWEEN") || name.starts_with("NOT BETWEEN") => {
                self.operators.insert(Relation::new(None, ">="));
                self.operators.insert(Relation::new(None, "<="));
            }
            [name] => drop(self.operators.insert(Relation::new(None, name))),
            [.., schema, name] => drop(self.operators.insert(Relation::new(Some(schema), name))),
            [] => {}
        }
    }

    /// `set_config` and `current_setting` calls. A custom setting either names is tracked by
    /// the session (probed, keyed, replayed): a read of one is keyed on whether and how it is
    /// set, which another session's definition of it on the same backend could change.
    fn func_call(&mut self, funcname: &[Node], args: &[Node]) {
        let sets = match strings(funcname).last().copied() {
            Some("set_config") => true,
            Some("current_setting") => false,
            _ => return,
        };
        self.calls_set_config |= sets;
        let literal = match args.first().and_then(|a| a.node.as_ref()) {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(a_const::Val::Sval(s)) => Some(s.sval.as_str()),
                _ => None,
            },
            _ => None,
        };
        match literal {
            Some(name) => {
                if let Some(custom) = custom_setting(name) {
                    self.custom_settings.insert(custom);
                }
            }
            None if sets => self.unnamed_setting = true,
            None => self.reads_unnamed_setting = true,
        }
    }
}

/// A setting name as Postgres compares it (case-insensitively), if it is a custom one
/// (`prefix.name`, e.g. `app.tenant` or `request.jwt.claims`).
pub fn custom_setting(name: &str) -> Option<String> {
    let lower = name.trim().to_ascii_lowercase();
    lower.contains('.').then_some(lower)
}

/// Whether a text value is one of the special date/time inputs that mean "now".
pub fn is_time_word(s: &str) -> bool {
    let t = s.trim();
    TIME_WORDS.iter().any(|w| t.eq_ignore_ascii_case(w))
}
