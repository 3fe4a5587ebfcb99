//! A minimal NBD client for tests (fixed newstyle, NBD_OPT_EXPORT_NAME,
//! simple replies), so tests can record exactly which writes were
//! acknowledged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const REQ_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub struct NbdClient {
    s: UnixStream,
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    pub fn connect(path: &Path, export: &str) -> std::io::Result<NbdClient> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[0..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(std::io::Error::other("not an NBD newstyle server"));
        }
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        let size = u64::from_be_bytes(info[0..8].try_into().expect("8 bytes"));
        Ok(NbdClient { s, size, cookie: 1 })
    }

    /// Send one request and wait for its reply; `Ok(errno)`.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        read_into: Option<&mut [u8]>,
    ) -> std::io::Result<u32> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + data.map_or(0, |d| d.len()));
        req.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        if let Some(d) = data {
            req.extend_from_slice(d);
        }
        self.s.write_all(&req)?;
        if cmd == CMD_DISC {
            return Ok(0);
        }
        let mut rep = [0u8; 16];
        self.s.read_exact(&mut rep)?;
        let magic = u32::from_be_bytes(rep[0..4].try_into().expect("4 bytes"));
        let err = u32::from_be_bytes(rep[4..8].try_into().expect("4 bytes"));
        let got = u64::from_be_bytes(rep[8..16].try_into().expect("8 bytes"));
        if magic != REPLY_MAGIC || got != cookie {
            return Err(std::io::Error::other(format!(
                "bad reply: magic {magic:#x}, cookie {got} (sent {cookie})"
            )));
        }
        if err == 0 {
            if let Some(buf) = read_into {
                self.s.read_exact(buf)?;
            }
        }
        Ok(err)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<u32> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.request(
            CMD_WRITE,
            flags,
            offset,
            data.len() as u32,
            Some(data),
            None,
        )
    }

    pub fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let e = self.request(CMD_READ, 0, offset, len as u32, None, Some(&mut buf))?;
        if e != 0 {
            return Err(std::io::Error::other(format!("read error {e}")));
        }
        Ok(buf)
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.request(CMD_FLUSH, 0, 0, 0, None, None)
    }

    pub fn zero(&mut self, offset: u64, len: u32) -> std::io::Result<u32> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, None, None)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, None, None);
    }
}
