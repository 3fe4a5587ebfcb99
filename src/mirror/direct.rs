//! Large live writes on the mirror, written with `O_DIRECT` through an I/O
//! engine of their own, several in flight at once.
//!
//! Through the page cache, a 1 MiB live write is a fast copy, but the
//! commit's fdatasync then writes back everything the group left dirty and
//! only then flushes the device cache, while the apply thread waits: with
//! sync-mode 1 MiB writes at queue depth 8 that fdatasync took 13 ms on
//! average and the apply thread spent 70% of its time in it (README, "Large
//! writes on the mirror"). With `O_DIRECT` the data goes to the device as
//! frames arrive, the writes of a group overlap, and the commit waits only
//! for them and the cache flush.
//!
//! Order: a write in flight must not be overtaken by a later frame touching
//! the same bytes. The applier drains this writer (waits for everything in
//! flight) before any frame that does not come here, and a write that
//! overlaps one in flight waits for it first ([`DirectWriter::write`]).
//! Mixing with the buffered descriptor is coherent because of that: the
//! kernel writes back and invalidates cached pages of a range before a direct
//! write to it, and a buffered write after a completed direct write reads the
//! new data from the device.

use crate::block::{BlockError, Device, Engine, EngineConfig, EnginePreference};

/// Largest write taken: what one live frame carries.
pub const DIRECT_WRITE_MAX: usize = crate::protocol::WRITE_BYTES_MAX as usize;

/// Writes in flight at most (and staging buffers of `DIRECT_WRITE_MAX`).
pub const DIRECT_WRITES_IN_FLIGHT: u32 = 8;

/// See the module docs.
pub struct DirectWriter {
    engine: Engine,
    /// Keeps the `O_DIRECT` descriptor open for the engine.
    _device: Device,
    align: u64,
    /// Byte range of each write in flight, by `user_data` (the buffer slot).
    inflight: Vec<Option<(u64, u64)>>,
    in_flight: usize,
}

/// A completed write that the device refused with `EINVAL` (stricter
/// alignment than the filesystem reported): its bytes, to be written
/// through the page cache instead. Nothing of it was written.
pub struct Refused {
    pub offset: u64,
    pub data: Vec<u8>,
}

impl DirectWriter {
    /// Open `path` with `O_DIRECT` and an engine for it. `Err` where the
    /// filesystem refuses `O_DIRECT` (tmpfs) or no engine can be built:
    /// the caller then writes through the page cache.
    pub fn open(path: &std::path::Path, pref: EnginePreference) -> Result<Self, BlockError> {
        let device = Device::open_direct(path)?;
        let engine = Engine::new(
            &device,
            &EngineConfig {
                queue_depth: DIRECT_WRITES_IN_FLIGHT,
                buffer_bytes: DIRECT_WRITE_MAX,
                buffer_count: DIRECT_WRITES_IN_FLIGHT as usize,
            },
            pref,
        )?;
        let align = u64::from(device.logical_block_bytes()).max(512);
        Ok(DirectWriter {
            engine,
            _device: device,
            align,
            inflight: vec![None; DIRECT_WRITES_IN_FLIGHT as usize],
            in_flight: 0,
        })
    }

    /// Whether this writer takes a write of `len` bytes at `offset`.
    pub fn takes(&self, offset: u64, len: usize) -> bool {
        len > 0
            && len <= DIRECT_WRITE_MAX
            && offset % self.align == 0
            && (len as u64) % self.align == 0
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.inflight
            .iter()
            .flatten()
            .any(|&(a, b)| a < end && offset < b)
    }

    /// Start writing `data` at `offset` (see [`DirectWriter::takes`]). Waits
    /// first for writes in flight over the same bytes, and for a free
    /// buffer. Refused writes found on the way are returned.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Vec<Refused>, BlockError> {
        debug_assert!(self.takes(offset, data.len()));
        let end = offset + data.len() as u64;
        let mut refused = Vec::new();
        if self.overlaps(offset, end) {
            refused.extend(self.drain()?);
        }
        let buf = loop {
            if let Some(b) = self.engine.acquire() {
                break b;
            }
            refused.extend(self.reap(1)?);
        };
        self.engine.buf_mut(buf)[..data.len()].copy_from_slice(data);
        let slot = buf.0 as usize;
        if let Err(e) = self
            .engine
            .submit_write(buf, offset, data.len(), slot as u64)
        {
            self.engine.release(buf);
            return Err(e);
        }
        self.engine.flush()?;
        self.inflight[slot] = Some((offset, end));
        self.in_flight += 1;
        Ok(refused)
    }

    /// Collect completions, waiting for at least `min`.
    pub fn reap(&mut self, min: usize) -> Result<Vec<Refused>, BlockError> {
        let mut refused = Vec::new();
        let mut first_err = None;
        for c in self.engine.wait(min)? {
            let slot = c.user_data as usize;
            let range = self.inflight.get_mut(slot).and_then(Option::take);
            self.in_flight = self.in_flight.saturating_sub(usize::from(range.is_some()));
            let buf = c.buf;
            match c.result {
                Ok(_) => {}
                Err(BlockError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) && range.is_some() =>
                {
                    let (offset, end) = range.expect("checked");
                    if let Some(b) = buf {
                        let data = self.engine.buf(b)[..(end - offset) as usize].to_vec();
                        refused.push(Refused { offset, data });
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(b) = buf {
                self.engine.release(b);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(refused),
        }
    }

    /// Wait for every write in flight.
    pub fn drain(&mut self) -> Result<Vec<Refused>, BlockError> {
        let mut refused = Vec::new();
        while self.in_flight > 0 {
            refused.extend(self.reap(1)?);
        }
        Ok(refused)
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // The engine waits for its own operations when dropped; nothing to
        // report from here (the applier drains before it finishes).
        let _ = self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Overlapping writes issued back to back, with several in flight, end as
    /// the last one says; unaligned ones are not taken.
    #[test]
    fn overlapping_writes_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
        let mut w = match DirectWriter::open(&path, EnginePreference::Auto) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("skipped: no O_DIRECT here ({e})");
                return;
            }
        };
        assert!(!w.takes(100, 4096));
        assert!(!w.takes(0, 1000));
        assert!(!w.takes(0, DIRECT_WRITE_MAX + 4096));
        let mut model = vec![0u8; 8 << 20];
        let writes: Vec<(u64, usize)> = (0..40u64)
            .map(|i| {
                (
                    (i * 7 % 13) * (256 << 10),
                    if i % 3 == 0 { 1 << 20 } else { 256 << 10 },
                )
            })
            .collect();
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data = pattern(i as u8, len);
            assert!(w.takes(off, len));
            assert!(w.write(off, &data).unwrap().is_empty());
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert!(w.in_flight() <= DIRECT_WRITES_IN_FLIGHT as usize);
        }
        assert!(w.drain().unwrap().is_empty());
        assert_eq!(w.in_flight(), 0);
        let got = std::fs::read(&path).unwrap();
        let diff = got.iter().zip(&model).position(|(a, b)| a != b);
        assert_eq!(diff, None, "first difference");
    }
}
