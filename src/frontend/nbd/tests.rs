//! Unit tests of the pure parts: errors, listen addresses, option and request
//! parsing, option answers, request decisions, encodings.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::proto::*;
use super::{Listen, NbdError};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn errno_values_match_the_spec() {
    let table = [
        (NbdError::Perm, 1),
        (NbdError::Io, 5),
        (NbdError::NoMem, 12),
        (NbdError::Invalid, 22),
        (NbdError::NoSpace, 28),
        (NbdError::Overflow, 75),
        (NbdError::NotSupported, 95),
        (NbdError::Shutdown, 108),
    ];
    for (error, errno) in table {
        assert_eq!(error.errno(), errno, "{error:?}");
        assert_eq!(NbdError::from_errno(errno), Some(error));
    }
    assert_eq!(NbdError::from_errno(0), None);
    assert_eq!(NbdError::from_errno(2), None);
}

#[test]
fn os_errors_map_to_nbd_errors() {
    let os = |code| NbdError::from(io::Error::from_raw_os_error(code));
    assert_eq!(os(libc::EIO), NbdError::Io);
    assert_eq!(os(libc::ENOSPC), NbdError::NoSpace);
    assert_eq!(os(libc::EDQUOT), NbdError::NoSpace);
    assert_eq!(os(libc::EFBIG), NbdError::NoSpace);
    assert_eq!(os(libc::EROFS), NbdError::Perm);
    assert_eq!(os(libc::EACCES), NbdError::Perm);
    assert_eq!(os(libc::EPERM), NbdError::Perm);
    assert_eq!(os(libc::EINVAL), NbdError::Invalid);
    assert_eq!(os(libc::ENOMEM), NbdError::NoMem);
    assert_eq!(os(libc::EOVERFLOW), NbdError::Overflow);
    assert_eq!(os(libc::EOPNOTSUPP), NbdError::NotSupported);
    assert_eq!(os(libc::ESHUTDOWN), NbdError::Shutdown);
    // Anything else is an I/O error, never success or a panic.
    assert_eq!(os(libc::ENOENT), NbdError::Io);
    assert_eq!(os(libc::EBADF), NbdError::Io);
    assert_eq!(os(0), NbdError::Io);
}

#[test]
fn error_kinds_without_os_code_map_sensibly() {
    let kind = |k: io::ErrorKind| NbdError::from(io::Error::new(k, "x"));
    assert_eq!(kind(io::ErrorKind::InvalidInput), NbdError::Invalid);
    assert_eq!(kind(io::ErrorKind::PermissionDenied), NbdError::Perm);
    assert_eq!(kind(io::ErrorKind::StorageFull), NbdError::NoSpace);
    assert_eq!(kind(io::ErrorKind::Unsupported), NbdError::NotSupported);
    assert_eq!(kind(io::ErrorKind::UnexpectedEof), NbdError::Io);
    assert_eq!(kind(io::ErrorKind::Other), NbdError::Io);
}

#[test]
fn nbd_errors_convert_back_to_os_errors() {
    let e = io::Error::from(NbdError::NoSpace);
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(NbdError::from(e), NbdError::NoSpace);
}

// ---------------------------------------------------------------------------------------------
// Listen addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn listen_parses_unix_and_tcp() {
    assert_eq!(
        "unix:/run/blkmirror/data.sock".parse::<Listen>().unwrap(),
        Listen::Unix(PathBuf::from("/run/blkmirror/data.sock"))
    );
    assert_eq!(
        "unix:relative.sock".parse::<Listen>().unwrap(),
        Listen::Unix(PathBuf::from("relative.sock"))
    );
    assert_eq!(
        "tcp:127.0.0.1:10809".parse::<Listen>().unwrap(),
        Listen::Tcp("127.0.0.1:10809".parse().unwrap())
    );
    assert_eq!(
        "tcp:[::1]:0".parse::<Listen>().unwrap(),
        Listen::Tcp("[::1]:0".parse().unwrap())
    );
    assert_eq!(
        "tcp:0.0.0.0:10809".parse::<Listen>().unwrap(),
        Listen::Tcp("0.0.0.0:10809".parse().unwrap())
    );
    match "tcp:localhost:10809".parse::<Listen>().unwrap() {
        Listen::Tcp(addr) => {
            assert!(addr.ip().is_loopback(), "{addr}");
            assert_eq!(addr.port(), 10809);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn listen_rejects_malformed_addresses_with_a_clear_error() {
    for (input, reason) in [
        ("", "unknown scheme"),
        ("/run/x.sock", "unknown scheme"),
        ("udp:1.2.3.4:5", "unknown scheme"),
        ("unix:", "empty socket path"),
        ("tcp:127.0.0.1", "missing :PORT"),
        ("tcp:nohost", "missing :PORT"),
        ("tcp:127.0.0.1:99999", "invalid port"),
        ("tcp:127.0.0.1:x", "invalid port"),
        ("tcp::10809", "empty host"),
        ("tcp:no-such-host.invalid:10809", "cannot resolve"),
    ] {
        let err = input.parse::<Listen>().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(reason), "{input:?}: {text}");
        assert!(text.contains("unix:PATH or tcp:HOST:PORT"), "{text}");
        assert_eq!(err.input, input);
    }
    let long = format!("unix:/{}", "x".repeat(120));
    let text = long.parse::<Listen>().unwrap_err().to_string();
    assert!(text.contains("longer than 107 bytes"), "{text}");
}

#[test]
fn listen_display_round_trips() {
    for text in ["unix:/tmp/a b.sock", "tcp:127.0.0.1:10809", "tcp:[::1]:7"] {
        let listen: Listen = text.parse().unwrap();
        assert_eq!(listen.to_string(), text);
    }
}

#[test]
fn uris_are_percent_encoded() {
    let unix = Listen::Unix(PathBuf::from("/tmp/dir x/nbd.sock"));
    assert_eq!(
        unix.uri("data"),
        "nbd+unix:///data?socket=/tmp/dir%20x/nbd.sock"
    );
    assert_eq!(unix.uri(""), "nbd+unix:///?socket=/tmp/dir%20x/nbd.sock");
    let tcp = Listen::Tcp("127.0.0.1:10809".parse::<SocketAddr>().unwrap());
    assert_eq!(tcp.uri("a/b?c"), "nbd://127.0.0.1:10809/a%2Fb%3Fc");
    let v6 = Listen::Tcp("[::1]:10809".parse::<SocketAddr>().unwrap());
    assert_eq!(v6.uri("d"), "nbd://[::1]:10809/d");
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let g = greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), 0b11);
}

#[test]
fn client_flags_reject_unknown_bits() {
    assert_eq!(
        parse_client_flags(0),
        Ok(ClientFlags {
            fixed_newstyle: false,
            no_zeroes: false
        })
    );
    assert_eq!(
        parse_client_flags(3),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(parse_client_flags(4), Err(4));
    assert_eq!(parse_client_flags(0x8000_0001), Err(0x8000_0000));
}

fn option_header(magic: u64, option: u32, len: u32) -> [u8; OPTION_HEADER_BYTES] {
    let mut b = [0u8; OPTION_HEADER_BYTES];
    b[0..8].copy_from_slice(&magic.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn option_headers_check_magic_and_length() {
    assert_eq!(
        parse_option_header(&option_header(IHAVEOPT, OPT_GO, 10)),
        Ok(OptionHeader {
            option: OPT_GO,
            len: 10
        })
    );
    assert_eq!(
        parse_option_header(&option_header(IHAVEOPT, 99, OPTION_DATA_BYTES_MAX)),
        Ok(OptionHeader {
            option: 99,
            len: OPTION_DATA_BYTES_MAX
        })
    );
    assert_eq!(
        parse_option_header(&option_header(NBD_MAGIC, OPT_GO, 0)),
        Err(OptionHeaderError::Magic(NBD_MAGIC))
    );
    assert_eq!(
        parse_option_header(&option_header(IHAVEOPT, OPT_GO, OPTION_DATA_BYTES_MAX + 1)),
        Err(OptionHeaderError::TooLong {
            option: OPT_GO,
            len: OPTION_DATA_BYTES_MAX + 1
        })
    );
    assert!(parse_option_header(&option_header(IHAVEOPT, 1, u32::MAX)).is_err());
}

fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[test]
fn info_requests_parse_and_ignore_unknown_items() {
    let data = info_data(b"disk", &[INFO_BLOCK_SIZE, 77, INFO_NAME]);
    let req = parse_info_request(&data).unwrap();
    assert_eq!(req.name, b"disk");
    assert_eq!(
        req.requests,
        InfoRequests {
            name: true,
            description: false,
            block_size: true
        }
    );
    let empty = info_data(b"", &[]);
    let req = parse_info_request(&empty).unwrap();
    assert_eq!(req.name, b"");
    assert_eq!(req.requests, InfoRequests::default());
}

#[test]
fn malformed_info_requests_are_invalid() {
    // Shorter than the fixed part.
    assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_err());
    // Name length beyond the data (including u32 overflow-sized lengths).
    let mut d = info_data(b"disk", &[]);
    d[0..4].copy_from_slice(&5u32.to_be_bytes());
    assert!(parse_info_request(&d).is_err());
    d[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse_info_request(&d).is_err());
    // Count says 2 items, one present.
    let mut d = info_data(b"disk", &[INFO_NAME]);
    let at = 4 + 4;
    d[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    assert!(parse_info_request(&d).is_err());
    // Trailing garbage.
    let mut d = info_data(b"disk", &[INFO_NAME]);
    d.push(0);
    assert!(parse_info_request(&d).is_err());
    // Name longer than an NBD string may be.
    let long = vec![b'a'; NAME_BYTES_MAX + 1];
    assert!(parse_info_request(&info_data(&long, &[])).is_err());
}

fn export() -> ExportInfo {
    ExportInfo {
        name: "disk".to_string(),
        size: 1 << 30,
        flags: TRANSMISSION_FLAGS,
        min_block: 512,
        preferred_block: 4096,
        max_payload: PAYLOAD_BYTES_MAX,
    }
}

const FIXED: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: true,
};

/// Splits encoded option replies into (option, reply type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated reply header");
        assert_eq!(
            u64::from_be_bytes(out[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        v.push((option, kind, out[20..20 + len].to_vec()));
        out = &out[20 + len..];
    }
    v
}

#[test]
fn export_name_option_enters_transmission_with_or_without_zeroes() {
    for name in [&b"disk"[..], b""] {
        let mut out = Vec::new();
        let outcome = answer_option(&export(), FIXED, OPT_EXPORT_NAME, name, &mut out);
        assert_eq!(outcome, OptionOutcome::Transmit);
        assert_eq!(out.len(), 10);
        assert_eq!(u64::from_be_bytes(out[0..8].try_into().unwrap()), 1 << 30);
        assert_eq!(u16::from_be_bytes([out[8], out[9]]), TRANSMISSION_FLAGS);
    }
    let zeroes = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: false,
    };
    let mut out = Vec::new();
    answer_option(&export(), zeroes, OPT_EXPORT_NAME, b"disk", &mut out);
    assert_eq!(out.len(), 10 + 124);
    assert!(out[10..].iter().all(|&b| b == 0));
}

#[test]
fn export_name_option_with_an_unknown_name_closes() {
    let mut out = Vec::new();
    let outcome = answer_option(&export(), FIXED, OPT_EXPORT_NAME, b"other", &mut out);
    assert!(matches!(outcome, OptionOutcome::Close(_)));
    assert!(out.is_empty(), "nothing may be sent");
}

#[test]
fn go_sends_export_and_block_size_then_ack() {
    for name in [&b"disk"[..], b""] {
        let mut out = Vec::new();
        let data = info_data(name, &[INFO_BLOCK_SIZE]);
        let outcome = answer_option(&export(), FIXED, OPT_GO, &data, &mut out);
        assert_eq!(outcome, OptionOutcome::Transmit);
        let r = replies(&out);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r.iter().all(|(opt, _, _)| *opt == OPT_GO));
        let (_, kind, info) = &r[0];
        assert_eq!(*kind, REP_INFO);
        assert_eq!(info.len(), 12);
        assert_eq!(u16::from_be_bytes([info[0], info[1]]), INFO_EXPORT);
        assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 1 << 30);
        assert_eq!(u16::from_be_bytes([info[10], info[11]]), TRANSMISSION_FLAGS);
        let (_, kind, sizes) = &r[1];
        assert_eq!(*kind, REP_INFO);
        assert_eq!(sizes.len(), 14);
        assert_eq!(u16::from_be_bytes([sizes[0], sizes[1]]), INFO_BLOCK_SIZE);
        assert_eq!(u32::from_be_bytes(sizes[2..6].try_into().unwrap()), 512);
        assert_eq!(u32::from_be_bytes(sizes[6..10].try_into().unwrap()), 4096);
        assert_eq!(
            u32::from_be_bytes(sizes[10..14].try_into().unwrap()),
            PAYLOAD_BYTES_MAX
        );
        assert_eq!(r[2], (OPT_GO, REP_ACK, vec![]));
    }
}

#[test]
fn info_answers_like_go_but_stays_in_negotiation_and_names_on_request() {
    let mut out = Vec::new();
    let data = info_data(b"", &[INFO_NAME]);
    let outcome = answer_option(&export(), FIXED, OPT_INFO, &data, &mut out);
    assert_eq!(outcome, OptionOutcome::Continue);
    let r = replies(&out);
    let name = r
        .iter()
        .find(|(_, kind, d)| *kind == REP_INFO && d[0..2] == INFO_NAME.to_be_bytes())
        .expect("NBD_INFO_NAME");
    assert_eq!(&name.2[2..], b"disk");
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn go_errors_do_not_enter_transmission() {
    let mut out = Vec::new();
    let outcome = answer_option(&export(), FIXED, OPT_GO, &info_data(b"nope", &[]), &mut out);
    assert_eq!(outcome, OptionOutcome::Continue);
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("disk"));

    let mut out = Vec::new();
    let outcome = answer_option(&export(), FIXED, OPT_GO, &[0, 0, 0, 9, 1], &mut out);
    assert_eq!(outcome, OptionOutcome::Continue);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn list_names_the_export_and_rejects_data() {
    let mut out = Vec::new();
    assert_eq!(
        answer_option(&export(), FIXED, OPT_LIST, &[], &mut out),
        OptionOutcome::Continue
    );
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[0..4], &4u32.to_be_bytes());
    assert_eq!(&r[0].2[4..], b"disk");
    assert_eq!(r[1], (OPT_LIST, REP_ACK, vec![]));

    let mut out = Vec::new();
    answer_option(&export(), FIXED, OPT_LIST, b"x", &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn abort_is_acknowledged() {
    let mut out = Vec::new();
    let outcome = answer_option(&export(), FIXED, OPT_ABORT, b"ignored", &mut out);
    assert_eq!(outcome, OptionOutcome::Abort);
    assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
}

#[test]
fn unsupported_options_get_err_unsup() {
    for option in [
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        4,
        12,
        0,
        u32::MAX,
    ] {
        let mut out = Vec::new();
        let outcome = answer_option(&export(), FIXED, option, b"", &mut out);
        assert_eq!(outcome, OptionOutcome::Continue, "option {option}");
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (option, REP_ERR_UNSUP));
    }
}

#[test]
fn plain_newstyle_clients_may_only_send_export_name() {
    let plain = ClientFlags {
        fixed_newstyle: false,
        no_zeroes: false,
    };
    let mut out = Vec::new();
    let outcome = answer_option(&export(), plain, OPT_GO, &info_data(b"", &[]), &mut out);
    assert!(matches!(outcome, OptionOutcome::Close(_)));
    assert!(out.is_empty());
    let outcome = answer_option(&export(), plain, OPT_EXPORT_NAME, b"", &mut out);
    assert_eq!(outcome, OptionOutcome::Transmit);
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 0x0102_0304_0506_0708,
        offset,
        len,
    }
}

#[test]
fn requests_round_trip_and_bad_magic_is_refused() {
    let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    let bytes = encode_request(&r);
    assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(parse_request(&bytes), Ok(r));
    let mut bad = bytes;
    bad[0] ^= 1;
    assert_eq!(parse_request(&bad), Err(BadRequestMagic(0x2460_9513)));
}

#[test]
fn simple_reply_echoes_the_cookie() {
    let b = encode_simple_reply(0xdead_beef_0000_0001, 22);
    assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 22);
    assert_eq!(&b[8..16], &0xdead_beef_0000_0001u64.to_be_bytes());
}

const GEO: Geometry = Geometry {
    size: 1 << 20,
    min_block: 512,
};

fn reject(error: NbdError, drain: u32) -> Decision {
    Decision::Reject { error, drain }
}

#[test]
fn valid_requests_execute() {
    assert_eq!(
        decide(&req(CMD_READ, 0, 0, 4096), &GEO),
        Decision::Execute(Command::Read {
            offset: 0,
            len: 4096
        })
    );
    assert_eq!(
        decide(&req(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 512, 512), &GEO),
        Decision::Execute(Command::Write {
            offset: (1 << 20) - 512,
            len: 512,
            fua: true
        })
    );
    assert_eq!(
        decide(&req(CMD_FLUSH, 0, 0, 0), &GEO),
        Decision::Execute(Command::Flush)
    );
    // FUA is accepted on every command once advertised.
    assert_eq!(
        decide(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &GEO),
        Decision::Execute(Command::Flush)
    );
    assert_eq!(
        decide(&req(CMD_TRIM, 0, 512, 1 << 19), &GEO),
        Decision::Execute(Command::Trim {
            offset: 512,
            len: 1 << 19,
            fua: false
        })
    );
    assert_eq!(
        decide(
            &req(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                0,
                1 << 20
            ),
            &GEO
        ),
        Decision::Execute(Command::WriteZeroes {
            offset: 0,
            len: 1 << 20,
            fua: true
        })
    );
    assert_eq!(decide(&req(CMD_DISC, 0, 0, 0), &GEO), Decision::Disconnect);
}

#[test]
fn zero_length_requests_succeed_without_io() {
    for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(decide(&req(kind, 0, 0, 0), &GEO), Decision::Succeed);
        assert_eq!(decide(&req(kind, 0, 1 << 20, 0), &GEO), Decision::Succeed);
    }
    // Past the end is still an error.
    assert_eq!(
        decide(&req(CMD_READ, 0, (1 << 20) + 512, 0), &GEO),
        reject(NbdError::Invalid, 0)
    );
}

#[test]
fn requests_past_the_end_are_refused() {
    assert_eq!(
        decide(&req(CMD_READ, 0, 1 << 20, 512), &GEO),
        reject(NbdError::Invalid, 0)
    );
    assert_eq!(
        decide(&req(CMD_TRIM, 0, (1 << 20) - 512, 1024), &GEO),
        reject(NbdError::Invalid, 0)
    );
    // Writes past the end: ENOSPC, and the payload is drained.
    assert_eq!(
        decide(&req(CMD_WRITE, 0, (1 << 20) - 512, 1024), &GEO),
        reject(NbdError::NoSpace, 1024)
    );
    assert_eq!(
        decide(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 512), &GEO),
        reject(NbdError::NoSpace, 0)
    );
    // offset + len overflows u64.
    assert_eq!(
        decide(&req(CMD_READ, 0, u64::MAX - 511, 1024), &GEO),
        reject(NbdError::Invalid, 0)
    );
    assert_eq!(
        decide(&req(CMD_WRITE, 0, u64::MAX, 512), &GEO),
        reject(NbdError::Invalid, 512)
    );
}

#[test]
fn oversize_payloads_are_refused_or_close() {
    assert_eq!(
        decide(&req(CMD_READ, 0, 0, PAYLOAD_BYTES_MAX + 512), &GEO),
        reject(NbdError::Invalid, 0)
    );
    assert!(matches!(
        decide(&req(CMD_WRITE, 0, 0, PAYLOAD_BYTES_MAX + 1), &GEO),
        Decision::Close(_)
    ));
    // Even with flags that would also be refused: the payload cannot be skipped.
    assert!(matches!(
        decide(&req(CMD_WRITE, 0x8000, 0, u32::MAX), &GEO),
        Decision::Close(_)
    ));
    // Trim and write-zeroes carry no payload: larger lengths are fine.
    let big = Geometry {
        size: 1 << 40,
        min_block: 512,
    };
    assert_eq!(
        decide(&req(CMD_TRIM, 0, 0, 1 << 31), &big),
        Decision::Execute(Command::Trim {
            offset: 0,
            len: 1 << 31,
            fua: false
        })
    );
    // A maximal read inside a big export is fine.
    assert_eq!(
        decide(&req(CMD_READ, 0, 0, PAYLOAD_BYTES_MAX), &big),
        Decision::Execute(Command::Read {
            offset: 0,
            len: PAYLOAD_BYTES_MAX
        })
    );
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    for kind in [CMD_CACHE, CMD_BLOCK_STATUS, 8, 9, 0x100, u16::MAX] {
        assert_eq!(
            decide(&req(kind, 0, 0, 512), &GEO),
            reject(NbdError::Invalid, 0),
            "command {kind}"
        );
    }
    for flag in [
        CMD_FLAG_NO_HOLE,
        CMD_FLAG_DF,
        CMD_FLAG_REQ_ONE,
        CMD_FLAG_FAST_ZERO,
        CMD_FLAG_PAYLOAD_LEN,
        0x8000,
    ] {
        assert_eq!(
            decide(&req(CMD_READ, flag, 0, 512), &GEO),
            reject(NbdError::Invalid, 0)
        );
        // A refused WRITE drains its payload to keep the framing.
        assert_eq!(
            decide(&req(CMD_WRITE, flag, 0, 4096), &GEO),
            reject(NbdError::Invalid, 4096)
        );
    }
    assert_eq!(
        decide(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &GEO),
        reject(NbdError::Invalid, 0)
    );
}

#[test]
fn flush_with_offset_or_length_is_einval() {
    assert_eq!(
        decide(&req(CMD_FLUSH, 0, 512, 0), &GEO),
        reject(NbdError::Invalid, 0)
    );
    assert_eq!(
        decide(&req(CMD_FLUSH, 0, 0, 512), &GEO),
        reject(NbdError::Invalid, 0)
    );
}

#[test]
fn unaligned_requests_are_einval_except_at_an_unaligned_end() {
    assert_eq!(
        decide(&req(CMD_READ, 0, 1, 512), &GEO),
        reject(NbdError::Invalid, 0)
    );
    assert_eq!(
        decide(&req(CMD_WRITE, 0, 0, 100), &GEO),
        reject(NbdError::Invalid, 100)
    );
    let odd = Geometry {
        size: 1000,
        min_block: 512,
    };
    assert_eq!(
        decide(&req(CMD_READ, 0, 512, 488), &odd),
        Decision::Execute(Command::Read {
            offset: 512,
            len: 488
        })
    );
    assert_eq!(
        decide(&req(CMD_READ, 0, 0, 488), &odd),
        reject(NbdError::Invalid, 0)
    );
    let bytes = Geometry {
        size: 1000,
        min_block: 1,
    };
    assert_eq!(
        decide(&req(CMD_WRITE, 0, 3, 5), &bytes),
        Decision::Execute(Command::Write {
            offset: 3,
            len: 5,
            fua: false
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Randomised: decoders never panic, and what reaches the backend is always in range
// ---------------------------------------------------------------------------------------------

#[test]
fn random_requests_never_reach_the_backend_out_of_range() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
    for size in [1u64 << 30, (1 << 20) + 512, 4096 * 7 + 100] {
        for min_block in [1u32, 512, 4096] {
            let geometry = Geometry { size, min_block };
            for _ in 0..20_000 {
                let mut buf = [0u8; REQUEST_BYTES];
                rng.fill(&mut buf[..]);
                if rng.gen_bool(0.9) {
                    buf[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
                }
                // Bias towards small kinds, flags and plausible ranges.
                if rng.gen_bool(0.8) {
                    buf[6..8].copy_from_slice(&rng.gen_range(0u16..10).to_be_bytes());
                    buf[4..6].copy_from_slice(&rng.gen_range(0u16..4).to_be_bytes());
                }
                if rng.gen_bool(0.7) {
                    let off = rng.gen_range(0..size + 8192);
                    buf[16..24].copy_from_slice(&off.to_be_bytes());
                    buf[24..28].copy_from_slice(&rng.gen_range(0u32..(1 << 22)).to_be_bytes());
                }
                let Ok(req) = parse_request(&buf) else {
                    continue;
                };
                let (offset, len) = match decide(&req, &geometry) {
                    Decision::Execute(Command::Read { offset, len })
                    | Decision::Execute(Command::Write { offset, len, .. })
                    | Decision::Execute(Command::Trim { offset, len, .. })
                    | Decision::Execute(Command::WriteZeroes { offset, len, .. }) => (offset, len),
                    Decision::Reject { drain, .. } => {
                        assert!(drain <= PAYLOAD_BYTES_MAX);
                        continue;
                    }
                    _ => continue,
                };
                let end = offset
                    .checked_add(len as u64)
                    .expect("no overflow reaches the backend");
                assert!(len > 0, "{req:?}");
                assert!(end <= size, "{req:?} past the end of {size}");
                assert!(len <= PAYLOAD_BYTES_MAX || req.kind != 0, "{req:?}");
                assert_eq!(offset % min_block as u64, 0, "{req:?} unaligned start");
                assert!(
                    end % min_block as u64 == 0 || end == size,
                    "{req:?} unaligned end"
                );
            }
        }
    }
}

#[test]
fn random_option_data_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6f7074);
    let e = export();
    for _ in 0..20_000 {
        let n = rng.gen_range(0..64);
        let mut data = vec![0u8; n];
        rng.fill(&mut data[..]);
        if n >= 4 && rng.gen_bool(0.5) {
            let name_len = rng.gen_range(0..n as u32);
            data[0..4].copy_from_slice(&name_len.to_be_bytes());
        }
        let _ = parse_info_request(&data);
        let option = rng.gen_range(0u32..16);
        let mut out = Vec::new();
        let client = ClientFlags {
            fixed_newstyle: rng.gen_bool(0.9),
            no_zeroes: rng.gen_bool(0.5),
        };
        let _ = answer_option(&e, client, option, &data, &mut out);
        assert!(
            out.len() < 64 * 1024,
            "option {option}: {} bytes of reply",
            out.len()
        );
        let mut h = [0u8; OPTION_HEADER_BYTES];
        rng.fill(&mut h[..]);
        let _ = parse_option_header(&h);
    }
}
