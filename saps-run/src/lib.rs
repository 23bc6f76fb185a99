//! `saps-run`'s library half: the command line ([`cli`], which
//! `man/saps-run.1` is generated from), the io-server it joins ([`link`]:
//! the remote one, or an embedded one it starts), the signals it passes on
//! ([`signals`]) and the `--trace` writer ([`trace`]). The application
//! node itself — joining, running the program under the supervisor,
//! rejoining — is `saps_interceptor::node`; the binary (`main.rs`) parses
//! the arguments, runs the node and exits with its program's status.

pub mod cli;
pub mod link;
pub mod signals;
pub mod trace;
