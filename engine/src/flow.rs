//! A trace as a sequence diagram.
