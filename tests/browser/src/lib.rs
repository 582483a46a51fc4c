//! End-to-end browser tests live in `tests/`; this library is empty.
