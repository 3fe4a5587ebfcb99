//! The dirty bitmap: one bit per chunk per peer, replaced atomically.
//!
//! File layout (little-endian):
//! ```text
//! 0   8  magic "BMBITMAP"
//! 8   4  format version (1)
//! 12  4  peer count P
//! 16  8  chunk count N
//! 24  P * (32-byte peer fingerprint + ceil(N/64)*8 bytes of bits)
//! end-8  xxh3-64 of everything before
//! ```

use std::path::Path;

use crate::config::PEERS_MAX;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"BMBITMAP";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    chunks: u64,
    peers: Vec<([u8; 32], Vec<u64>)>,
}

impl Bitmap {
    pub fn new(chunks: u64) -> Self {
        Bitmap {
            chunks,
            peers: Vec::new(),
        }
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    fn words(&self) -> usize {
        self.chunks.div_ceil(64) as usize
    }

    /// Slot of a peer, adding it (all bits set: nothing is known about it) if new.
    pub fn peer_slot(&mut self, peer: &[u8; 32]) -> Result<usize> {
        if let Some(i) = self.peers.iter().position(|(p, _)| p == peer) {
            return Ok(i);
        }
        if self.peers.len() >= PEERS_MAX {
            return Err(Error::Config(format!(
                "a volume can have at most {PEERS_MAX} mirrors"
            )));
        }
        let mut bits = vec![u64::MAX; self.words()];
        trim_tail(&mut bits, self.chunks);
        self.peers.push((*peer, bits));
        Ok(self.peers.len() - 1)
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn get(&self, slot: usize, i: u64) -> bool {
        self.peers[slot].1[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub fn set(&mut self, slot: usize, i: u64) {
        self.peers[slot].1[(i / 64) as usize] |= 1 << (i % 64);
    }

    pub fn clear(&mut self, slot: usize, i: u64) {
        self.peers[slot].1[(i / 64) as usize] &= !(1 << (i % 64));
    }

    pub fn set_all(&mut self, slot: usize) {
        let chunks = self.chunks;
        let bits = &mut self.peers[slot].1;
        bits.fill(u64::MAX);
        trim_tail(bits, chunks);
    }

    /// Set bit `i` for every peer except `slot`.
    pub fn set_others(&mut self, slot: usize, i: u64) {
        for (k, (_, bits)) in self.peers.iter_mut().enumerate() {
            if k != slot {
                bits[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
    }

    pub fn count(&self, slot: usize) -> u64 {
        self.peers[slot]
            .1
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.peers.len() * (32 + self.words() * 8));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.peers.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        for (fp, bits) in &self.peers {
            out.extend_from_slice(fp);
            for w in bits {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn decode(path: &Path, b: &[u8], chunks: u64) -> Result<Self> {
        let bad = |r: &str| Error::metadata(path, r.to_string());
        if b.len() < 32 {
            return Err(bad("truncated"));
        }
        let (body, tail) = b.split_at(b.len() - 8);
        let sum = u64::from_le_bytes(tail.try_into().map_err(|_| bad("truncated"))?);
        if &body[0..8] != MAGIC {
            return Err(bad("not a blkmirror bitmap (bad magic)"));
        }
        if sum != xxhash_rust::xxh3::xxh3_64(body) {
            return Err(bad("checksum mismatch"));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().map_err(|_| bad("truncated"))?);
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let peers =
            u32::from_le_bytes(body[12..16].try_into().map_err(|_| bad("truncated"))?) as usize;
        let n = u64::from_le_bytes(body[16..24].try_into().map_err(|_| bad("truncated"))?);
        if n != chunks {
            return Err(bad(&format!("has {n} chunks, expected {chunks}")));
        }
        if peers > PEERS_MAX {
            return Err(bad(&format!("{peers} peers, more than {PEERS_MAX}")));
        }
        let words = chunks.div_ceil(64) as usize;
        if body.len() != 24 + peers * (32 + words * 8) {
            return Err(bad("length does not match its header"));
        }
        let mut out = Bitmap::new(chunks);
        let mut pos = 24;
        for _ in 0..peers {
            let mut fp = [0u8; 32];
            fp.copy_from_slice(&body[pos..pos + 32]);
            pos += 32;
            let bits = body[pos..pos + words * 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
                .collect();
            pos += words * 8;
            out.peers.push((fp, bits));
        }
        Ok(out)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        super::files::write_atomic(path, &self.encode())
    }

    pub fn load(path: &Path, chunks: u64) -> Result<Self> {
        let b = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading bitmap {}", path.display()), e))?;
        Self::decode(path, &b, chunks)
    }
}

fn trim_tail(bits: &mut [u64], chunks: u64) {
    let r = chunks % 64;
    if r != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << r) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_peer() {
        let mut b = Bitmap::new(130);
        let a = b.peer_slot(&[1; 32]).unwrap();
        let c = b.peer_slot(&[2; 32]).unwrap();
        assert_eq!(b.peer_slot(&[1; 32]).unwrap(), a);
        assert_eq!(b.count(a), 130);
        for i in 0..130 {
            b.clear(a, i);
        }
        assert_eq!(b.count(a), 0);
        b.set(a, 129);
        assert!(b.get(a, 129));
        b.clear(c, 5);
        b.set_others(a, 5);
        assert!(b.get(c, 5));
        assert!(!b.get(a, 5));
        b.set_all(a);
        assert_eq!(b.count(a), 130);
    }

    #[test]
    fn save_load_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bitmap");
        let mut b = Bitmap::new(1000);
        let s = b.peer_slot(&[9; 32]).unwrap();
        b.clear(s, 10);
        b.save(&p).unwrap();
        let r = Bitmap::load(&p, 1000).unwrap();
        assert_eq!(r, b);
        assert!(Bitmap::load(&p, 999).is_err());
        let mut raw = std::fs::read(&p).unwrap();
        raw[40] ^= 0x10;
        std::fs::write(&p, &raw).unwrap();
        let e = Bitmap::load(&p, 1000).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        assert!(Bitmap::decode(&p, b"xx", 1000).is_err());
        let limit = PEERS_MAX;
        let mut many = Bitmap::new(1);
        for i in 0..limit {
            many.peer_slot(&[i as u8; 32]).unwrap();
        }
        assert!(many.peer_slot(&[255; 32]).is_err());
    }
}
