//! NBD wire format: constants, parsing, encoding and the decisions that
//! follow from them. Pure code, no I/O, so every rule here is unit-tested.
//!
//! All integers on the NBD wire are big-endian (network byte order).
//! Only what this server speaks is modelled: the fixed newstyle handshake,
//! `NBD_OPT_{EXPORT_NAME,ABORT,LIST,INFO,GO}` and simple replies.

use super::NbdError;

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server, 32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What this server advertises: writable, flush/FUA/trim/write-zeroes, and
/// multi-conn (the backend's flush is global, so a flush on one connection
/// covers writes completed on all of them).
pub const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

/// Command flags (16 bits, per request).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Options, option replies, information types
// ---------------------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---------------------------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------------------------

/// Server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Request header: magic, flags, type, cookie, offset, length.
pub const REQUEST_BYTES: usize = 28;
/// Simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
pub const EXPORT_NAME_PADDING_BYTES: usize = 124;

/// Largest READ or WRITE payload accepted (and advertised): 32 MiB, the
/// size the spec says a server should never treat as an attack.
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Largest option data accepted; a longer option closes the connection.
pub const OPTION_DATA_BYTES_MAX: u32 = 64 << 10;
/// Longest NBD string (export names, messages).
pub const NAME_BYTES_MAX: usize = 4096;
/// Preferred block size advertised unless the backend's minimum is larger.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Largest minimum block size the spec allows.
pub const MIN_BLOCK_BYTES_MAX: u32 = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The 18-byte greeting the server sends first.
pub fn greeting() -> [u8; GREETING_BYTES] {
    let mut out = [0u8; GREETING_BYTES];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client's 32-bit flags field negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (options get replies).
    pub fixed_newstyle: bool,
    /// No 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parses the client flags; unknown bits are a protocol violation (the
/// spec says the server MUST drop the connection).
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, u32> {
    let unknown = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(unknown);
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Why an option header cannot be followed: both close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionHeaderError {
    #[error("bad option magic {0:#018x}")]
    Magic(u64),
    #[error("option {option} carries {len} bytes of data (limit {OPTION_DATA_BYTES_MAX})")]
    TooLong { option: u32, len: u32 },
}

pub fn parse_option_header(
    buf: &[u8; OPTION_HEADER_BYTES],
) -> Result<OptionHeader, OptionHeaderError> {
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(OptionHeaderError::Magic(magic));
    }
    let option = be_u32(&buf[8..12]);
    let len = be_u32(&buf[12..16]);
    if len > OPTION_DATA_BYTES_MAX {
        return Err(OptionHeaderError::TooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// Information items a client asked for in `NBD_OPT_INFO`/`NBD_OPT_GO`
/// (unknown ones are ignored, as the spec requires).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InfoRequests {
    pub name: bool,
    pub description: bool,
    pub block_size: bool,
}

/// The data of an `NBD_OPT_INFO`/`NBD_OPT_GO` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub requests: InfoRequests,
}

/// Parses `u32 name length | name | u16 count | count × u16`; the data must
/// be exactly that long. `Err` is answered with `NBD_REP_ERR_INVALID`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = be_u32(&data[0..4]) as usize;
    if name_len > data.len() - 6 {
        return Err("export name length exceeds the option data");
    }
    if name_len > NAME_BYTES_MAX {
        return Err("export name longer than 4096 bytes");
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let count = usize::from(be_u16(&rest[0..2]));
    let items = &rest[2..];
    if items.len() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let mut requests = InfoRequests::default();
    for item in items.chunks_exact(2) {
        match be_u16(item) {
            INFO_NAME => requests.name = true,
            INFO_DESCRIPTION => requests.description = true,
            INFO_BLOCK_SIZE => requests.block_size = true,
            _ => {}
        }
    }
    Ok(InfoRequest { name, requests })
}

/// The single export's parameters, as negotiated in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
}

impl ExportInfo {
    /// `name` and the empty (default) name both select the export.
    pub fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            min_block: self.min_block,
        }
    }
}

/// What the connection does after answering an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Keep reading options.
    Continue,
    /// Enter transmission once the output is written.
    Transmit,
    /// `NBD_OPT_ABORT`: write the output (best effort), then close.
    Abort,
    /// Protocol violation or an unsatisfiable `NBD_OPT_EXPORT_NAME`: close
    /// without writing anything more.
    Close(&'static str),
}

/// Answers one option: appends the bytes to send to `out` and says what to
/// do next. `data` is the option data (already bounded by the caller).
pub fn answer_option(
    export: &ExportInfo,
    client: ClientFlags,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> OptionOutcome {
    if option == OPT_EXPORT_NAME {
        if !export.matches(data) {
            return OptionOutcome::Close("NBD_OPT_EXPORT_NAME names an unknown export");
        }
        out.extend_from_slice(&export.size.to_be_bytes());
        out.extend_from_slice(&export.flags.to_be_bytes());
        if !client.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING_BYTES]);
        }
        return OptionOutcome::Transmit;
    }
    if !client.fixed_newstyle {
        // Plain newstyle has no way to refuse an option but closing.
        return OptionOutcome::Close(
            "option other than NBD_OPT_EXPORT_NAME from a client without fixed newstyle",
        );
    }
    match option {
        OPT_ABORT => {
            // The spec says to ignore any data sent with it.
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                return OptionOutcome::Continue;
            }
            let name = export.name.as_bytes();
            let len = u32::try_from(4 + name.len()).expect("name length is bounded");
            option_reply_header(out, option, REP_SERVER, len);
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name);
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_INFO | OPT_GO => {
            let request = match parse_info_request(data) {
                Ok(request) => request,
                Err(reason) => {
                    option_reply(out, option, REP_ERR_INVALID, reason.as_bytes());
                    return OptionOutcome::Continue;
                }
            };
            if !export.matches(request.name) {
                let message = format!("unknown export; this server exports {:?}", export.name);
                option_reply(out, option, REP_ERR_UNKNOWN, message.as_bytes());
                return OptionOutcome::Continue;
            }
            let mut info = [0u8; 12];
            info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
            info[2..10].copy_from_slice(&export.size.to_be_bytes());
            info[10..12].copy_from_slice(&export.flags.to_be_bytes());
            option_reply(out, option, REP_INFO, &info);
            // Always sent: the constraints are not the defaults (the minimum
            // comes from the backend), and clients ignore what they did not ask for.
            let mut sizes = [0u8; 14];
            sizes[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            sizes[2..6].copy_from_slice(&export.min_block.to_be_bytes());
            sizes[6..10].copy_from_slice(&export.preferred_block.to_be_bytes());
            sizes[10..14].copy_from_slice(&export.max_payload.to_be_bytes());
            option_reply(out, option, REP_INFO, &sizes);
            if request.requests.name {
                let name = export.name.as_bytes();
                let len = u32::try_from(2 + name.len()).expect("name length is bounded");
                option_reply_header(out, option, REP_INFO, len);
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(name);
            }
            option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                OptionOutcome::Transmit
            } else {
                OptionOutcome::Continue
            }
        }
        OPT_STARTTLS => {
            option_reply(out, option, REP_ERR_UNSUP, b"TLS is not supported");
            OptionOutcome::Continue
        }
        OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
            option_reply(
                out,
                option,
                REP_ERR_UNSUP,
                b"only simple replies are supported",
            );
            OptionOutcome::Continue
        }
        _ => {
            option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
            OptionOutcome::Continue
        }
    }
}

/// Appends an option reply header announcing `len` bytes of data.
pub fn option_reply_header(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a whole option reply. `data` is at most a few KiB here.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("option reply data is small");
    option_reply_header(out, option, reply, len);
    out.extend_from_slice(data);
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// One request header, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    /// Opaque to the server; echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// The request did not start with `NBD_REQUEST_MAGIC`: the stream cannot be
/// trusted any more, so the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

pub fn parse_request(buf: &[u8; REQUEST_BYTES]) -> Result<Request, BadRequestMagic> {
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(BadRequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&buf[4..6]),
        kind: be_u16(&buf[6..8]),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        len: be_u32(&buf[24..28]),
    })
}

/// Encodes a request header (used by tests and by any in-crate client).
pub fn encode_request(request: &Request) -> [u8; REQUEST_BYTES] {
    let mut out = [0u8; REQUEST_BYTES];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.kind.to_be_bytes());
    out[8..16].copy_from_slice(&request.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.len.to_be_bytes());
    out
}

/// A simple reply header; `error` is 0 or an NBD errno.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// What the transmission checks need to know about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub min_block: u32,
}

/// A valid request that needs the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

/// What to do with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run it on the backend (for `Write`, read the payload first).
    Execute(Command),
    /// Reply success at once, without backend I/O (a zero-length request).
    Succeed,
    /// Read and discard `drain` payload bytes, then reply with `error`.
    Reject { error: NbdError, drain: u32 },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
    /// A violation that cannot be answered without losing the framing.
    Close(&'static str),
}

/// Validates a request against the export, following the spec: unknown
/// commands and flags get `EINVAL`; reads and trims past the end `EINVAL`,
/// writes and write-zeroes past the end `ENOSPC`; an offset or length not
/// aligned to the advertised minimum block `EINVAL` (a request ending
/// exactly at an unaligned export end is accepted); READ longer than the
/// maximum payload `EINVAL`; a WRITE payload longer than the maximum cannot
/// be skipped safely, so it closes the connection. Rejected WRITEs keep
/// the framing by draining their payload.
pub fn decide(request: &Request, geometry: &Geometry) -> Decision {
    let payload = if request.kind == CMD_WRITE {
        request.len
    } else {
        0
    };
    if payload > PAYLOAD_BYTES_MAX {
        return Decision::Close("write payload larger than the 32 MiB maximum");
    }
    let reject = |error| Decision::Reject {
        error,
        drain: payload,
    };
    let allowed_flags = match request.kind {
        CMD_DISC => return Decision::Disconnect,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return reject(NbdError::Invalid),
    };
    if request.flags & !allowed_flags != 0 {
        return reject(NbdError::Invalid);
    }
    let fua = request.flags & CMD_FLAG_FUA != 0;
    if request.kind == CMD_FLUSH {
        if request.offset != 0 || request.len != 0 {
            return reject(NbdError::Invalid);
        }
        return Decision::Execute(Command::Flush);
    }
    if request.kind == CMD_READ && request.len > PAYLOAD_BYTES_MAX {
        return reject(NbdError::Invalid);
    }
    let Some(end) = request.offset.checked_add(u64::from(request.len)) else {
        return reject(NbdError::Invalid);
    };
    if end > geometry.size {
        let writes = matches!(request.kind, CMD_WRITE | CMD_WRITE_ZEROES);
        return reject(if writes {
            NbdError::NoSpace
        } else {
            NbdError::Invalid
        });
    }
    let block = u64::from(geometry.min_block.max(1));
    if request.offset % block != 0 || (u64::from(request.len) % block != 0 && end != geometry.size)
    {
        return reject(NbdError::Invalid);
    }
    if request.len == 0 {
        // The spec leaves zero-length requests unspecified but says not to
        // disconnect; nothing to do, so success (a WRITE has no payload here).
        return Decision::Succeed;
    }
    let (offset, len) = (request.offset, request.len);
    Decision::Execute(match request.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua },
    })
}

// ---------------------------------------------------------------------------------------------
// Byte helpers (callers pass slices of the exact length)
// ---------------------------------------------------------------------------------------------

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
