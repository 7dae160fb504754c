//! The protocol core, driven without I/O: client frames in, backend frames in, and what each
//! side is sent out, as strings of message tags. The facts come from fakes — write effects
//! from the classification, decisions from a closure — so each case states its protocol story
//! in a few lines: the ordering cases the conformance tests cover against real Postgres, and
//! the error paths.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::frontend as fe;

use crate::cache::Entry;
use crate::policy::Reason;
use crate::protocol::frame::{put_frame, take_frame};
use crate::query::classify::classify;
use crate::query::{Classified, Kind};
use crate::rules::Rule;

use super::batch::{Decided, Need};
use super::effect::{Effect, Step};
use super::flow::{Flow, Parked};
use super::plan::Plan;
use super::query;
use super::{Action, Core};

type Decider = Box<dyn FnMut(&Core, &str) -> Plan>;

/// The core with fake facts, driven as the relay drives it.
struct T {
    core: Core,
    params: Arc<BTreeMap<String, String>>,
    decide: Decider,
    /// Client bytes not yet processed (behind a parked request).
    unread: BytesMut,
    actions: Vec<Action>,
}

fn effects_of(c: &Classified) -> Vec<Effect> {
    match c.kind {
        Kind::Write | Kind::Ddl => c.writes.iter().map(|r| Effect::Name(r.name.clone())).collect(),
        Kind::Opaque | Kind::Unparseable => vec![Effect::Unknown("unknown")],
        _ => Vec::new(),
    }
}

impl T {
    fn new(decide: impl FnMut(&Core, &str) -> Plan + 'static) -> T {
        T {
            core: Core::new(Flow { database: Arc::from("db"), ..Flow::default() }),
            params: Arc::default(),
            decide: Box::new(decide),
            unread: BytesMut::new(),
            actions: Vec::new(),
        }
    }

    /// Nothing is cached.
    fn plain() -> T {
        T::new(|_, _| Plan::forward(Reason::NoRules))
    }

    fn decide(&mut self, sql: &str) -> Plan {
        match self.core.refuses() {
            Some(why) => Plan::forward(why),
            None => (self.decide)(&self.core, sql),
        }
    }

    fn note(&mut self, c: &Classified) -> Step {
        self.core.note(c, effects_of(c), true, false)
    }

    /// The client sends these frames.
    fn client(&mut self, frames: &[BytesMut]) -> &mut Self {
        for f in frames {
            self.unread.extend_from_slice(f);
        }
        self.process();
        self
    }

    fn process(&mut self) {
        while self.core.flow.parked.is_none() {
            let Some(frame) = take_frame(&mut self.unread, 1 << 20).expect("test frames are well formed") else {
                break;
            };
            match frame.tag() {
                b'Q' => {
                    let classified = Arc::new(classify(query::sql_of(&frame).unwrap_or("")));
                    let steps = classified.iter().map(|c| self.note(c)).collect();
                    self.query(frame, classified, steps);
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' => {
                    let tag = frame.tag();
                    self.core.flow.batch.push(frame);
                    if tag == b'S' || tag == b'H' {
                        self.batch();
                    }
                }
                tag => self.core.send_plain(frame.into_raw(), [tag]),
            }
        }
        self.actions.extend(self.core.take_actions().0);
    }

    fn query(&mut self, frame: crate::protocol::Frame, classified: Arc<Vec<Classified>>, steps: Vec<Step>) {
        let plan =
            query::candidate(&frame, &classified, &steps).map(|(sql, _)| sql.to_owned()).map(|sql| self.decide(&sql));
        self.core.query(frame, classified, steps, plan);
    }

    fn batch(&mut self) {
        let Some(mut planner) = self.core.begin_batch(&|sql| Arc::new(classify(sql))) else { return };
        let mut need = planner.next(&mut self.core);
        while let Some(n) = need {
            need = match n {
                Need::Effects { statement: st, .. } => {
                    let all = st.classified.iter().map(|c| self.note(c)).collect();
                    planner.effects(&mut self.core, all).or_else(|| planner.next(&mut self.core))
                }
                Need::Decision { statement, .. } => {
                    let plan = self.decide(&statement.sql);
                    if planner.decision(&mut self.core, plan) == Decided::Parked {
                        return;
                    }
                    planner.next(&mut self.core)
                }
            };
        }
        planner.finish(&mut self.core);
    }

    /// Postgres answers with these frames.
    fn backend(&mut self, frames: &[BytesMut]) -> &mut Self {
        let mut buf = BytesMut::new();
        for f in frames {
            buf.extend_from_slice(f);
        }
        self.core.on_backend(&mut buf, &mut self.params).expect("test frames are well formed");
        assert!(buf.is_empty(), "every frame routed");
        self.actions.extend(self.core.take_actions().0);
        if let Some(parked) = self.core.unpark() {
            match parked {
                Parked::Query { frame, classified, steps } => self.query(frame, classified, steps),
                Parked::Batch => self.batch(),
            }
            self.process();
        }
        self
    }

    /// The tags sent to Postgres since the last look.
    fn sent(&mut self) -> String {
        tags(&mut self.core.to_backend)
    }

    /// The tags sent to the client since the last look.
    fn got(&mut self) -> String {
        tags(&mut self.core.to_client)
    }

    fn expect(&mut self, sent: &str, got: &str) -> &mut Self {
        assert_eq!((self.sent().as_str(), self.got().as_str()), (sent, got), "(to Postgres, to the client)");
        self
    }
}

fn tags(q: &mut super::queue::OutQueue) -> String {
    let mut bytes = BytesMut::from(&q.copy_to_bytes(q.remaining())[..]);
    let mut out = String::new();
    while let Ok(Some(f)) = take_frame(&mut bytes, 1 << 30) {
        out.push(f.tag() as char);
    }
    out
}

// Client messages.
fn msg(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::new();
    build(&mut b);
    b
}
fn q(sql: &str) -> BytesMut {
    msg(|b| fe::query(sql, b).unwrap())
}
fn p(name: &str, sql: &str) -> BytesMut {
    msg(|b| fe::parse(name, sql, [], b).unwrap())
}
fn b(portal: &str, stmt: &str) -> BytesMut {
    msg(|b| {
        fe::bind(portal, stmt, [], [] as [Option<Bytes>; 0], |_, _| Ok(postgres_protocol::IsNull::No), [], b)
            .map_err(|_| ())
            .unwrap()
    })
}
fn ds(name: &str) -> BytesMut {
    msg(|b| fe::describe(b'S', name, b).unwrap())
}
fn dp(name: &str) -> BytesMut {
    msg(|b| fe::describe(b'P', name, b).unwrap())
}
fn e(portal: &str, max_rows: i32) -> BytesMut {
    msg(|b| fe::execute(portal, max_rows, b).unwrap())
}
fn s() -> BytesMut {
    msg(fe::sync)
}
fn h() -> BytesMut {
    msg(fe::flush)
}

// Backend messages.
fn be(tag: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    put_frame(&mut b, tag, body);
    b
}
fn z(status: u8) -> BytesMut {
    be(b'Z', &[status])
}
fn c(tag: &str) -> BytesMut {
    be(b'C', format!("{tag}\0").as_bytes())
}
fn row(v: &str) -> BytesMut {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
    body.extend_from_slice(v.as_bytes());
    be(b'D', &body)
}
fn err(code: &str) -> BytesMut {
    be(b'E', format!("SERROR\0VERROR\0C{code}\0Mboom\0\0").as_bytes())
}
fn one() -> BytesMut {
    be(b'1', &[])
}
fn two() -> BytesMut {
    be(b'2', &[])
}
fn row_description() -> BytesMut {
    be(b'T', &[0, 0])
}

/// A cache entry of `rows` one-column rows.
fn entry(rows: usize) -> Arc<Entry> {
    let mut body = BytesMut::new();
    for i in 0..rows {
        body.extend_from_slice(&row(&i.to_string()));
    }
    body.extend_from_slice(&c(&format!("SELECT {rows}")));
    Arc::new(Entry {
        rule: Arc::new(Rule::cache("r", Duration::from_secs(60))),
        row_description: row_description().freeze(),
        body: body.freeze(),
        rows: rows as u64,
        created: tokio::time::Instant::now(),
        deps: Vec::new(),
        tables: Vec::new(),
        sql: Arc::from("SELECT"),
        refreshing: AtomicBool::new(false),
        hits: AtomicU64::new(0),
        l2_key: None,
        recipe: None,
    })
}

/// Answers SQL mentioning "cached" from an entry of `rows` rows; forwards the rest.
fn caching(rows: usize) -> impl FnMut(&Core, &str) -> Plan {
    move |_, sql| {
        if sql.contains("cached") {
            Plan::Hit { entry: entry(rows), key: 1, stale: false }
        } else {
            Plan::forward(Reason::NoMatch)
        }
    }
}

#[test]
fn a_simple_query_is_forwarded_and_answered_in_order() {
    T::plain()
        .client(&[q("SELECT 1")])
        .expect("Q", "")
        .backend(&[row_description(), row("1"), c("SELECT 1"), z(b'I')])
        .expect("", "TDCZ");
}

#[test]
fn an_error_after_flush_then_sync_is_answered_and_the_next_query_too() {
    // asyncpg in a failed transaction: Parse/Describe/Flush gets the error, then Sync, then a
    // simple ROLLBACK — which must reach Postgres, and so must the Sync before it.
    let mut t = T::plain();
    t.client(&[q("BEGIN")]).backend(&[c("BEGIN"), z(b'T')]).expect("Q", "CZ");
    t.client(&[q("SELECT 1/0")]).backend(&[err("22012"), z(b'E')]).expect("Q", "EZ");
    t.client(&[p("a1", "SELECT 2"), ds("a1"), h()]).expect("PDH", "");
    t.backend(&[err("25P02")]).expect("", "E");
    t.client(&[s()]).expect("S", "");
    t.backend(&[z(b'E')]).expect("", "Z");
    t.client(&[q("ROLLBACK")]).expect("Q", "").backend(&[c("ROLLBACK"), z(b'I')]).expect("", "CZ");
    assert!(t.core.at_rest());
}

#[test]
fn an_error_mid_pipeline_skips_to_its_sync_and_the_next_batch_runs() {
    let mut t = T::plain();
    t.client(&[p("", "SELECT 1"), b("", ""), e("", 0), p("", "SELECT x/0 FROM t"), b("", ""), e("", 0), s()]);
    t.client(&[p("", "SELECT 3"), b("", ""), e("", 0), s()]);
    t.expect("PBEPBESPBES", "");
    t.backend(&[one(), two(), row("1"), c("SELECT 1"), one(), two(), err("22012"), z(b'I')]);
    t.expect("", "12DC12EZ");
    t.backend(&[one(), two(), row("3"), c("SELECT 1"), z(b'I')]).expect("", "12DCZ");
    assert!(t.core.at_rest());
}

#[test]
fn everything_after_a_failed_parse_is_skipped_up_to_sync() {
    let mut t = T::plain();
    t.client(&[p("bad", "SELEKT"), ds("bad"), b("", "bad"), e("", 0), s()]).expect("PDBES", "");
    t.backend(&[err("42601"), z(b'I')]).expect("", "EZ");
    assert!(t.core.at_rest());
}

#[test]
fn an_error_while_a_portal_is_suspended() {
    let mut t = T::plain();
    t.client(&[q("BEGIN")]).backend(&[c("BEGIN"), z(b'T')]).expect("Q", "CZ");
    t.client(&[p("", "SELECT g FROM generate_series(1, 10) g"), b("cur", ""), e("cur", 2), s()]);
    t.backend(&[one(), two(), row("1"), row("2"), be(b's', &[]), z(b'T')]).expect("PBES", "12DDsZ");
    t.client(&[e("cur", 10), s()]).expect("ES", "");
    t.backend(&[row("3"), err("22012"), z(b'E')]).expect("", "DEZ");
    t.client(&[q("ROLLBACK")]).backend(&[c("ROLLBACK"), z(b'I')]).expect("Q", "CZ");
}

#[test]
fn a_hit_beside_an_error_keeps_postgres_order() {
    let mut t = T::new(caching(1));
    t.client(&[
        p("", "SELECT cached"),
        b("", ""),
        dp(""),
        e("", 0),
        p("", "SELECT missing_column"),
        b("", ""),
        e("", 0),
        s(),
    ]);
    // The hit is answered by pgcache (its Parse and Bind need not reach Postgres); the rest is
    // forwarded, and the answers come back in the order Postgres would give them.
    t.expect("PBES", "12TDC");
    t.backend(&[err("42703"), z(b'I')]).expect("", "EZ");
    assert!(t.core.at_rest());
}

#[test]
fn a_batch_answered_from_the_cache_gets_its_ready_locally_unless_postgres_is_unsynced() {
    let mut t = T::new(caching(2));
    t.client(&[p("", "SELECT cached"), b("", ""), e("", 0), s()]).expect("", "12DDCZ");
    // After a Flush-ended batch Postgres may be skipping to a Sync: nothing is answered from
    // the cache, and the Sync goes to Postgres.
    t.client(&[p("x", "SELECT 1"), h()]).expect("PH", "");
    assert_eq!(t.core.refuses(), Some(Reason::Unsynced));
    t.client(&[p("", "SELECT cached"), b("", ""), e("", 0), s()]).expect("PBES", "");
    t.backend(&[one(), one(), two(), row("0"), c("SELECT 1"), z(b'I')]).expect("", "112DCZ");
    assert_eq!(t.core.refuses(), None);
}

#[test]
fn a_request_needing_the_settings_waits_for_the_probe_and_what_follows_waits_too() {
    let mut t = T::new(|core: &Core, sql: &str| match (sql.contains("cached"), core.flow.settings.known()) {
        (false, _) => Plan::forward(Reason::NoMatch),
        (true, false) => Plan::Probe,
        (true, true) => Plan::Hit { entry: entry(1), key: 1, stale: false },
    });
    t.client(&[q("SELECT cached"), q("SELECT 2")]);
    // The probe goes out hidden; the query and the one behind it wait.
    assert!(t.core.flow.parked.is_some());
    t.expect("Q", "");
    let probe_row = |name: &str, value: &str| {
        let mut body = vec![0, 3];
        for v in [name, "", value] {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        be(b'D', &body)
    };
    t.backend(&[
        t_probe(),
        probe_row(".current_user", "alice"),
        probe_row(".session_user", "alice"),
        probe_row(".search_path", "public"),
        probe_row(".transaction_isolation", "read committed"),
        probe_row(".default_transaction_isolation", "read committed"),
        c("SELECT 5"),
        z(b'I'),
    ]);
    // The first is answered from the cache now; the second goes to Postgres.
    t.expect("Q", "TDCZ");
    assert!(t.core.flow.settings.known());
    t.backend(&[row_description(), row("2"), c("SELECT 1"), z(b'I')]).expect("", "TDCZ");
}

fn t_probe() -> BytesMut {
    be(b'T', &[0, 3])
}

#[test]
fn a_row_limited_hit_is_cut_as_postgres_would_cut_it() {
    let mut t = T::new(caching(3));
    t.client(&[p("", "SELECT cached"), b("", ""), dp(""), e("", 2), s()]).expect("", "12TDDsZ");
    t.client(&[p("", "SELECT cached"), b("", ""), e("", 5), s()]).expect("", "12DDDCZ");
}

#[test]
fn a_fill_is_stored_unless_a_notice_or_an_error_comes_with_it() {
    let fill = || {
        let key = crate::cache::key::KeyBuilder::new(b'Q').str("k").finish();
        let rule = entry(0).rule.clone();
        Plan::Fill(Box::new(super::pipeline::Fill::new(
            key,
            rule,
            Vec::new(),
            Vec::new(),
            Arc::from("s"),
            None,
            1 << 20,
        )))
    };
    let mut t = T::new(move |_, _| fill());
    t.client(&[q("SELECT 1")]).backend(&[row_description(), row("1"), c("SELECT 1"), z(b'I')]).expect("Q", "TDCZ");
    assert!(t.actions.iter().any(|a| matches!(a, Action::Store(_))), "stored");
    t.actions.clear();
    t.client(&[q("SELECT 1")]).backend(&[
        row_description(),
        be(b'N', b"SNOTICE\0Mhi\0\0"),
        row("1"),
        c("SELECT 1"),
        z(b'I'),
    ]);
    assert!(!t.actions.iter().any(|a| matches!(a, Action::Store(_))), "a notice makes a result unreplayable");
    t.client(&[q("SELECT 1")]).backend(&[row_description(), err("57014"), z(b'I')]);
    assert!(!t.actions.iter().any(|a| matches!(a, Action::Store(_))), "an error is never stored");
}

#[test]
fn copy_in_through_the_extended_protocol_owes_no_answer_to_its_sync() {
    let mut t = T::plain();
    t.client(&[p("", "COPY items FROM STDIN"), b("", ""), e("", 0), s()]).expect("PBES", "");
    t.backend(&[one(), two(), be(b'G', &[0, 0, 0])]).expect("", "12G");
    t.client(&[be(b'd', b"1\n"), be(b'c', &[]), s()]).expect("dcS", "");
    t.backend(&[c("COPY 1"), z(b'I')]).expect("", "CZ");
    assert!(t.core.at_rest());
}

#[test]
fn a_statement_only_pgcache_had_is_sent_before_postgres_needs_it() {
    let mut t = T::new(caching(1));
    t.client(&[p("", "SELECT cached"), b("", ""), e("", 0), s()]).expect("", "12DCZ");
    // The client binds its unnamed statement again (another result format, not a hit here):
    // pgcache re-creates it first, hidden.
    t.decide = Box::new(|_, _| Plan::forward(Reason::NoMatch));
    t.client(&[b("", ""), e("", 0), s()]).expect("PBES", "");
    t.backend(&[one(), two(), row("0"), c("SELECT 1"), z(b'I')]).expect("", "2DCZ");
}

fn probe_answer() -> Vec<BytesMut> {
    let probe_row = |name: &str, value: &str| {
        let mut body = vec![0, 3];
        for v in [name, "", value] {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        be(b'D', &body)
    };
    vec![
        t_probe(),
        probe_row(".current_user", "alice"),
        probe_row(".session_user", "alice"),
        probe_row(".search_path", "public"),
        probe_row(".transaction_isolation", "read committed"),
        probe_row(".default_transaction_isolation", "read committed"),
        c("SELECT 5"),
        z(b'I'),
    ]
}

#[test]
fn one_probe_runs_at_a_time_and_an_answer_older_than_a_change_is_not_learned() {
    let mut t = T::new(|core: &Core, sql: &str| match (sql.contains("cached"), core.flow.settings.known()) {
        (false, _) => Plan::forward(Reason::NoMatch),
        (true, false) => Plan::Probe,
        (true, true) => Plan::Hit { entry: entry(1), key: 1, stale: false },
    });
    // A probe is running (as before a backend is handed back) when the client changes a
    // setting and asks for a cached result: the running probe is not cut short by another...
    t.core.start_probe();
    t.client(&[q("SET TimeZone = 'UTC'"), q("SELECT cached")]);
    assert!(t.core.flow.parked.is_some());
    t.expect("QQ", "");
    // ... but what it read predates the SET: it is not learned, and the request probes again.
    let answer = probe_answer();
    t.backend(&answer[..3]);
    t.backend(&answer[3..]);
    assert!(!t.core.flow.settings.known(), "an answer from before the SET");
    t.expect("Q", "");
    t.backend(&[c("SET"), z(b'I')]).expect("", "CZ");
    t.backend(&probe_answer());
    assert!(t.core.flow.settings.known());
    t.expect("", "TDCZ");
}

mod invalidation;
