//! The primary side: one-shot full and differential syncs to a mirror.

pub mod barriers;
pub mod connect;
pub mod state;
pub mod sync;

pub use sync::{run_sync, SyncOptions, SyncReport};
