//! Error kinds with the context an operator needs: which volume, chunk, peer,
//! file or operation went wrong.

use std::path::PathBuf;

use crate::block::BlockError;
use crate::protocol::ProtocolError;
use crate::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata file {path}: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error("mirror refused: {0}")]
    Refused(String),
    #[error("connection to mirror lost: {0}")]
    ConnectionLost(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The peer sent frame `got` where `state` expects another.
    pub fn unexpected(got: &crate::protocol::Frame, state: &'static str) -> Self {
        Error::Protocol(crate::protocol::ProtocolError::Unexpected {
            got: got.name(),
            state,
        })
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
    pub fn metadata(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Metadata {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Attach a context string to io results.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
