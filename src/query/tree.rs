//! The exhaustive walk of a statement's parse tree, for what `pg_query::summary()` does not
//! say. The tree is walked in its serde form, so no node type can be missed: `FOR UPDATE/SHARE`,
//! `SELECT INTO`, SQL-value functions (`CURRENT_TIMESTAMP`, `current_user`), literals whose
//! meaning changes with time (`'now'`), `TABLESAMPLE`, temporary objects, every type the
//! statement names (casts and typed literals run the type's input and cast functions, and some
//! of those read the catalog), the operators it uses (a user-defined one runs its function),
//! and what it does to session settings (`set_config` calls).

use std::collections::BTreeSet;

use serde_json::Value;

use super::relation::Relation;

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
    /// Types named in casts, typed literals and column definition lists.
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
    pub fn walk(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    match key.as_str() {
                        "SqlvalueFunction" => self.stable_builtins = true,
                        "RangeTableSample" => self.tablesample = true,
                        "locking_clause" if child.as_array().is_some_and(|a| !a.is_empty()) => self.locks = true,
                        "into_clause" if !child.is_null() => self.into = true,
                        "relpersistence" if child.as_str() == Some("t") => self.temp = true,
                        "sval" if child.as_str().is_some_and(is_time_word) => self.stable_builtins = true,
                        "type_name" => self.type_name(child),
                        "FuncCall" => self.func_call(child),
                        "AExpr" => self.operator(&child["name"]),
                        "SortBy" => self.operator(&child["use_op"]),
                        "SubLink" => self.operator(&child["oper_name"]),
                        _ => {}
                    }
                    self.walk(child);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.walk(i)),
            _ => {}
        }
    }

    /// A TypeName: `[schema.]name`, array bounds ignored (an array's elements are read with
    /// the element type's input function).
    fn type_name(&mut self, v: &Value) {
        let names = strings(&v["names"]);
        match names.as_slice() {
            [name] => self.types.insert(Relation::new(None, name)),
            [.., schema, name] => self.types.insert(Relation::new(Some(schema), name)),
            [] => false,
        };
    }

    /// An operator's name list (`[schema.]op`). `BETWEEN` and its variants stand for `>=`
    /// and `<=`.
    fn operator(&mut self, v: &Value) {
        let names = strings(v);
        match names.as_slice() {
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
    fn func_call(&mut self, v: &Value) {
        let function = strings(&v["funcname"]).last().cloned();
        let sets = match function.as_deref() {
            Some("set_config") => true,
            Some("current_setting") => false,
            _ => return,
        };
        self.calls_set_config |= sets;
        match v["args"][0]["node"]["AConst"]["val"]["Sval"]["sval"].as_str() {
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

/// The `String` values of a list of name nodes.
fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|n| n["node"]["String"]["sval"].as_str().map(str::to_owned)).collect()
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
