//! A real PostgreSQL server for tests (placeholder, being written).
