//! `-e trace=…`: which calls `--trace` shows, in strace's syntax (issue 6).
//!
//! Accepted: `trace=connect,accept`, `connect,accept`, `trace=network`
//! (also `%network`, `%net`), `all`, `none`, and a leading `!` that negates
//! the whole set (`trace=!connect`). Names are the syscalls `--trace` can
//! see (the socket family SAPS traps); an unknown name is an error.

use super::decode::SYSCALLS;
use std::fmt;
use std::str::FromStr;

/// A set of traced syscalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceFilter {
    /// Bit `i` set: `SYSCALLS[i]` is traced.
    mask: u32,
    /// Whether calls outside `SYSCALLS` are traced (only `all`/negations).
    others: bool,
}

/// A filter expression that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(String);

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterError {}

const ALL: u32 = (1 << SYSCALLS.len()) - 1;

impl TraceFilter {
    /// Whether calls of syscall `nr` are shown.
    pub fn allows(&self, nr: i64) -> bool {
        match SYSCALLS.iter().position(|(n, _)| *n == nr) {
            Some(i) => self.mask & (1 << i) != 0,
            None => self.others,
        }
    }
}

impl FromStr for TraceFilter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, FilterError> {
        let expr = match s.split_once('=') {
            Some(("trace", rest)) => rest,
            Some((q, _)) => {
                return Err(FilterError(format!(
                    "invalid filter '{q}': only trace=… is supported"
                )))
            }
            None => s,
        };
        let (negate, list) = match expr.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, expr),
        };
        let mut mask = 0;
        let mut others = false;
        for name in list.split(',') {
            match name {
                "all" => {
                    mask = ALL;
                    others = true;
                }
                "none" => {}
                "network" | "%network" | "%net" => mask = ALL,
                _ => match SYSCALLS.iter().position(|(_, n)| *n == name) {
                    Some(i) => mask |= 1 << i,
                    None => return Err(FilterError(format!("invalid system call '{name}'"))),
                },
            }
        }
        Ok(if negate {
            TraceFilter {
                mask: !mask & ALL,
                others: !others,
            }
        } else {
            TraceFilter { mask, others }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> TraceFilter {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn names_select_only_those_calls() {
        for expr in ["trace=connect,accept", "connect,accept"] {
            let f = parse(expr);
            assert!(f.allows(libc::SYS_connect) && f.allows(libc::SYS_accept));
            assert!(!f.allows(libc::SYS_accept4) && !f.allows(libc::SYS_socket));
        }
    }

    #[test]
    fn network_and_all_select_every_socket_call() {
        for expr in ["trace=network", "%network", "all"] {
            let f = parse(expr);
            assert!(SYSCALLS.iter().all(|(nr, _)| f.allows(*nr)), "{expr}");
        }
        assert!(parse("all").allows(libc::SYS_read));
        assert!(!parse("network").allows(libc::SYS_read));
    }

    #[test]
    fn negation_selects_the_rest() {
        let f = parse("trace=!connect");
        assert!(!f.allows(libc::SYS_connect));
        assert!(f.allows(libc::SYS_bind) && f.allows(libc::SYS_accept4));
        assert!(!parse("!all").allows(libc::SYS_bind));
    }

    #[test]
    fn unknown_names_are_errors_not_panics() {
        for bad in [
            "trace=conect",
            "signal=all",
            "",
            "trace=",
            "connect,,accept",
        ] {
            assert!(bad.parse::<TraceFilter>().is_err(), "{bad:?} parsed");
        }
        let e = "trace=conect".parse::<TraceFilter>().unwrap_err();
        assert_eq!(e.to_string(), "invalid system call 'conect'");
    }
}
