//! The digest map: xxh3-128 per chunk, persisted in place.
//!
//! File layout (all little-endian):
//! ```text
//! 0     8  magic "BMDIGEST"
//! 8     4  format version (1)
//! 12    4  chunk size in bytes
//! 16    8  volume size in bytes
//! 24    8  chunk count
//! 32    8  xxh3-64 of bytes 0..32
//! 40..4096 zero
//! 4096 + 16*i  digest of chunk i
//! ```

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

const MAGIC: &[u8; 8] = b"BMDIGEST";
const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 4096;
const PAGE_BYTES: u64 = 4096;
const DIGESTS_PER_PAGE: u64 = PAGE_BYTES / 16;

pub struct DigestMap {
    digests: Vec<u128>,
    chunk_bytes: u32,
    volume_bytes: u64,
    dirty_pages: BTreeSet<u64>,
    file: Option<(File, PathBuf)>,
}

impl DigestMap {
    /// An in-memory map with every digest set to `fill`.
    pub fn new(volume_bytes: u64, chunk_bytes: u32, fill: u128) -> Self {
        let n = crate::config::chunk_count(volume_bytes, chunk_bytes) as usize;
        DigestMap {
            digests: vec![fill; n],
            chunk_bytes,
            volume_bytes,
            dirty_pages: BTreeSet::new(),
            file: None,
        }
    }

    /// Create a new file for this map (replacing any) and write it whole.
    pub fn create_file(&mut self, path: &Path) -> Result<()> {
        let mut header = vec![0u8; HEADER_BYTES as usize];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        header[16..24].copy_from_slice(&self.volume_bytes.to_le_bytes());
        header[24..32].copy_from_slice(&(self.digests.len() as u64).to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&header[0..32]);
        header[32..40].copy_from_slice(&sum.to_le_bytes());
        let mut body = Vec::with_capacity(HEADER_BYTES as usize + self.digests.len() * 16);
        body.extend_from_slice(&header);
        for d in &self.digests {
            body.extend_from_slice(&d.to_le_bytes());
        }
        super::files::write_atomic(path, &body)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(|| format!("opening {}", path.display()))?;
        self.file = Some((f, path.to_path_buf()));
        self.dirty_pages.clear();
        Ok(())
    }

    /// Load a map file, checking it against the expected geometry.
    pub fn load(path: &Path, volume_bytes: u64, chunk_bytes: u32) -> Result<Self> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(|| format!("opening digest map {}", path.display()))?;
        let mut header = vec![0u8; HEADER_BYTES as usize];
        f.read_exact(&mut header)
            .map_err(|_| Error::metadata(path, "truncated header"))?;
        if &header[0..8] != MAGIC {
            return Err(Error::metadata(
                path,
                "not a blkmirror digest map (bad magic)",
            ));
        }
        let sum = u64::from_le_bytes(header[32..40].try_into().unwrap_or_default());
        if sum != xxhash_rust::xxh3::xxh3_64(&header[0..32]) {
            return Err(Error::metadata(path, "header checksum mismatch"));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(Error::metadata(
                path,
                format!("unsupported version {version}"),
            ));
        }
        let cb = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
        let vb = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        let n = u64::from_le_bytes(header[24..32].try_into().unwrap_or_default());
        if cb != chunk_bytes || vb != volume_bytes {
            return Err(Error::metadata(
                path,
                format!("geometry {vb} bytes / {cb}-byte chunks, expected {volume_bytes} / {chunk_bytes}"),
            ));
        }
        if n != crate::config::chunk_count(volume_bytes, chunk_bytes) {
            return Err(Error::metadata(
                path,
                format!("chunk count {n} does not match"),
            ));
        }
        let len = f
            .seek(SeekFrom::End(0))
            .ctx(|| format!("reading {}", path.display()))?;
        if len != HEADER_BYTES + n * 16 {
            return Err(Error::metadata(
                path,
                format!("is {len} bytes, expected {}", HEADER_BYTES + n * 16),
            ));
        }
        let mut body = vec![0u8; (n * 16) as usize];
        f.read_exact_at(&mut body, HEADER_BYTES)
            .ctx(|| format!("reading {}", path.display()))?;
        let digests = body
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0xff; 16])))
            .collect();
        Ok(DigestMap {
            digests,
            chunk_bytes,
            volume_bytes,
            dirty_pages: BTreeSet::new(),
            file: Some((f, path.to_path_buf())),
        })
    }

    pub fn len(&self) -> u64 {
        self.digests.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }
    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }
    pub fn get(&self, i: u64) -> u128 {
        self.digests[i as usize]
    }
    pub fn all(&self) -> &[u128] {
        &self.digests
    }

    pub fn set(&mut self, i: u64, d: u128) {
        let slot = &mut self.digests[i as usize];
        if *slot != d {
            *slot = d;
            self.dirty_pages.insert(i / DIGESTS_PER_PAGE);
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Write the changed pages and fsync.
    pub fn flush(&mut self) -> Result<()> {
        let Some((f, path)) = &self.file else {
            return Ok(());
        };
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        let mut page = Vec::with_capacity(PAGE_BYTES as usize);
        for &p in &self.dirty_pages {
            let first = p * DIGESTS_PER_PAGE;
            let last = ((p + 1) * DIGESTS_PER_PAGE).min(self.digests.len() as u64);
            page.clear();
            for d in &self.digests[first as usize..last as usize] {
                page.extend_from_slice(&d.to_le_bytes());
            }
            f.write_all_at(&page, HEADER_BYTES + first * 16)
                .ctx(|| format!("writing digest map {}", path.display()))?;
        }
        f.sync_data()
            .ctx(|| format!("fsync digest map {}", path.display()))?;
        self.dirty_pages.clear();
        Ok(())
    }

    /// xxh3-128 over all digests in order.
    pub fn root(&self) -> u128 {
        let mut h = crate::protocol::RootHasher::default();
        for d in &self.digests {
            h.update(*d);
        }
        h.finish()
    }

    /// Change the geometry (resize): digests of chunks that change length or
    /// are new become `fill_new`; the file is rewritten whole.
    pub fn resize(&mut self, volume_bytes: u64, fill_new: u128) -> Result<()> {
        let old_n = self.digests.len() as u64;
        let n = crate::config::chunk_count(volume_bytes, self.chunk_bytes);
        self.digests.resize(n as usize, fill_new);
        // The old and the new tail chunk may have changed length.
        if old_n > 0 && old_n <= n {
            self.digests[(old_n - 1) as usize] = fill_new;
        }
        if n > 0 {
            self.digests[(n - 1) as usize] = fill_new;
        }
        self.volume_bytes = volume_bytes;
        if let Some((_, path)) = self.file.take() {
            self.create_file(&path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.digests");
        let mut m = DigestMap::new(1000 * 4096 + 5, 4096, 7);
        m.create_file(&p).unwrap();
        m.set(0, 1);
        m.set(300, 2);
        m.set(1000, 3);
        m.flush().unwrap();
        let r = DigestMap::load(&p, 1000 * 4096 + 5, 4096).unwrap();
        assert_eq!(r.get(0), 1);
        assert_eq!(r.get(1), 7);
        assert_eq!(r.get(300), 2);
        assert_eq!(r.get(1000), 3);
        assert_eq!(r.root(), m.root());
        assert!(DigestMap::load(&p, 1000 * 4096, 4096).is_err());
        assert!(DigestMap::load(&p, 1000 * 4096 + 5, 8192).is_err());
    }

    #[test]
    fn corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.digests");
        let mut m = DigestMap::new(10 * 4096, 4096, 7);
        m.create_file(&p).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b[13] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = DigestMap::load(&p, 10 * 4096, 4096)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("checksum"), "{e}");
        std::fs::write(&p, b"short").unwrap();
        assert!(DigestMap::load(&p, 10 * 4096, 4096).is_err());
        let mut m = DigestMap::new(10 * 4096, 4096, 7);
        m.create_file(&p).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(b.len() - 1);
        std::fs::write(&p, &b).unwrap();
        assert!(DigestMap::load(&p, 10 * 4096, 4096).is_err());
    }

    #[test]
    fn resize_marks_tail_unknown() {
        let mut m = DigestMap::new(4096 + 100, 4096, 5);
        m.resize(3 * 4096, 9).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(0), 5);
        assert_eq!(m.get(1), 9);
        assert_eq!(m.get(2), 9);
        m.resize(4096, 9).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(0), 9);
    }
}
