//! The tests' NBD client is the crate's own blocking client (fixed
//! newstyle, `NBD_OPT_GO`, one request at a time), so tests can record
//! exactly which writes were acknowledged.

pub use blkmirror::frontend::nbd::client::Client as NbdClient;
