//! Tests of the upgrade state.
