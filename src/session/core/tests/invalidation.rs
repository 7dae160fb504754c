//! Invalidation in the core: when a write's effects are carried out (at its CommandComplete,
//! when its transaction commits, once if both come together), in the order Postgres answers a
//! pipeline.

use super::*;
use crate::session::core::superseded;

/// The invalidations carried out since the last look: whether each was of a committed
/// transaction.
fn invalidations(t: &mut T) -> Vec<bool> {
    t.actions
        .drain(..)
        .filter_map(|a| match a {
            Action::Invalidate { effects, committed } if !effects.is_empty() => Some(committed),
            _ => None,
        })
        .collect()
}

#[test]
fn an_autocommit_write_answered_at_once_is_invalidated_once() {
    let mut t = T::plain();
    t.client(&[q("UPDATE items SET v = 1")]).backend(&[c("UPDATE 1"), z(b'I')]);
    let at = |committed: bool| {
        t.actions.iter().position(
            |a| matches!(a, Action::Invalidate { effects, committed: c } if *c == committed && !effects.is_empty()),
        )
    };
    let (first, last) = (at(false).unwrap(), at(true).unwrap());
    assert!(first < last);
    let Action::Invalidate { effects, .. } = &t.actions[first] else { unreachable!() };
    let effects = &effects.clone();
    assert!(superseded(effects, &t.actions[first + 1..]), "only records between them");
    // Never across anything else, nor by an invalidation of less.
    let mut between: Vec<Action> = vec![Action::Committed { ddl: false }];
    between.extend(t.actions.drain(first + 1..));
    assert!(!superseded(effects, &between));
    let less = [Action::Invalidate { effects: Vec::new(), committed: true }];
    assert!(!superseded(effects, &less));
    assert!(!superseded(effects, &[]));
}

#[test]
fn writes_invalidate_on_completion_and_transactions_on_commit_only() {
    let mut t = T::plain();
    t.client(&[q("UPDATE items SET v = 1")]).backend(&[c("UPDATE 1"), z(b'I')]);
    assert_eq!(invalidations(&mut t), vec![false, true], "at CommandComplete, committed at ReadyForQuery");
    t.client(&[q("BEGIN")]).backend(&[c("BEGIN"), z(b'T')]);
    t.client(&[q("UPDATE items SET v = 2")]).backend(&[c("UPDATE 1"), z(b'T')]);
    assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "nothing until the transaction ends");
    t.client(&[q("COMMIT")]).backend(&[c("COMMIT"), z(b'I')]);
    assert_eq!(invalidations(&mut t), vec![true]);
    t.client(&[q("BEGIN")]).backend(&[c("BEGIN"), z(b'T')]);
    t.client(&[q("UPDATE items SET v = 3")]).backend(&[c("UPDATE 1"), z(b'T')]);
    t.client(&[q("ROLLBACK")]).backend(&[c("ROLLBACK"), z(b'I')]);
    assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "a rollback invalidates nothing");
}

#[test]
fn a_pipelined_transaction_is_invalidated_when_postgres_commits_it_not_when_an_earlier_one_ends() {
    for first in ["SELECT 1", "SELECT 1/0"] {
        let mut t = T::plain();
        t.client(&[q(first), q("BEGIN"), q("UPDATE items SET v = 1")]);
        if first == "SELECT 1" {
            t.backend(&[row_description(), row("1"), c("SELECT 1"), z(b'I')]);
        } else {
            t.backend(&[err("22012"), z(b'I')]);
        }
        assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "the UPDATE has not run yet");
        t.backend(&[c("BEGIN"), z(b'T'), c("UPDATE 1"), z(b'T')]);
        assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "not committed yet");
        t.client(&[q("COMMIT")]).backend(&[c("COMMIT")]);
        assert_eq!(invalidations(&mut t), vec![true], "at the COMMIT's CommandComplete ({first})");
        t.backend(&[z(b'I')]);
        assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "once");
    }
}

#[test]
fn a_rollback_pipelined_behind_an_autocommit_write_does_not_undo_it() {
    let mut t = T::plain();
    t.client(&[q("UPDATE items SET v = 1"), q("ROLLBACK")]);
    t.backend(&[c("UPDATE 1"), z(b'I'), c("ROLLBACK"), z(b'I')]);
    assert_eq!(invalidations(&mut t), vec![false, true], "the write committed: everyone hears of it");
}

#[test]
fn a_commit_inside_a_request_invalidates_before_the_rest_of_it_runs() {
    let mut t = T::plain();
    t.client(&[q("BEGIN; UPDATE items SET v = 1; COMMIT; BEGIN; SELECT 1")]);
    t.backend(&[c("BEGIN"), c("UPDATE 1")]);
    // (The request began outside a transaction block: its write is invalidated here at once,
    // wider than needed, and again when it commits.)
    assert_eq!(invalidations(&mut t), vec![false]);
    t.backend(&[c("COMMIT")]);
    assert_eq!(invalidations(&mut t), vec![true], "committed, though the request goes on in a new transaction");
    t.backend(&[c("BEGIN"), row_description(), row("1"), c("SELECT 1"), z(b'T')]);
    assert_eq!(invalidations(&mut t), Vec::<bool>::new());
    // A COMMIT of a failed transaction rolls it back: nothing to invalidate.
    t.client(&[q("COMMIT")]).backend(&[c("COMMIT"), z(b'I')]);
    t.client(&[q("BEGIN")]).backend(&[c("BEGIN"), z(b'T')]);
    t.client(&[q("UPDATE items SET v = 2")]).backend(&[c("UPDATE 1"), z(b'T')]);
    t.client(&[q("SELECT 1/0")]).backend(&[err("22012"), z(b'E')]);
    t.client(&[q("COMMIT")]).backend(&[c("ROLLBACK"), z(b'I')]);
    assert_eq!(invalidations(&mut t), Vec::<bool>::new(), "rolled back");
    // ... and the next transaction starts clean.
    t.client(&[q("UPDATE items SET v = 3")]).backend(&[c("UPDATE 1"), z(b'I')]);
    assert_eq!(invalidations(&mut t), vec![false, true]);
}
