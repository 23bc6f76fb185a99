//! `saps-run`'s library half: the command line ([`cli`], which
//! `man/saps-run.1` is generated from) and the `--trace` writer
//! ([`trace`]). The binary (`main.rs`) joins the io-server, starts the
//! program under the supervisor and exits with its status.

pub mod cli;
pub mod trace;
