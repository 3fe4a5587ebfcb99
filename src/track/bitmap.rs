//! The dirty bitmap: one bit per chunk per peer.
//!
//! File layout (little-endian), version 2:
//! ```text
//! page 0 (4096 bytes):
//!   0    8  magic "BMBITMAP"
//!   8    4  format version (2)
//!   12   4  peer count P (<= 32)
//!   16   8  chunk count N
//!   24   P * 32-byte peer fingerprints
//!   4088 8  xxh3-64 of bytes 0..4088
//! then for each peer k, at 4096 + k * R (R = ceil(N/64)*8 rounded up to 4096):
//!   ceil(N/64) little-endian u64 words of bits
//! ```
//!
//! The whole file is replaced atomically by [`Bitmap::save`] (one-shot syncs).
//! Live replication updates bit pages in place with [`Bitmap::write_words`]:
//! it only ever sets bits before the writes they announce (and fsyncs first),
//! and clears bits of chunks that are already durable on the mirror, so a torn
//! page (a mix of old and new sectors) is always a safe, conservative state.
//! The bit pages therefore carry no checksum; the header page does.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::config::PEERS_MAX;
use crate::error::{Error, IoContext, Result};

const MAGIC: &[u8; 8] = b"BMBITMAP";
const VERSION: u32 = 2;
const PAGE: usize = 4096;

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

    /// Slot of a peer if it has one.
    pub fn find_slot(&self, peer: &[u8; 32]) -> Option<usize> {
        self.peers.iter().position(|(p, _)| p == peer)
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

    fn region_bytes(&self) -> usize {
        (self.words() * 8).div_ceil(PAGE).max(1) * PAGE
    }

    pub fn encode(&self) -> Vec<u8> {
        let region = self.region_bytes();
        let mut out = vec![0u8; PAGE + self.peers.len() * region];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.peers.len() as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.chunks.to_le_bytes());
        for (k, (fp, bits)) in self.peers.iter().enumerate() {
            out[24 + k * 32..56 + k * 32].copy_from_slice(fp);
            let base = PAGE + k * region;
            for (j, w) in bits.iter().enumerate() {
                out[base + j * 8..base + j * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out[..PAGE - 8]);
        out[PAGE - 8..PAGE].copy_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn decode(path: &Path, b: &[u8], chunks: u64) -> Result<Self> {
        let bad = |r: &str| Error::metadata(path, r.to_string());
        if b.len() < PAGE {
            return Err(bad("truncated"));
        }
        if &b[0..8] != MAGIC {
            return Err(bad("not a blkmirror bitmap (bad magic)"));
        }
        let le64 = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let le32 = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        if le64(PAGE - 8) != xxhash_rust::xxh3::xxh3_64(&b[..PAGE - 8]) {
            return Err(bad("header checksum mismatch"));
        }
        let version = le32(8);
        if version != VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let peers = le32(12) as usize;
        let n = le64(16);
        if n != chunks {
            return Err(bad(&format!("has {n} chunks, expected {chunks}")));
        }
        if peers > PEERS_MAX {
            return Err(bad(&format!("{peers} peers, more than {PEERS_MAX}")));
        }
        let mut out = Bitmap::new(chunks);
        let region = out.region_bytes();
        let words = out.words();
        if b.len() != PAGE + peers * region {
            return Err(bad("length does not match its header"));
        }
        for k in 0..peers {
            let mut fp = [0u8; 32];
            fp.copy_from_slice(&b[24 + k * 32..56 + k * 32]);
            let base = PAGE + k * region;
            let mut bits: Vec<u64> = (0..words).map(|j| le64(base + j * 8)).collect();
            trim_tail(&mut bits, chunks);
            out.peers.push((fp, bits));
        }
        Ok(out)
    }

    /// Word `w` (chunks `64w..64w+64`) of peer `slot`.
    pub fn word(&self, slot: usize, w: usize) -> u64 {
        self.peers[slot].1[w]
    }

    /// Or `bits` into word `w` of every peer.
    pub fn or_word_all(&mut self, w: usize, bits: u64) {
        for (_, b) in &mut self.peers {
            b[w] |= bits;
        }
    }

    /// Set word `w` of peer `slot`.
    pub fn set_word(&mut self, slot: usize, w: usize, bits: u64) {
        self.peers[slot].1[w] = bits;
    }

    /// Number of words per peer.
    pub fn word_count(&self) -> usize {
        self.words()
    }

    /// Write, in place, the pages holding words `words` (sorted or not) of
    /// every peer into `file` (a bitmap file written by [`Bitmap::save`] with
    /// the same peers). The caller makes them durable (`sync_data`).
    pub fn write_words(&self, file: &File, path: &Path, words: &[usize]) -> Result<()> {
        let per_page = PAGE / 8;
        let mut pages: Vec<usize> = words.iter().map(|w| w / per_page).collect();
        pages.sort_unstable();
        pages.dedup();
        let region = self.region_bytes();
        let mut page = vec![0u8; PAGE];
        for (k, (_, bits)) in self.peers.iter().enumerate() {
            for &p in &pages {
                page.fill(0);
                let first = p * per_page;
                let last = (first + per_page).min(bits.len());
                for (j, w) in bits[first.min(last)..last].iter().enumerate() {
                    page[j * 8..j * 8 + 8].copy_from_slice(&w.to_le_bytes());
                }
                let off = (PAGE + k * region + p * PAGE) as u64;
                file.write_all_at(&page, off)
                    .ctx(|| format!("writing bitmap page {p} of {}", path.display()))?;
            }
        }
        Ok(())
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
    fn random_damage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let p = Path::new("bitmap");
        let mut b = Bitmap::new(5000);
        b.peer_slot(&[1; 32]).unwrap();
        b.peer_slot(&[2; 32]).unwrap();
        let good = b.encode();
        for _ in 0..2000 {
            let mut raw = good.clone();
            match rng.gen_range(0..3) {
                0 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let i = rng.gen_range(0..raw.len());
                        raw[i] ^= rng.gen::<u8>() | 1;
                    }
                }
                1 => raw.truncate(rng.gen_range(0..raw.len())),
                _ => raw.extend((0..rng.gen_range(1..5000)).map(|_| rng.gen::<u8>())),
            }
            let chunks = if rng.gen_bool(0.9) {
                5000
            } else {
                rng.gen_range(0..10_000)
            };
            if let Ok(d) = Bitmap::decode(p, &raw, chunks) {
                // Whatever decodes is well formed: in range, no stray tail bits.
                assert!(d.peer_count() <= PEERS_MAX);
                for k in 0..d.peer_count() {
                    assert!(d.count(k) <= chunks);
                }
            }
        }
    }

    #[test]
    fn in_place_word_updates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bitmap");
        let mut b = Bitmap::new(70_000);
        let s0 = b.peer_slot(&[1; 32]).unwrap();
        let s1 = b.peer_slot(&[2; 32]).unwrap();
        for i in 0..70_000 {
            b.clear(s0, i);
            b.clear(s1, i);
        }
        b.save(&p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        b.or_word_all(3, 0b101);
        b.or_word_all(600, 1 << 63);
        b.set(s0, 69_999);
        b.write_words(&f, &p, &[3, 600, 69_999 / 64]).unwrap();
        let r = Bitmap::load(&p, 70_000).unwrap();
        assert_eq!(r, b);
        assert!(r.get(s1, 192) && r.get(s1, 194) && !r.get(s1, 193));
        assert!(r.get(s0, 600 * 64 + 63));
        assert_eq!(r.count(s0), 4);
        assert_eq!(r.count(s1), 3);
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
        raw[20] ^= 0x10;
        std::fs::write(&p, &raw).unwrap();
        assert!(Bitmap::load(&p, 1000).is_err());
        assert!(Bitmap::decode(&p, b"xx", 1000).is_err());
        let limit = PEERS_MAX;
        let mut many = Bitmap::new(1);
        for i in 0..limit {
            many.peer_slot(&[i as u8; 32]).unwrap();
        }
        assert!(many.peer_slot(&[255; 32]).is_err());
    }
}
