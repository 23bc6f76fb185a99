//! The fabric's shared token on disk, read the same way by the io-server
//! and by every node: refused when other users may read or write the file
//! (as ssh refuses such a private key: a secret every user may read is no
//! secret), and trimmed of surrounding white space.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error(transparent)]
    Read(std::io::Error),
    /// Its mode gives other users some access (`mode & 0o007`).
    #[error("the token file is open to other users (mode {mode:04o})")]
    NotPrivate { mode: u32 },
}

/// The token in `path`, without surrounding white space (possibly empty:
/// what that means is the caller's to say).
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    let mode = std::fs::metadata(path)
        .map_err(TokenFileError::Read)?
        .mode()
        & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TokenFileError::NotPrivate { mode });
    }
    let token = std::fs::read(path).map_err(TokenFileError::Read)?;
    Ok(token.trim_ascii().to_vec())
}
