//! Front-ends through which applications reach a replicated volume.
//!
//! * [`nbd`]: an NBD server (fixed newstyle handshake, simple replies) over
//!   unix sockets and TCP, generic over a [`nbd::Backend`].

pub mod nbd;

pub use nbd::{Backend, Listen, ListenParseError, NbdError, NbdServer};
