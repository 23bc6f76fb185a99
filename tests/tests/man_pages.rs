//! The man pages in `man/` (DESIGN.md "Workspace layout") are generated
//! from the binaries' clap definitions with `clap_mangen`: `saps-run.1`,
//! `io-server.8` and one page per io-server command (`io-server-status.8`,
//! `io-server-weight.8`). This test renders them again and fails when a
//! committed page no longer matches its definition, or when `man/` holds a
//! page nothing generates. After changing a flag or its help, regenerate:
//!
//! ```text
//! SAPS_BLESS_MAN=1 cargo test -p saps-tests --test man_pages
//! ```

use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Set to regenerate the committed pages instead of checking them.
const BLESS: &str = "SAPS_BLESS_MAN";

/// Every page: file name → roff, for `cmd` and its commands, in `section`.
/// `related` are the other programs' pages, for SEE ALSO.
fn pages(cmd: clap::Command, section: &str, related: &[&str]) -> BTreeMap<String, String> {
    // `help` is --help again; it gets no page.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let subs: Vec<clap::Command> = cmd.get_subcommands().cloned().collect();
    let source = format!("SAPS {}", cmd.get_version().unwrap_or_default());
    let family: Vec<String> = std::iter::once(&cmd)
        .chain(&subs)
        .map(|c| format!("{}({section})", display_name(c)))
        .chain(related.iter().map(|r| r.to_string()))
        .collect();
    std::iter::once(cmd.clone())
        .chain(subs)
        .map(|c| {
            let me = format!("{}({section})", display_name(&c));
            let see_also: Vec<&str> = family
                .iter()
                .map(String::as_str)
                .filter(|p| *p != me)
                .collect();
            let file = format!("{}.{section}", display_name(&c));
            (file, render(c, section, &source, &see_also))
        })
        .collect()
}

fn display_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or(cmd.get_name())
}

/// clap_mangen's sections, with the after-help examples as EXAMPLES (kept
/// line by line, not filled into a paragraph) and a SEE ALSO section.
fn render(cmd: clap::Command, section: &str, source: &str, see_also: &[&str]) -> String {
    let has_args = cmd.get_arguments().any(|a| !a.is_hide_set());
    let has_subs = cmd.get_subcommands().next().is_some();
    let examples = cmd.get_after_help().map(|h| h.to_string());
    let man = Man::new(cmd.after_help(None::<&str>))
        .section(section)
        .source(source)
        .manual("SAPS Manual");
    type Part<'a> = Box<dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()> + 'a>;
    let mut parts: Vec<Part> = vec![
        Box::new(|w| man.render_title(w)),
        Box::new(|w| man.render_name_section(w)),
        Box::new(|w| man.render_synopsis_section(w)),
        Box::new(|w| man.render_description_section(w)),
    ];
    if has_args {
        parts.push(Box::new(|w| man.render_options_section(w)));
    }
    if has_subs {
        parts.push(Box::new(|w| man.render_subcommands_section(w)));
    }
    let mut extra = Roff::new();
    if let Some(examples) = examples {
        extra.control("SH", ["EXAMPLES"]).control("nf", []);
        for line in examples.lines().filter(|l| *l != "Examples:") {
            extra.text([roman(line)]);
        }
        extra.control("fi", []);
    }
    extra.control("SH", ["SEE ALSO"]);
    let refs: Vec<_> = see_also
        .iter()
        .enumerate()
        .flat_map(|(i, r)| [roman(if i == 0 { "" } else { ", " }), bold(*r)])
        .collect();
    extra.text(refs);
    parts.push(Box::new(move |w| extra.to_writer(w)));
    // Each part starts with roff's apostrophe preamble; keep the first.
    let preamble = Roff::new().render();
    let mut page = String::new();
    for part in parts {
        let mut out = Vec::new();
        part(&mut out).expect("rendering into memory");
        let text = String::from_utf8(out).expect("clap_mangen writes UTF-8");
        let body = text.strip_prefix(preamble.as_str()).unwrap_or(&text);
        if page.is_empty() {
            page.push_str(&preamble);
        }
        page.push_str(body);
    }
    page
}

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../man")
}

/// Checks (or with `SAPS_BLESS_MAN=1` rewrites) the committed pages.
fn check(pages: &BTreeMap<String, String>) {
    for (file, page) in pages {
        let path = man_dir().join(file);
        if std::env::var_os(BLESS).is_some() {
            std::fs::write(&path, page).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == *page,
            "man/{file} is stale: it no longer matches the clap definitions; \
             regenerate with `{BLESS}=1 cargo test -p saps-tests --test man_pages`"
        );
    }
}

/// Every long flag and command of `cmd` appears in `page`.
fn assert_documents_everything(cmd: &clap::Command, page: &str) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(page.contains(&roff), "the page documents --{long}");
        }
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        assert!(
            page.contains(&format!("io\\-server\\-{}(8)", sub.get_name())),
            "the page points to the page of `{}`",
            sub.get_name()
        );
    }
}

fn saps_run_pages() -> BTreeMap<String, String> {
    pages(saps_run::cli::Args::command(), "1", &["io-server(8)"])
}

fn io_server_pages() -> BTreeMap<String, String> {
    pages(saps_io_server::cli::Cli::command(), "8", &["saps-run(1)"])
}

#[test]
fn saps_run_1_matches_its_clap_definition() {
    let pages = saps_run_pages();
    assert_eq!(pages.keys().collect::<Vec<_>>(), ["saps-run.1"]);
    let page = &pages["saps-run.1"];
    assert!(page.contains(".TH saps-run 1 "), "{page}");
    assert!(page.contains("rdma://"), "the URL forms are documented");
    assert!(page.contains(".SH EXAMPLES\n.nf\n"), "{page}");
    assert!(
        page.contains(".SH \"SEE ALSO\"\n\\fBio\\-server(8)\\fR"),
        "{page}"
    );
    assert_documents_everything(&saps_run::cli::Args::command(), page);
    check(&pages);
}

#[test]
fn io_server_8_and_its_commands_match_their_clap_definitions() {
    let pages = io_server_pages();
    assert_eq!(
        pages.keys().collect::<Vec<_>>(),
        [
            "io-server-status.8",
            "io-server-upgrade.8",
            "io-server-weight.8",
            "io-server.8"
        ]
    );
    let page = &pages["io-server.8"];
    assert!(page.contains(".TH io-server 8 "), "{page}");
    assert!(page.contains("rdma://"), "the URL forms are documented");
    assert_documents_everything(&saps_io_server::cli::Cli::command(), page);
    assert!(pages["io-server-weight.8"].contains("\\-\\-control"));
    check(&pages);
}

/// `man/` holds no page that nothing generates (a removed command's);
/// with `SAPS_BLESS_MAN=1` such pages are deleted.
#[test]
fn man_holds_no_page_that_nothing_generates() {
    let mut expected = saps_run_pages();
    expected.extend(io_server_pages());
    for entry in std::fs::read_dir(man_dir()).expect("man/ exists") {
        let entry = entry.expect("reading man/");
        let name = entry.file_name().to_string_lossy().into_owned();
        if expected.contains_key(&name) {
            continue;
        }
        if std::env::var_os(BLESS).is_some() {
            std::fs::remove_file(entry.path()).expect("removing a stale page");
        } else {
            panic!("man/{name} is not generated from any clap definition");
        }
    }
}
