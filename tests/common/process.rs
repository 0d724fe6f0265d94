//! Helpers for tests that run the worker as a separate process or run a
//! PostgreSQL server of their own.
