//! The SAPS io-server (placeholder, being built).
