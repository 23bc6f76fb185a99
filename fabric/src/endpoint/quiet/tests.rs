use super::*;

const S: Duration = Duration::from_secs(1);

fn limits(idle: u64, half: u64) -> QuietLimits {
    let d = |s| (s > 0).then(|| Duration::from_secs(s));
    QuietLimits {
        idle: d(idle),
        half_closed: d(half),
    }
}

#[test]
fn a_connection_that_moves_no_octet_expires_after_the_idle_limit() {
    let t0 = Instant::now();
    let l = limits(10, 2);
    let mut q = Quiet::new(t0);
    assert_eq!(q.sweep(t0 + 9 * S, 0, false, &l), None);
    assert_eq!(q.sweep(t0 + 10 * S, 0, false, &l), Some(Expiry::Idle));
}

#[test]
fn every_octet_moved_restarts_the_idle_clock() {
    let t0 = Instant::now();
    let l = limits(10, 0);
    let mut q = Quiet::new(t0);
    for (i, moved) in [5u64, 9, 1000].into_iter().enumerate() {
        let at = t0 + 9 * S * (i as u32 + 1);
        assert_eq!(q.sweep(at, moved, false, &l), None, "sweep {i}");
    }
    // The last change was seen at 27 s.
    assert_eq!(q.sweep(t0 + 36 * S, 1000, false, &l), None);
    assert_eq!(q.sweep(t0 + 37 * S, 1000, false, &l), Some(Expiry::Idle));
}

#[test]
fn a_half_closed_connection_has_the_shorter_limit_from_the_nodes_fin() {
    let t0 = Instant::now();
    let l = limits(300, 2);
    let mut q = Quiet::new(t0);
    assert_eq!(q.sweep(t0 + S, 100, false, &l), None);
    // The node's Fin went out: seen at 2 s, a change.
    assert_eq!(q.sweep(t0 + 2 * S, 100, true, &l), None);
    assert_eq!(q.sweep(t0 + 3 * S, 100, true, &l), None);
    assert_eq!(q.sweep(t0 + 4 * S, 100, true, &l), Some(Expiry::HalfClosed));
}

#[test]
fn with_no_half_closed_limit_the_idle_limit_holds_and_with_none_nothing_expires() {
    let t0 = Instant::now();
    let mut q = Quiet::new(t0);
    assert_eq!(q.sweep(t0, 0, true, &limits(5, 0)), None);
    assert_eq!(
        q.sweep(t0 + 5 * S, 0, true, &limits(5, 0)),
        Some(Expiry::HalfClosed)
    );
    let mut q = Quiet::new(t0);
    assert_eq!(q.sweep(t0 + 3600 * S, 0, false, &limits(0, 0)), None);
    assert_eq!(q.sweep(t0 + 3600 * S, 0, false, &limits(0, 2)), None);
}
