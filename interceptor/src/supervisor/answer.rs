//! Answering a serviced call: at once, or from the task it waits in, and
//! tracing it first (so a process's trace lines are in call order).

use super::call::{Call, Outcome};
use super::state::SupervisorState;
use super::trace::CallRecord;
use crate::notify::{Delivery, Reply};
use std::sync::Arc;

/// Answers a call (unless a task will) and traces it.
pub(crate) fn finish(sh: &Arc<SupervisorState>, call: Call, outcome: Outcome) {
    // The duplicate of the fd argument goes before the program can go on:
    // kept past the answer, it would hide a close the program makes right
    // after (a listener closed after its accept would still look open to
    // the reap of the next bind, which then fails with EADDRINUSE).
    let mut call = call;
    call.dup = None;
    let (result, answer) = match outcome {
        Outcome::Defer(task) => {
            let me = sh.clone();
            sh.rt.spawn(async move {
                let (call, outcome) = task(me.clone(), call).await;
                finish(&me, call, outcome);
            });
            return;
        }
        Outcome::Answered(v) => (Reply::Value(v), None),
        Outcome::Reply(r) => (r, Some(r)),
    };
    let id = call.n.id;
    let op = call.op;
    // Trace before answering, so a process's lines are in call order.
    if let Some(t) = &sh.config.tracer {
        call.note.io_server = Some(sh.config.io_server.clone());
        call.note.node = Some(sh.config.node.clone());
        t.record(&CallRecord {
            pid: call.pid() as i32,
            nr: call.n.nr as i64,
            args: call.n.args,
            detail: call.detail,
            result,
            start: call.wall,
            duration: call.start.elapsed(),
            note: call.note,
        });
    }
    if let Some(r) = answer {
        let taken = op.and_then(|ino| Some((ino, sh.ops.take(ino, id)?)));
        let answered = match sh.notifier.respond(id, r) {
            Ok(d) => d == Delivery::Delivered,
            Err(e) => {
                tracing::debug!(error = %e, "answering a call failed (target interrupted?)");
                false
            }
        };
        if let (Some((ino, op)), false) = (taken, answered) {
            sh.ops.put_back(ino, op);
        }
    }
}
