//! Which relations a statement reads and writes and which functions it calls, read from the
//! parse tree pg_query already built (no second parse, as `pg_query::summary()` would cost).
//!
//! Reads and writes follow libpg_query's summary, with one difference: a `WITH` query's name
//! hides a relation only where SQL makes it visible — in the statement that defines it and
//! below, and inside its own definition only when `RECURSIVE` — where the summary hides the
//! name everywhere in the statement once any `WITH` defines it, so that in
//! `SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t) s, t` it drops the read of the real
//! table `t` (and a cached answer would miss the writes to it).
//!
//! Every `RangeVar` below a query is a relation it reads, except the target of an INSERT,
//! UPDATE, DELETE or MERGE (written), the new table of `SELECT INTO` (written), a `WITH` name in
//! scope, and the names of `FOR UPDATE OF` (range-table entries, which the `FROM` list names
//! already). Schema statements are different: what one names is not all it changes (a
//! `CREATE FUNCTION` body may read any table, and replacing the function changes every answer
//! that calls it), so they are read as the summary reads them — the relation a table, index,
//! view, trigger, rule, grant or rename statement is about, the queries of views and
//! `CREATE TABLE AS` — and every other one names nothing, which invalidates everything.

use std::collections::BTreeSet;

use pg_query::protobuf::{CommonTableExpr, Node, ObjectType, RangeVar, WithClause};
use pg_query::{NodeEnum, NodeRef};

use super::super::relation::Relation;
use super::super::walk::{children, name, strings};
use super::is_ddl;

/// What a statement reads, writes and calls.
#[derive(Debug, Default)]
pub(super) struct Refs {
    pub reads: BTreeSet<Relation>,
    pub writes: BTreeSet<Relation>,
    /// Functions called (`FuncCall`), with their schema when qualified.
    pub functions: BTreeSet<Relation>,
    /// Holds no statement but SELECTs, itself included (no data-modifying `WITH`). Read for a
    /// SELECT, below which the walk reaches every node but those naming no statement.
    pub only_select: bool,
}

/// The references of the statement `top`.
pub(super) fn of(top: NodeRef<'_>) -> Refs {
    let mut w = Walker { scope: Vec::new(), refs: Refs { only_select: true, ..Refs::default() } };
    w.visit(top);
    w.refs
}

struct Walker<'a> {
    /// The `WITH` names visible where the walk is, innermost last.
    scope: Vec<&'a str>,
    refs: Refs,
}

impl<'a> Walker<'a> {
    fn visit(&mut self, node: NodeRef<'a>) {
        let kind = name(node);
        if kind.ends_with("Stmt") && kind != "SelectStmt" {
            self.refs.only_select = false;
        }
        match node {
            NodeRef::SelectStmt(s) => self.query(node, s.with_clause.as_ref(), None),
            NodeRef::InsertStmt(s) => self.query(node, s.with_clause.as_ref(), s.relation.as_ref()),
            NodeRef::UpdateStmt(s) => self.query(node, s.with_clause.as_ref(), s.relation.as_ref()),
            NodeRef::DeleteStmt(s) => self.query(node, s.with_clause.as_ref(), s.relation.as_ref()),
            NodeRef::MergeStmt(s) => self.query(node, s.with_clause.as_ref(), s.relation.as_ref()),
            // Walked by the statement that owns them, which scopes their names.
            NodeRef::WithClause(_) | NodeRef::CommonTableExpr(_) => {}
            NodeRef::RangeVar(r) => self.read(r),
            NodeRef::IntoClause(i) => {
                if let Some(rel) = &i.rel {
                    self.write(rel);
                }
                self.below(node, i.rel.as_ref());
            }
            NodeRef::LockingClause(_) => {}
            NodeRef::FuncCall(f) => {
                if let Some(function) = qualified(&strings(&f.funcname)) {
                    self.refs.functions.insert(function);
                }
                self.below(node, None);
            }
            other if is_ddl(kind) => self.schema_statement(other),
            _ => self.below(node, None),
        }
    }

    /// Every node below `node` but `skip` (a statement's target, already counted).
    fn below(&mut self, node: NodeRef<'a>, skip: Option<&'a RangeVar>) {
        children(node, &mut |child| match (child, skip) {
            (NodeRef::RangeVar(r), Some(s)) if std::ptr::eq(r, s) => {}
            _ => self.visit(child),
        });
    }

    /// A query or data-modifying statement: its `WITH` names are visible in it and below;
    /// `target` is the relation it writes (never a `WITH` name).
    fn query(&mut self, node: NodeRef<'a>, with: Option<&'a WithClause>, target: Option<&'a RangeVar>) {
        let outer = self.scope.len();
        if let Some(with) = with {
            self.with(with);
        }
        if let Some(target) = target {
            self.write(target);
        }
        self.below(node, target);
        self.scope.truncate(outer);
    }

    /// The queries of a `WITH` list, each seeing the names before it (all of them when
    /// `RECURSIVE`); leaves every name in scope.
    fn with(&mut self, with: &'a WithClause) {
        let ctes: Vec<&'a CommonTableExpr> = with
            .ctes
            .iter()
            .filter_map(|n| match n.node.as_ref().map(NodeEnum::to_ref) {
                Some(NodeRef::CommonTableExpr(c)) => Some(c),
                _ => None,
            })
            .collect();
        if with.recursive {
            self.scope.extend(ctes.iter().map(|c| c.ctename.as_str()));
        }
        for cte in ctes {
            self.below(NodeRef::CommonTableExpr(cte), None);
            if !with.recursive {
                self.scope.push(&cte.ctename);
            }
        }
    }

    fn read(&mut self, r: &'a RangeVar) {
        if r.schemaname.is_empty() && self.scope.contains(&r.relname.as_str()) {
            return;
        }
        self.refs.reads.insert(Relation::new(Some(&r.schemaname), &r.relname));
    }

    fn write(&mut self, r: &RangeVar) {
        self.refs.writes.insert(Relation::new(Some(&r.schemaname), &r.relname));
    }

    /// A schema statement, read as libpg_query's summary reads it (see the module's doc).
    fn schema_statement(&mut self, node: NodeRef<'a>) {
        let table = ObjectType::ObjectTable as i32;
        match node {
            NodeRef::AlterTableStmt(s) if s.objtype != ObjectType::ObjectIndex as i32 => self.write_opt(&s.relation),
            NodeRef::CreateStmt(s) => self.write_opt(&s.relation),
            NodeRef::CreateTrigStmt(s) => self.write_opt(&s.relation),
            NodeRef::RuleStmt(s) => self.write_opt(&s.relation),
            NodeRef::CreateTableAsStmt(s) => {
                if let Some(rel) = s.into.as_ref().and_then(|i| i.rel.as_ref()) {
                    self.write(rel);
                }
                self.each(s.query.as_deref());
            }
            NodeRef::ViewStmt(s) => {
                self.write_opt(&s.view);
                self.each(s.query.as_deref());
            }
            NodeRef::IndexStmt(s) => {
                self.write_opt(&s.relation);
                for param in &s.index_params {
                    if let Some(NodeEnum::IndexElem(e)) = &param.node {
                        self.each(e.expr.as_deref());
                    }
                }
                self.each(s.where_clause.as_deref());
            }
            NodeRef::DropStmt(s) => {
                let all_but = match ObjectType::try_from(s.remove_type) {
                    Ok(ObjectType::ObjectTable) => 0,
                    // `DROP RULE r ON t`, `DROP TRIGGER tr ON t`: the last name is the rule's.
                    Ok(ObjectType::ObjectRule | ObjectType::ObjectTrigger) => 1,
                    _ => return,
                };
                for object in &s.objects {
                    if let Some(NodeEnum::List(list)) = &object.node {
                        let names = strings(&list.items);
                        let names = &names[..names.len().saturating_sub(all_but)];
                        if let Some(relation) = qualified(names) {
                            self.refs.writes.insert(relation);
                        }
                    }
                }
            }
            NodeRef::GrantStmt(s) if s.objtype == table => {
                for object in &s.objects {
                    if let Some(NodeEnum::RangeVar(r)) = &object.node {
                        self.write(r);
                    }
                }
            }
            NodeRef::RenameStmt(s) if s.rename_type == table => {
                if let Some(r) = &s.relation {
                    self.write(r);
                    self.refs.writes.insert(Relation::new(Some(&r.schemaname), &s.newname));
                }
            }
            _ => {}
        }
    }

    fn write_opt(&mut self, r: &Option<RangeVar>) {
        if let Some(r) = r {
            self.write(r);
        }
    }

    fn each(&mut self, node: Option<&'a Node>) {
        if let Some(n) = node.and_then(|n| n.node.as_ref()) {
            self.visit(n.to_ref());
        }
    }
}

/// `[catalog.][schema.]name` as a relation (the catalog, the database, is dropped).
fn qualified(names: &[&str]) -> Option<Relation> {
    match names {
        [name] => Some(Relation::new(None, name)),
        [.., schema, name] => Some(Relation::new(Some(schema), name)),
        [] => None,
    }
}
