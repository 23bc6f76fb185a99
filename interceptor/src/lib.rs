//! SAPS interceptor (placeholder, being built).
