//! Small helpers for crash-safe metadata files.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Replace `path` atomically with `data`: write a temporary file beside it,
/// fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::metadata(path, "has no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::metadata(path, "has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).ctx(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).ctx(|| format!("opening directory {}", dir.display()))?;
    d.sync_all()
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// Write a TOML document atomically.
pub fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = toml::to_string_pretty(value)
        .map_err(|e| Error::metadata(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// Read a TOML document; `Ok(None)` if the file does not exist.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    if text.len() > 1 << 20 {
        return Err(Error::metadata(
            path,
            "larger than 1 MiB; not a blkmirror file",
        ));
    }
    let text = String::from_utf8(text).map_err(|_| Error::metadata(path, "is not UTF-8"))?;
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| Error::metadata(path, format!("cannot parse: {e}")))
}

/// A document whose fields must satisfy more than their types say (a chunk
/// size that is a power of two, ids that parse). Checked on every read, so
/// that a damaged file is an error naming it, not a panic or a wrong
/// geometry further on.
pub trait Validate {
    /// Why the document cannot be used, if it cannot.
    fn validate(&self) -> std::result::Result<(), String>;
}

/// [`read_toml`], then [`Validate::validate`]: an invalid document is an
/// error naming the file.
pub fn read_valid_toml<T: serde::de::DeserializeOwned + Validate>(
    path: &Path,
) -> Result<Option<T>> {
    let value: Option<T> = read_toml(path)?;
    if let Some(v) = &value {
        v.validate()
            .map_err(|reason| Error::metadata(path, reason))?;
    }
    Ok(value)
}

/// The rules every stored volume geometry follows: a chunk size that is a
/// power of two in the allowed range, a volume size of at most
/// `VOLUME_BYTES_MAX` and at most `VOLUME_CHUNKS_MAX` chunks.
pub fn validate_stored_geometry(
    volume_bytes: u64,
    chunk_bytes: u32,
) -> std::result::Result<(), String> {
    use crate::config::{CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, VOLUME_BYTES_MAX};
    if !chunk_bytes.is_power_of_two() || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&chunk_bytes)
    {
        return Err(format!(
            "chunk_bytes {chunk_bytes} is not a power of two in {CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX}"
        ));
    }
    if volume_bytes > VOLUME_BYTES_MAX {
        return Err(format!(
            "volume_bytes {volume_bytes} is above the limit of {VOLUME_BYTES_MAX}"
        ));
    }
    crate::config::validate_geometry(volume_bytes, chunk_bytes)
}

/// Hex form of a 128-bit id, as stored in TOML files.
pub fn id_hex(id: u128) -> String {
    format!("{id:032x}")
}

pub fn parse_id(path: &Path, field: &str, s: &str) -> Result<u128> {
    check_id(field, s).map_err(|reason| Error::metadata(path, reason))
}

/// [`parse_id`] without a file to name (for [`Validate`]).
pub fn check_id(field: &str, s: &str) -> std::result::Result<u128, String> {
    u128::from_str_radix(s, 16).map_err(|_| format!("field {field} is not a 128-bit hex id: {s:?}"))
}

/// A random non-zero 128-bit id.
pub fn new_id() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Serde adapter: a u64 stored as a 16-digit hex string (TOML integers are
/// signed 64-bit and cannot hold every u64).
pub mod hex_u64 {
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        u64::from_str_radix(&s, 16)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a 64-bit hex number")))
    }
}
