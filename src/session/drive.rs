//! Feeding the core: the facts it asks for that need the shared state — a statement's
//! classification (cached by text and shape), its write effects (from the catalog), and the
//! cache decision for a SELECT ([`super::decide`]) — are looked up here, and handed in. For
//! an extended-protocol batch this drives the core's planner through its needs, in message
//! order. A request the cache answers whole while the backend is idle skips all that
//! ([`super::answer`]).

use std::sync::Arc;

use crate::frontend::SessionError;
use crate::protocol::Frame;
use crate::protocol::backend::TransactionStatus;
use crate::protocol::frontend as fe;
use crate::query::Classified;
use crate::query::classifier::LARGE;

use super::answer::Answerer;
use super::core::batch::{Decided, Need};
use super::core::effect::{Step, invalidates_nothing};
use super::core::flow::Parked;
use super::core::plan::Plan;
use super::core::query;
use super::decide::Request;
use super::decide::Serve;
use super::effects;
use super::relay::Relay;

/// A request that may be answered whole from the cache ([`Relay::answered_whole`]).
enum Whole<'a> {
    /// An extended-protocol batch up to its Sync.
    Batch(&'a [Frame]),
    /// A simple Query, already classified.
    Query { frame: &'a Frame, sql: &'a str, classified: &'a Arc<Vec<Classified>> },
}

impl Relay<'_> {
    /// Looks up the effects of `c` (with its parameters, in the extended protocol), notes it in
    /// the core, and returns the step to apply when it completes.
    async fn noted(&mut self, c: &Classified, params: Option<effects::Params<'_>>) -> Step {
        let (ctx, database) = (self.ctx, &self.key.database);
        let effects = effects::of_statement(ctx, database, c, params, self.memo).await;
        let caching = ctx.caching();
        // A backend handed on must not carry settings a function or trigger set unseen: while
        // the cache is in use the effects say so; otherwise the catalog is asked here.
        let unseen = !caching
            && self.core.flow.transaction_pooling
            && effects::may_change_settings_unseen(ctx, database, c, self.memo).await;
        self.core.note(c, effects, caching, unseen)
    }

    /// A simple Query: classified, its statements noted, decided, handed to the core.
    pub(super) async fn on_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        // Non-UTF-8 SQL (e.g. a LATIN1 client) cannot be classified: it passes through as a
        // statement with unknown effects.
        let sql = query::sql_of(&frame);
        let classified = match sql {
            Some(sql) => self.ctx.classifier.classify_off_worker(sql).await,
            None => Arc::new(vec![Classified::unparseable()]),
        };
        let mut steps = Vec::new();
        for c in classified.iter() {
            steps.push(self.noted(c, None).await);
        }
        // Noted as the planner notes it, then, if it writes nothing, the short way.
        if let Some(sql) = sql
            && invalidates_nothing(&steps)
            && self.answered_whole(Whole::Query { frame: &frame, sql, classified: &classified }).await
        {
            return Ok(());
        }
        self.query(frame, classified, steps).await
    }

    /// Decides a noted Query (again, after a probe) and hands it to the core.
    async fn query(
        &mut self,
        frame: Frame,
        classified: Arc<Vec<Classified>>,
        steps: Vec<Step>,
    ) -> Result<(), SessionError> {
        let plan = match query::candidate(&frame, &classified, &steps) {
            Some((sql, c)) => Some(self.decide(sql, c, Request::Simple, Some(frame.raw())).await?),
            None => None,
        };
        if !matches!(plan, Some(Plan::Hit { .. } | Plan::Probe)) {
            self.throttle(classified.len()).await;
        }
        self.core.query(frame, classified, steps, plan);
        Ok(())
    }

    /// Waits for the pool's turn to send `n` statements to Postgres
    /// (`pool.max_statements_per_second`) — in session pooling, outside a transaction (see
    /// [`crate::backend::throttle`]) — or until the server shuts down. A statement waiting its
    /// turn has not reached Postgres: a CancelRequest meanwhile finds nothing to cancel.
    pub(super) async fn throttle(&self, n: usize) {
        let ctx = self.ctx;
        if n == 0
            || ctx.config().pool.max_statements_per_second == 0
            || self.core.flow.gives_backend_back()
            || self.core.tracker.status != TransactionStatus::Idle
        {
            return;
        }
        let pool = ctx.pools.get(self.key);
        tokio::select! {
            _ = pool.throttle(u32::try_from(n).unwrap_or(u32::MAX)) => {}
            _ = ctx.shutdown.cancelled() => {}
            _ = ctx.force_close.cancelled() => {}
        }
    }

    /// [`Relay::run_batch`] once the pool may send its Executes (an extended-protocol batch
    /// counts one statement per Execute, hits it holds included).
    pub(super) async fn send_batch(&mut self) -> Result<(), SessionError> {
        let executes = self.core.flow.batch.iter().filter(|f| f.tag() == fe::EXECUTE).count();
        self.throttle(executes).await;
        self.run_batch().await
    }

    /// Plans and sends the collected extended-protocol batch.
    pub(super) async fn run_batch(&mut self) -> Result<(), SessionError> {
        let ctx = self.ctx;
        // Large statements are classified off the runtime's workers first.
        let mut large = std::collections::HashMap::new();
        for f in self.core.flow.batch.iter().filter(|f| f.tag() == fe::PARSE && f.raw().len() > LARGE) {
            if let Some(sql) = fe::parse(f.body()).ok().and_then(|p| std::str::from_utf8(p.sql).ok()) {
                large.insert(sql.to_owned(), ctx.classifier.classify_off_worker(sql).await);
            }
        }
        let classify = |sql: &str| large.get(sql).cloned().unwrap_or_else(|| ctx.classifier.classify(sql));
        let Some(mut planner) = self.core.begin_batch(&classify) else {
            return Ok(());
        };
        let mut need = planner.next(self.core);
        while let Some(n) = need {
            need = match n {
                Need::Effects { statement, bind } => {
                    let params = bind.as_ref().map(|bind| effects::Params { types: &statement.param_types, bind });
                    let mut all = Vec::new();
                    for c in statement.classified.iter() {
                        all.push(self.noted(c, params).await);
                    }
                    match planner.effects(self.core, all) {
                        Some(decision) => Some(decision),
                        None => planner.next(self.core),
                    }
                }
                Need::Decision { statement, bind, .. } => {
                    let req = Request::Extended { param_types: &statement.param_types, bind: &bind };
                    let select = statement.select().expect("a decision is asked only for a single SELECT");
                    let plan = self.decide(&statement.sql, select, req, None).await?;
                    if planner.decision(self.core, plan) == Decided::Parked {
                        return Ok(());
                    }
                    planner.next(self.core)
                }
            };
        }
        planner.finish(self.core);
        Ok(())
    }

    /// The short way for a request the cache answers whole while the backend is idle (no
    /// transaction, nothing owed, nothing unsynced, the session not refused the cache): the
    /// same answer, statistics and statement bookkeeping as the planner's, without planning
    /// ([`Answerer`]). Returns whether it answered; if not, nothing changed.
    async fn answered_whole(&mut self, request: Whole<'_>) -> bool {
        let core = &mut *self.core;
        // Nothing owed covers the settings probe too (it is a pipeline item while it runs).
        let idle =
            core.tracker.status == TransactionStatus::Idle && core.flow.pipeline.is_empty() && core.refuses().is_none();
        // Under a statement throttle the planner's way counts every Execute, hits included
        // (see `send_batch`): there the short way is always tried, so hits take no token.
        let throttled = self.ctx.config().pool.max_statements_per_second > 0 && !core.flow.gives_backend_back();
        if !idle || !self.ctx.caching() || !(throttled || core.flow.short_way.worth_trying()) {
            return false;
        }
        let (ctx, key) = (self.ctx, self.key);
        let mut a = Answerer { ctx, key, flow: &mut core.flow, memo: self.memo, serve: Serve::Attached, fill_at: None };
        let answer = match request {
            Whole::Batch(frames) => a.answer(frames, false).await,
            Whole::Query { frame, sql, classified } => a.answer_simple(frame, sql, classified, false).await,
        };
        core.flow.short_way.answered(answer.is_some());
        let Some(answer) = answer else { return false };
        core.to_client.push(answer);
        true
    }

    /// An extended-protocol batch up to its Sync, answered whole if it can be
    /// ([`Relay::answered_whole`]).
    pub(super) async fn answered_batch(&mut self, frames: &[Frame]) -> bool {
        self.answered_whole(Whole::Batch(frames)).await
    }

    /// A request parked for the probe, decided now that the settings are known.
    pub(super) async fn resume(&mut self, parked: Parked) -> Result<(), SessionError> {
        match parked {
            Parked::Query { frame, classified, steps } => self.query(frame, classified, steps).await?,
            Parked::Batch => self.run_batch().await?,
        }
        self.carry_out();
        Ok(())
    }
}
