//! What every console command answers: rows of text under named columns, shown by psql as a
//! table.

/// The columns of the commands that answer in names and values ([`ResultSet::pairs`]).
pub const PAIRS: &[&str] = &["item", "value"];

/// Rows of text values under named columns, with the command tag Postgres would use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

impl ResultSet {
    pub fn new(columns: &[&'static str], tag: &str) -> Self {
        ResultSet { columns: columns.to_vec(), rows: Vec::new(), tag: tag.to_owned() }
    }

    pub fn row<I: IntoIterator<Item = String>>(&mut self, values: I) {
        self.rows.push(values.into_iter().map(Some).collect());
    }

    /// Two columns of names and values.
    pub fn pairs(tag: &str, pairs: Vec<(&str, String)>) -> Self {
        let mut r = ResultSet::new(PAIRS, tag);
        for (k, v) in pairs {
            r.row([k.to_owned(), v]);
        }
        r
    }
}
