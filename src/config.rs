//! Validated configuration. Every limit that bounds memory, queues or the wire
//! is named here with its unit last.

use crate::error::{Error, Result};

pub const CHUNK_BYTES_MIN: u32 = 4096;
pub const CHUNK_BYTES_MAX: u32 = 1 << 20;
pub const CHUNK_BYTES_DEFAULT: u32 = 64 * 1024;
/// Largest frame payload accepted on the wire: one maximal chunk plus its header fields.
pub const FRAME_PAYLOAD_BYTES_MAX: u32 = CHUNK_BYTES_MAX + 256;
/// Volume names: `[A-Za-z0-9._-]{1,64}`, no leading dot.
pub const VOLUME_NAME_BYTES_MAX: usize = 64;
/// A volume is at most 2^50 bytes (1 PiB) in this version: keeps every derived size in range.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;
/// Peers (mirrors) tracked per volume in the dirty bitmap.
pub const PEERS_MAX: usize = 32;

/// Chunks per volume at most: bounds the digest map (16 bytes a chunk, so
/// 1 GiB of memory) and the bitmap. 4 TiB at 64 KiB chunks, 64 TiB at 1 MiB.
pub const VOLUME_CHUNKS_MAX: u64 = 1 << 26;

/// Check that a volume's chunk count stays within [`VOLUME_CHUNKS_MAX`].
pub fn validate_geometry(volume_bytes: u64, chunk_bytes: u32) -> std::result::Result<(), String> {
    let chunks = chunk_count(volume_bytes, chunk_bytes.max(1));
    if chunks > VOLUME_CHUNKS_MAX {
        return Err(format!(
            "a volume of {volume_bytes} bytes in {chunk_bytes}-byte chunks has {chunks} chunks, more than the limit of {VOLUME_CHUNKS_MAX} (its digest map would need {} MiB); use a larger --chunk-size",
            (chunks * 16) >> 20
        ));
    }
    Ok(())
}

/// Check a chunk size against the rules and the device's logical block size.
pub fn validate_chunk_bytes(chunk_bytes: u64, logical_block_bytes: u32) -> Result<u32> {
    if !chunk_bytes.is_power_of_two() {
        return Err(Error::Config(format!(
            "chunk size {chunk_bytes} is not a power of two"
        )));
    }
    if chunk_bytes < CHUNK_BYTES_MIN as u64 || chunk_bytes > CHUNK_BYTES_MAX as u64 {
        return Err(Error::Config(format!(
            "chunk size {chunk_bytes} is outside {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX} bytes"
        )));
    }
    if logical_block_bytes == 0 || chunk_bytes % logical_block_bytes as u64 != 0 {
        return Err(Error::Config(format!(
            "chunk size {chunk_bytes} is not a multiple of the device's logical block size {logical_block_bytes}"
        )));
    }
    Ok(chunk_bytes as u32)
}

/// Validate a volume name: `[A-Za-z0-9._-]{1,64}`, no leading dot.
pub fn validate_volume_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > VOLUME_NAME_BYTES_MAX {
        return Err(format!(
            "volume name {name:?} must be 1 to {VOLUME_NAME_BYTES_MAX} characters"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("volume name {name:?} must not start with a dot"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "volume name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Number of chunks covering `volume_bytes`.
pub fn chunk_count(volume_bytes: u64, chunk_bytes: u32) -> u64 {
    volume_bytes.div_ceil(chunk_bytes as u64)
}

/// Byte length of chunk `index` (the last one may be short).
pub fn chunk_len(volume_bytes: u64, chunk_bytes: u32, index: u64) -> u32 {
    let start = index * chunk_bytes as u64;
    (volume_bytes.saturating_sub(start)).min(chunk_bytes as u64) as u32
}

/// Parse a rate in bytes per second with a binary unit: `100M`, `512K`,
/// `1G`, `64MiB`, `20M/s`; `0` means no limit. Between 64 KiB/s and
/// 64 GiB/s.
pub fn parse_rate(v: &str) -> std::result::Result<u64, String> {
    let t = v.trim();
    if t == "0" {
        return Ok(0);
    }
    let bad = || {
        format!(
            "'{v}' is not a rate: give bytes per second with a unit K, M or G \
             (binary), e.g. 100M or 512K, or 0 for no limit"
        )
    };
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| (64 << 10..=64 << 30).contains(b))
        .ok_or_else(|| format!("rate '{v}' is outside 64K..=64G per second"))?;
    Ok(bytes)
}

/// Limits of the sync pipeline.
#[derive(Clone, Debug)]
pub struct SyncLimits {
    /// io_uring queue depth (reads in flight).
    pub queue_depth: u32,
    /// Size of one merged read (a multiple of the chunk size).
    pub read_bytes_max: usize,
    /// Chunks handed to compression workers but not yet sent.
    pub chunks_in_flight_max: usize,
    /// Compression worker threads.
    pub compress_threads: usize,
    /// Data bytes between two durability barriers.
    pub barrier_bytes: u64,
    /// Barriers sent but not yet acknowledged durable.
    pub barriers_in_flight_max: usize,
}

impl Default for SyncLimits {
    fn default() -> Self {
        SyncLimits {
            queue_depth: 32,
            read_bytes_max: 1 << 20,
            chunks_in_flight_max: 256,
            compress_threads: 2,
            barrier_bytes: 256 << 20,
            barriers_in_flight_max: 2,
        }
    }
}

impl SyncLimits {
    pub fn validate(&self) -> Result<()> {
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(Error::Config(format!(
                "queue depth {} is outside 1..=4096",
                self.queue_depth
            )));
        }
        if self.compress_threads == 0 || self.compress_threads > 64 {
            return Err(Error::Config(format!(
                "compress threads {} is outside 1..=64",
                self.compress_threads
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("512K").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1G").unwrap(), 1 << 30);
        assert_eq!(parse_rate("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_rate("20M/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("8m").unwrap(), 8 << 20);
        for bad in ["", "100", "M", "-1M", "1.5M", "1T", "10MM", "abc", "1 M"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("not a rate"), "{bad}: {e}");
        }
        for out in ["1K", "63K", "65G", "99999999999999G"] {
            let e = parse_rate(out).unwrap_err();
            assert!(e.contains("outside"), "{out}: {e}");
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(validate_chunk_bytes(65536, 512).unwrap(), 65536);
        assert_eq!(validate_chunk_bytes(4096, 4096).unwrap(), 4096);
        assert!(validate_chunk_bytes(65537, 512).is_err());
        assert!(validate_chunk_bytes(3 << 12, 512).is_err());
        assert!(validate_chunk_bytes(2048, 512).is_err());
        assert!(validate_chunk_bytes(2 << 20, 512).is_err());
        // 4 KiB chunks on a 8 KiB-sector device are not a multiple.
        let e = validate_chunk_bytes(4096, 8192).unwrap_err().to_string();
        assert!(e.contains("logical block size"), "{e}");
    }

    #[test]
    fn names() {
        assert!(validate_volume_name("vm-01.disk_a").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name(".hidden").is_err());
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name("..").is_err());
        assert!(validate_volume_name(&"x".repeat(65)).is_err());
        assert!(validate_volume_name(&"x".repeat(64)).is_ok());
        assert!(validate_volume_name("é").is_err());
    }

    #[test]
    fn geometry_limit() {
        assert!(validate_geometry(4 << 40, 65536).is_ok());
        let e = validate_geometry(8 << 40, 4096).unwrap_err();
        assert!(e.contains("--chunk-size"), "{e}");
    }

    #[test]
    fn chunk_math() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(4096, 4096), 1);
        assert_eq!(chunk_count(4097, 4096), 2);
        assert_eq!(chunk_len(4097, 4096, 1), 1);
        assert_eq!(chunk_len(8192, 4096, 1), 4096);
    }
}
