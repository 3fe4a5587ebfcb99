//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time. `blkmirror demo` writes through it, and
//! the integration tests use it to know exactly which writes got a reply.
//! Real clients (qemu, libnbd, fio) are what the export is tested against.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{
    be_u16, be_u32, be_u64, encode_request, Request, CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ,
    CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NAME_BYTES_MAX, NBD_MAGIC,
    OPTION_REPLY_MAGIC, OPT_GO, PAYLOAD_BYTES_MAX, REP_ACK, REP_INFO, SIMPLE_REPLY_MAGIC,
};

/// Longest option reply the client reads (the server's are a few bytes,
/// error messages up to an NBD string).
const OPTION_REPLY_BYTES_MAX: u32 = NAME_BYTES_MAX as u32 + 64;
/// Option replies the client reads for one `NBD_OPT_GO` before giving up.
const OPTION_REPLIES_MAX: usize = 64;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One connection to an export, in transmission phase.
pub struct Client {
    s: UnixStream,
    /// The export's size in bytes.
    pub size: u64,
    /// Transmission flags the server sent.
    pub flags: u16,
    /// The server's minimum block size (1 unless it said otherwise).
    pub min_block: u32,
    cookie: u64,
}

impl Client {
    /// Connects to a unix socket and negotiates `export` with `NBD_OPT_GO`.
    /// Replies time out after a minute.
    pub fn connect(path: &Path, export: &str) -> io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Client::handshake(s, export)
    }

    fn handshake(mut s: UnixStream, export: &str) -> io::Result<Client> {
        if export.len() > NAME_BYTES_MAX {
            return Err(bad(format!(
                "export name of {} bytes is longer than {NAME_BYTES_MAX}",
                export.len()
            )));
        }
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if be_u64(&hello[0..8]) != NBD_MAGIC || be_u64(&hello[8..16]) != IHAVEOPT {
            return Err(bad("not an NBD newstyle server"));
        }
        if be_u16(&hello[16..18]) & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("the server does not speak fixed newstyle"));
        }
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        // NBD_OPT_GO: name length, name, one information request.
        let mut data = Vec::with_capacity(8 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut opt = Vec::with_capacity(16 + data.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut export_info: Option<(u64, u16)> = None;
        let mut min_block = 1u32;
        for _ in 0..OPTION_REPLIES_MAX {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            if be_u64(&head[0..8]) != OPTION_REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            if be_u32(&head[8..12]) != OPT_GO {
                return Err(bad("option reply for an option not sent"));
            }
            let reply = be_u32(&head[12..16]);
            let len = be_u32(&head[16..20]);
            if len > OPTION_REPLY_BYTES_MAX {
                return Err(bad(format!("option reply of {len} bytes")));
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body)?;
            match reply {
                REP_ACK => {
                    let (size, flags) = export_info
                        .ok_or_else(|| bad("NBD_OPT_GO acknowledged without the export's size"))?;
                    return Ok(Client {
                        s,
                        size,
                        flags,
                        min_block,
                        cookie: 1,
                    });
                }
                REP_INFO if body.len() >= 2 => match be_u16(&body[0..2]) {
                    INFO_EXPORT if body.len() == 12 => {
                        export_info = Some((be_u64(&body[2..10]), be_u16(&body[10..12])));
                    }
                    INFO_BLOCK_SIZE if body.len() == 14 => {
                        min_block = be_u32(&body[2..6]).max(1);
                    }
                    _ => {}
                },
                r if r & 0x8000_0000 != 0 => {
                    return Err(io::Error::other(format!(
                        "the server refused export '{export}' (reply {r:#x}): {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                r => return Err(bad(format!("unexpected option reply {r:#x}"))),
            }
        }
        Err(bad("too many option replies"))
    }

    /// Sends one request and waits for its reply: `Ok(0)` or `Ok(errno)`
    /// (an NBD errno the server answered with). A READ's data goes into
    /// `read_into`, which must be `len` bytes.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        read_into: Option<&mut [u8]>,
    ) -> io::Result<u32> {
        if data.is_some_and(|d| d.len() != len as usize)
            || read_into.as_ref().is_some_and(|b| b.len() != len as usize)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("request length {len} does not match its buffer"),
            ));
        }
        let cookie = self.cookie;
        self.cookie = self.cookie.wrapping_add(1);
        let head = encode_request(&Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        });
        match data {
            Some(d) => {
                let mut req = Vec::with_capacity(head.len() + d.len());
                req.extend_from_slice(&head);
                req.extend_from_slice(d);
                self.s.write_all(&req)?;
            }
            None => self.s.write_all(&head)?,
        }
        if kind == CMD_DISC {
            return Ok(0);
        }
        let mut rep = [0u8; 16];
        self.s.read_exact(&mut rep)?;
        let magic = be_u32(&rep[0..4]);
        let err = be_u32(&rep[4..8]);
        let got = be_u64(&rep[8..16]);
        if magic != SIMPLE_REPLY_MAGIC || got != cookie {
            return Err(bad(format!(
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

    /// Writes `data` at `offset` (with FUA if `fua`); `Ok(errno)`.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l <= PAYLOAD_BYTES_MAX)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a write of {} bytes is over {PAYLOAD_BYTES_MAX}",
                        data.len()
                    ),
                )
            })?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, len, Some(data), None)
    }

    /// Reads `len` bytes at `offset`; an error reply is an error.
    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let l = u32::try_from(len)
            .ok()
            .filter(|&l| l <= PAYLOAD_BYTES_MAX)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a read of {len} bytes is over {PAYLOAD_BYTES_MAX}"),
                )
            })?;
        let mut buf = vec![0u8; len];
        let e = self.request(CMD_READ, 0, offset, l, None, Some(&mut buf))?;
        if e != 0 {
            return Err(io::Error::other(format!(
                "the server answered a read at {offset} with NBD error {e}"
            )));
        }
        Ok(buf)
    }

    /// `NBD_CMD_FLUSH`; `Ok(errno)`.
    pub fn flush(&mut self) -> io::Result<u32> {
        self.request(CMD_FLUSH, 0, 0, 0, None, None)
    }

    /// `NBD_CMD_WRITE_ZEROES`; `Ok(errno)`.
    pub fn zero(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, None, None)
    }

    /// `NBD_CMD_TRIM`; `Ok(errno)`.
    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.request(CMD_TRIM, 0, offset, len, None, None)
    }

    /// `NBD_CMD_DISC`, then the socket is closed.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, None, None);
    }
}
