//! Live replication (`blkmirror replicate`).
//!
//! * [`primary`]: the primary's pure state machine (write intent, sequence
//!   numbers, queue bound and pull-ahead, acknowledgements, resync).
//! * [`live`]: the I/O around it: NBD backend, bitmap writer, link to the
//!   mirror, resync task.
//! * [`status`]: status files read by `blkmirror status`.

pub mod live;
pub mod primary;
pub mod status;
