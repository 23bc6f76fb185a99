//! `--allow-ports`: which ports nodes may bind and listen on (DESIGN.md
//! "Security and failure"). A refused bind answers `EACCES` and is logged.

use std::fmt;
use std::str::FromStr;

/// A list of ports and inclusive ranges, e.g. `80,443,8000-9000`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct AllowPorts(Vec<(u16, u16)>);

/// A malformed `--allow-ports` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad port list `{list}`: `{item}` is not a port (1-65535) or a range like 8000-9000")]
pub struct AllowPortsError {
    list: String,
    item: String,
}

impl AllowPorts {
    pub fn allows(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
    }
}

impl FromStr for AllowPorts {
    type Err = AllowPortsError;
    fn from_str(s: &str) -> Result<Self, AllowPortsError> {
        let bad = |item: &str| AllowPortsError {
            list: s.to_string(),
            item: item.to_string(),
        };
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p > 0);
        s.split(',')
            .map(|item| {
                let (lo, hi) = item.split_once('-').unwrap_or((item, item));
                match (port(lo), port(hi)) {
                    (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                    _ => Err(bad(item)),
                }
            })
            .collect::<Result<_, _>>()
            .map(AllowPorts)
    }
}

impl TryFrom<String> for AllowPorts {
    type Error = AllowPortsError;
    fn try_from(s: String) -> Result<Self, AllowPortsError> {
        s.parse()
    }
}

impl fmt::Display for AllowPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            if lo == hi {
                write!(f, "{sep}{lo}")?;
            } else {
                write!(f, "{sep}{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_parse_check_and_print() {
        let a: AllowPorts = "80,443, 8000-9000".parse().unwrap();
        assert!(a.allows(80) && a.allows(8000) && a.allows(9000) && a.allows(443));
        assert!(!a.allows(81) && !a.allows(9001) && !a.allows(22));
        assert_eq!(a.to_string(), "80,443,8000-9000");
        for bad in ["", "http", "0", "9000-8000", "1-70000", "80,,443"] {
            let e = bad.parse::<AllowPorts>().unwrap_err();
            assert!(e.to_string().contains("bad port list"), "{bad}: {e}");
        }
    }
}
