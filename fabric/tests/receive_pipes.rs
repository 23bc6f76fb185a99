//! The process-wide cap on receive pipes (`splice::MAX_RECEIVE_PIPES`), in
//! a test binary of its own: the unit tests' bulk relays hold receive
//! pipes of the same process while they run.

use saps_fabric::splice::{ReceivePipe, MAX_RECEIVE_PIPES, SPLICE_MIN};

#[test]
fn receive_pipes_stop_at_the_cap_and_a_dropped_one_frees_its_slot() {
    let mut held = Vec::new();
    while let Some(p) = ReceivePipe::new() {
        assert!(
            p.room() >= 4 * SPLICE_MIN,
            "a receive pipe is large: {}",
            p.room()
        );
        held.push(p);
        assert!(held.len() <= MAX_RECEIVE_PIPES, "past the cap");
    }
    // Short of the cap only where the user's pipe limit ran out first.
    if held.len() < MAX_RECEIVE_PIPES {
        println!(
            "skipped the cap check: only {} pipes of 1 MiB could be made \
             (/proc/sys/fs/pipe-user-pages-soft)",
            held.len()
        );
        return;
    }
    assert!(ReceivePipe::new().is_none(), "the cap holds");
    held.pop();
    let again = ReceivePipe::new();
    assert!(again.is_some(), "a dropped pipe gives its slot back");
    held.push(again.unwrap());
    assert!(ReceivePipe::new().is_none());
}
