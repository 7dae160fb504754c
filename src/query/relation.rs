//! A relation as SQL names it (`schema.name`, or a bare name resolved through `search_path`):
//! the unit of reads, writes, generations and rules.

/// A relation as written in SQL: its schema when qualified, and its name as Postgres folds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Relation {
    pub schema: Option<String>,
    pub name: String,
}

impl Relation {
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Relation { schema: schema.filter(|s| !s.is_empty()).map(str::to_owned), name: name.to_owned() }
    }

    pub(super) fn is_system(&self) -> bool {
        matches!(self.schema.as_deref(), Some("pg_catalog" | "information_schema" | "pg_toast"))
            || self.name.starts_with("pg_")
    }

    pub(super) fn is_temp(&self) -> bool {
        self.schema.as_deref().is_some_and(|s| s == "pg_temp" || s.starts_with("pg_temp_"))
    }
}

impl std::fmt::Display for Relation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}
