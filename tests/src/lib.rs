//! Shared helpers for the scenario and property test suites.
