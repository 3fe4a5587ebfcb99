//! Change tracking: the per-chunk digest map and the per-peer dirty bitmap,
//! with crash-safe on-disk formats.
//!
//! * The digest map (`digests`) holds the xxh3-128 of every chunk. It is
//!   updated in place, page by page; a torn page only costs extra transfers
//!   because of the ordering rule below.
//! * The dirty bitmap (`bitmap`) holds one bit per chunk per peer and is
//!   replaced atomically (write to a temporary file, fsync, rename, fsync the
//!   directory), so it is never torn.
//!
//! The invariant that makes differential syncs safe: for every peer `p`, if
//! `bit_p[i]` is clear then that peer durably holds the contents whose digest
//! is `map[i]`. Hence the order at each checkpoint: set other peers' bits for
//! chunks whose digest changes, then write the map, then clear this peer's
//! bits.

pub mod bitmap;
pub mod digests;
pub mod files;

pub use bitmap::Bitmap;
pub use digests::DigestMap;

/// Digest of a chunk whose contents are unknown: never equal to a real digest
/// in practice (xxh3-128 would have to produce exactly this value).
pub const UNKNOWN_DIGEST: u128 = u128::MAX;

/// Digests of all-zero chunks, for the full chunk length and the short tail.
#[derive(Clone, Copy, Debug)]
pub struct ZeroDigests {
    pub full: u128,
    pub tail: u128,
    pub chunk_bytes: u32,
    pub volume_bytes: u64,
}

impl ZeroDigests {
    pub fn new(volume_bytes: u64, chunk_bytes: u32) -> Self {
        let zeros = vec![0u8; chunk_bytes as usize];
        let full = crate::protocol::digest(&zeros);
        let tail_len = (volume_bytes % chunk_bytes as u64) as usize;
        let tail = if tail_len == 0 {
            full
        } else {
            crate::protocol::digest(&zeros[..tail_len])
        };
        ZeroDigests {
            full,
            tail,
            chunk_bytes,
            volume_bytes,
        }
    }
    /// Zero digest for chunk `index`.
    pub fn of(&self, index: u64) -> u128 {
        if crate::config::chunk_len(self.volume_bytes, self.chunk_bytes, index) == self.chunk_bytes
        {
            self.full
        } else {
            self.tail
        }
    }
}
