//! The engine's front door.
