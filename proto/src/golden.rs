//! Golden files of a versioned encoding, for tests: a fixed sample's
//! encoding is kept in the repository, in hex under a `version N` line, so
//! that a change of the format without a bump of its version fails a test.
//! Blessing (the given environment variable) rewrites the file, but never
//! the file of a version whose encoding changed. Test support only; it
//! reads and writes files.

use std::path::Path;

/// One golden file.
pub struct Golden<'a> {
    pub path: &'a Path,
    /// Where the sample comes from, for the file's comment.
    pub sample: &'a str,
    /// The version constant's name and value.
    pub version_name: &'a str,
    pub version: u32,
    /// The variable that rewrites the file, and the command to run.
    pub bless_var: &'a str,
    pub bless_cmd: &'a str,
}

impl Golden<'_> {
    fn text(&self, wire: &[u8]) -> String {
        let mut text = format!(
            "# The encoding of {}, in hex.\n# A change of the format bumps {}; then\n# {}=1 {} rewrites this file.\n",
            self.sample, self.version_name, self.bless_var, self.bless_cmd
        );
        text += &format!("version {}\n", self.version);
        for line in wire.chunks(32) {
            text.extend(line.iter().map(|b| format!("{b:02x}")));
            text.push('\n');
        }
        text
    }

    /// Checks `wire` against the file (panicking as a test does), or
    /// blesses it; the file's octets, to decode, unless it blessed.
    pub fn check(&self, wire: &[u8]) -> Option<Vec<u8>> {
        let (name, v) = (self.version_name, self.version);
        let text = self.text(wire);
        let golden = std::fs::read_to_string(self.path).unwrap_or_default();
        let version = golden
            .lines()
            .find_map(|l| l.strip_prefix("version "))
            .and_then(|v| v.parse::<u32>().ok());
        if std::env::var_os(self.bless_var).is_some() {
            assert!(
                golden == text || version != Some(v),
                "the encoding of version {v} changed: bump {name}, then bless"
            );
            std::fs::write(self.path, text).unwrap();
            return None;
        }
        assert_eq!(
            version,
            Some(v),
            "{} is not of this {name}: bless it with {}=1",
            self.path.display(),
            self.bless_var
        );
        assert!(
            golden == text,
            "the encoding of version {v} changed: bump {name} and bless with {}=1\nexpected:\n{golden}\nfound:\n{text}",
            self.bless_var
        );
        Some(
            golden
                .lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("version "))
                .flat_map(|l| {
                    (0..l.len())
                        .step_by(2)
                        .map(move |i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                })
                .collect(),
        )
    }
}
