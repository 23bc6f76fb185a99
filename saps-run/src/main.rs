//! `saps-run -- PROGRAM [ARGS]...`: runs an unmodified program whose TCP
//! sockets are virtual sockets served by a SAPS io-server (DESIGN.md,
//! "Virtual TCP sockets").
//!
//! A thin command line over the application node
//! (`saps_interceptor::node`): with `--io-server URL` the node joins a
//! remote io-server over the fabric; without it an io-server runs
//! in-process on the host's own stack ([`saps_run::link`]). The node serves
//! every process of the program's tree until the last one has exited;
//! saps-run exits with the main process's status and forwards the signals
//! it receives to the program (docs/interceptor.md, "The program's process
//! tree").

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use saps_interceptor::node::{ApplicationNode, NodeConfig, NodeError};
use saps_run::cli::{self, Args};
use saps_run::{link, signals};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The program inherits saps-run's environment; where the fabric's
    // token lives is none of its business. Removed before any thread
    // starts.
    std::env::remove_var(cli::TOKEN_FILE_ENV);
    init_logging();
    let asked = matches.value_source("native_sockets") == Some(ValueSource::CommandLine);
    if asked && args.native_sockets == cli::Switch::On && !args.native_sockets() {
        eprintln!(
            "saps-run: --native-sockets on needs the embedded io-server with --zero-relay on, \
             --loopback local, a wildcard --address and no --allow-ports: virtual sockets instead"
        );
    }
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("saps-run: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log that cannot be written (standard error a closed pipe) is
        // lost quietly: the fallback report would panic the thread.
        .log_internal_errors(false)
        .init();
}

fn run(args: Args) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.into())
        .thread_name("saps-run")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (io_server, _embedded) = rt.block_on(link::io_server(&args))?;
    let config = NodeConfig {
        name: args.node_name(),
        weight: args.weight,
        loopback: args.loopback.into(),
        io_server,
    };
    let node = rt.block_on(ApplicationNode::join(config))?;
    let tracer = cli::tracer(&args)?;
    // On this (the main) thread, which lives as long as saps-run: the
    // program's parent-death signal follows the thread that forked it.
    let started = node.start(
        rt.handle(),
        &args.program,
        &args.args,
        tracer.clone().map(|t| t as _),
    );
    let program = match started {
        Ok(p) => p,
        Err(e @ NodeError::Exec(_)) => {
            // Like a shell: 127 for a program that cannot be run.
            eprintln!("saps-run: {e}");
            return Ok(127);
        }
        Err(e) => return Err(e.into()),
    };
    signals::forward(rt.handle(), &program.signals());
    if !args.no_sandbox {
        // The program runs, under its own filter; from here saps-run's
        // threads make only the calls of their allow-list (the embedded
        // io-server's too, when there is one).
        let embedded: &[i64] = if args.io_server.is_none() {
            saps_sandbox::IO_SERVER
        } else {
            &[]
        };
        saps_sandbox::confine(
            "saps-run",
            &[saps_sandbox::RUNTIME, saps_sandbox::NODE, embedded],
        )
        .context("confining saps-run")?;
    }
    let status = program.wait()?;
    if let Some(t) = tracer {
        t.finish();
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(status.exit_code().clamp(0, 255) as u8)
}
