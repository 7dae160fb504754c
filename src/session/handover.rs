//! Between backends: what a client is told when its session moves to another backend, and
//! what a session leaves on the backend it gives back (at the end of a transaction in
//! transaction pooling, or at its end).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::connection::SessionState;
use crate::backend::{Lease, PoolKey, Reset};
use crate::context::Context;

use super::core::Core;

/// ParameterStatus messages for values a backend reports differently from what the client
/// was last told (`reported`, brought up to date). `reported` shares the map of the backend
/// it was last brought up to date with (an idle client holds a pointer, not a copy); a name
/// only an earlier backend reported is then forgotten, and told again if it comes back.
pub(super) fn changed_parameters(
    reported: &mut Arc<BTreeMap<String, String>>,
    new: &Arc<BTreeMap<String, String>>,
) -> BytesMut {
    let mut out = BytesMut::new();
    if Arc::ptr_eq(reported, new) {
        return out;
    }
    for (name, value) in new.iter() {
        if reported.get(name) != Some(value) {
            crate::protocol::backend::parameter_status_msg(name, value, &mut out);
        }
    }
    *reported = new.clone();
    out
}

/// Transaction pooling: gives the backend back at the end of a client's transaction (see
/// [`leave`]).
pub(super) fn hand_back(ctx: &Context, key: &PoolKey, mut lease: Lease, core: &mut Core) {
    leave(ctx, &mut lease, key, core);
    ctx.stats.metrics.handoff();
    lease.release(Reset::None);
}

/// Writes down on the backend what the client left on it at the end of a transaction — its
/// settings (whoever takes it next compares them with its own) and the statements pgcache
/// prepared there.
pub(super) fn leave(ctx: &Context, lease: &mut Lease, key: &PoolKey, core: &mut Core) {
    let pool = lease.pool().clone();
    let settings = &core.flow.settings;
    let conn = lease.conn();
    // What the session leaves on the backend, as far as it is known. A session that changed
    // nothing since it was given the backend leaves it as it was given; one whose settings
    // were read back leaves exactly those; anything else (a probe that failed, custom
    // settings set under names pgcache cannot know) leaves it unknown, to be reset before
    // anyone else uses it.
    conn.state = match settings.replay(&key.user) {
        _ if settings.unknowable() => SessionState::Unknown,
        Some(replay) => SessionState::Known(replay),
        None if !core.flow.settings_touched && !settings.known() => std::mem::take(&mut conn.state),
        None => SessionState::Unknown,
    };
    conn.verified = settings.verified().cloned();
    conn.defined.extend(settings.customs().iter().cloned());
    conn.prepared = core.server.take();
    if let Some(prepared) = &conn.prepared {
        pool.accept(prepared.names(), ctx.catalog.epoch());
    }
}

/// Returns the backend to the pool if it is at rest; otherwise cancels what it runs and
/// closes it.
pub(super) fn give_back(mut lease: Lease, core: &Core) {
    lease.conn().defined.extend(core.flow.settings.customs().iter().cloned());
    let track = &core.tracker;
    if core.at_rest() {
        lease.release(if track.used { Reset::Discard } else { Reset::None });
        return;
    }
    if !track.between_requests() {
        let endpoint = lease.pool().endpoint().clone();
        let key = lease.conn_ref().key;
        tokio::spawn(async move {
            let _ = endpoint.cancel(key).await;
        });
    }
    lease.release(Reset::Close);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Arc<BTreeMap<String, String>> {
        Arc::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn a_client_is_told_only_what_its_new_backend_reports_differently() {
        let first = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        let mut reported = first.clone();
        assert!(changed_parameters(&mut reported, &first).is_empty(), "the same backend");
        let equal = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        assert!(changed_parameters(&mut reported, &equal).is_empty(), "another backend, same values");
        let other = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "Europe/Paris")]);
        let mut told = changed_parameters(&mut reported, &other);
        assert!(Arc::ptr_eq(&reported, &other), "shares the backend's map");
        let f = crate::protocol::frame::take_frame(&mut told, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'S');
        assert_eq!(
            crate::protocol::backend::parameter_status(f.body()).unwrap(),
            ("TimeZone".into(), "Europe/Paris".into())
        );
        assert!(told.is_empty(), "one message: the value that changed");
    }
}
