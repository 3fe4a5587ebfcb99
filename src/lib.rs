//! blkmirror: block-device replication in user space.
//!
//! * [`block`]: devices and image files, the io_uring engine and a plain fallback.
//! * [`track`]: digest map and per-peer dirty bitmap with crash-safe formats.
//! * [`protocol`]: wire frames and codec (pure, no I/O).
//! * [`transport`]: the only module touching quinn and rustls; identity and pinning.
//! * [`mirror`]: the mirror node (`serve`).
//! * [`primary`]: one-shot full and differential syncs.
//! * [`replication`]: live replication behind an NBD export.

pub mod block;
pub mod busy_poll;
pub mod config;
pub mod demo;
pub mod error;
pub mod frontend;
#[doc(hidden)]
pub mod fuzz;
pub mod metrics_http;
pub mod mirror;
pub mod primary;
pub mod protocol;
pub mod recovery;
pub mod replication;
pub mod track;
pub mod transport;

pub use error::{Error, Result};
