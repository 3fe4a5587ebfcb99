use super::*;
use rand::{Rng, SeedableRng};

const MAX: u32 = crate::config::FRAME_PAYLOAD_BYTES_MAX;

fn samples() -> Vec<Frame> {
    let data = b"hello world hello world hello world hello world".repeat(100);
    let d = digest(&data);
    vec![
        Frame::Hello(Hello {
            volume: "vm-1.disk".into(),
            volume_bytes: 1 << 30,
            chunk_bytes: 65536,
            flags: HELLO_FLAG_RESIZE,
            source_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
        }),
        Frame::HelloAck(HelloAck {
            replica_id: 7,
            state: ReplicaState::Inconsistent,
            source_id: 9,
            gen: GenIds {
                current: 11,
                bitmap: 12,
                history: [13, 14],
            },
            volume_bytes: 4096,
            chunk_bytes: 4096,
            created: true,
            primary: true,
            changed: 15,
            promoted_unix: 16,
        }),
        Frame::Error {
            message: "disk full".into(),
        },
        Frame::Chunk(seal_chunk(3, data.clone(), d, digest(&[0u8; 4800]), true)),
        Frame::Chunk(ChunkFrame {
            index: 1,
            encoding: Encoding::Raw,
            raw_len: 3,
            digest: digest(b"abc"),
            payload: Bytes::from_static(b"abc"),
        }),
        Frame::Barrier { seq: 5 },
        Frame::ZeroRun {
            first: 10,
            count: 300,
        },
        Frame::BarrierAck { seq: 5 },
        Frame::DigestRequest { first: 0, count: 9 },
        Frame::DigestBatch {
            first: 4,
            digests: vec![1, 2, u128::MAX],
        },
        Frame::SyncDone {
            chunks: 10,
            root: 99,
            generation: 3,
        },
        Frame::SyncComplete {
            state: ReplicaState::UpToDate,
        },
        Frame::Write(LiveWrite {
            seq: 7,
            offset: 4096,
            flags: LIVE_FLAG_FUA,
            encoding: Encoding::Raw,
            raw_len: 3,
            digest: digest(b"abc"),
            payload: Bytes::from_static(b"abc"),
        }),
        Frame::ZeroRange {
            seq: 8,
            offset: 0,
            len: 1 << 20,
            flags: 0,
        },
        Frame::Flush { seq: 9 },
        Frame::LiveChunk {
            seq: 10,
            chunk: seal_chunk(1, data.clone(), d, digest(&[0u8; 4800]), false),
        },
        Frame::StartResync { seq: 11 },
        Frame::InSync {
            seq: 12,
            generation: 99,
        },
        Frame::ChangedBatch {
            first_word: 3,
            words: vec![1, u64::MAX, 0],
        },
        Frame::Takeover,
        Frame::VerifyChunk {
            seq: 20,
            index: 5,
            digest: 77,
        },
        Frame::VerifyMismatch {
            index: 5,
            digest: 78,
        },
        Frame::LiveEnd { seq: 13 },
        Frame::Ack {
            seq: 13,
            state: ReplicaState::Inconsistent,
        },
        Frame::Applied { seq: 14 },
        Frame::Hello(Hello {
            volume: "restore-me".into(),
            volume_bytes: 0,
            chunk_bytes: 0,
            flags: HELLO_FLAG_READ,
            source_id: 0,
        }),
        Frame::RestoreRequest {
            point: 0,
            digests: true,
        },
        Frame::RestoreRequest {
            point: u64::MAX,
            digests: false,
        },
        Frame::RestoreReady { point: 3 },
        Frame::ReadChunks {
            first_word: 2,
            words: vec![u64::MAX, 0, 5],
        },
        Frame::ReadEnd { chunks: 69 },
        Frame::RestoreEnd { chunks: 69 },
    ]
}

#[test]
fn live_write_checks() {
    let data = b"hello world".to_vec();
    let w = LiveWrite {
        seq: 1,
        offset: 100,
        flags: 0,
        encoding: Encoding::Raw,
        raw_len: data.len() as u32,
        digest: digest(&data),
        payload: Bytes::from(data.clone()),
    };
    let mut out = vec![0u8; 64];
    assert_eq!(open_write(&w, 1000, &mut out).unwrap(), data.len());
    assert_eq!(&out[..data.len()], &data[..]);
    // Past the end, overflowing offsets, bad digests and a short buffer are refused.
    assert!(open_write(&w, 105, &mut out).is_err());
    let mut far = w.clone();
    far.offset = u64::MAX - 2;
    assert!(open_write(&far, u64::MAX, &mut out).is_err());
    let mut bad = w.clone();
    bad.digest ^= 1;
    assert!(open_write(&bad, 1000, &mut out)
        .unwrap_err()
        .to_string()
        .contains("digest"));
    assert!(open_write(&w, 1000, &mut [0u8; 4]).is_err());
    // The copy-free path checks the same things.
    assert_eq!(&write_plaintext(&w, 1000).unwrap()[..], &data[..]);
    assert!(write_plaintext(&w, 105).is_err());
    assert!(write_plaintext(&bad, 1000).is_err());
    assert!(write_plaintext(&far, u64::MAX).is_err());
    // A raw write whose payload length disagrees with raw_len does not decode.
    let mut b = encode_to_vec(&Frame::Write(w.clone()));
    b.push(0);
    let n = b.len() as u32 - 8;
    b[4..8].copy_from_slice(&n.to_le_bytes());
    assert!(decode(&b, MAX).is_err());
    // A write claiming more plaintext than a frame may carry does not
    // decode: the mirror would allocate that much to decompress it.
    let mut big = w.clone();
    big.encoding = Encoding::Lz4;
    big.raw_len = WRITE_BYTES_MAX + 1;
    let err = decode(&encode_to_vec(&Frame::Write(big)), MAX).unwrap_err();
    assert!(err.to_string().contains("more than the limit"), "{err}");
}

#[test]
fn round_trip_every_frame() {
    for f in samples() {
        let bytes = encode_to_vec(&f);
        let (g, used) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(f, g, "{}", f.name());
        // Every strict prefix is "need more", never an error or a frame.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], MAX).unwrap().is_none());
        }
    }
}

#[test]
fn header_limits() {
    let mut b = encode_to_vec(&Frame::Barrier { seq: 1 });
    b[0] = 2;
    assert_eq!(decode(&b, MAX).unwrap_err(), ProtocolError::Version(2));
    let mut b = encode_to_vec(&Frame::Barrier { seq: 1 });
    b[1] = 200;
    assert_eq!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::UnknownType(200)
    );
    let mut b = encode_to_vec(&Frame::Barrier { seq: 1 });
    b[2] = 1;
    assert!(matches!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::Flags { .. }
    ));
    let mut b = encode_to_vec(&Frame::Barrier { seq: 1 });
    b[4..8].copy_from_slice(&(MAX + 1).to_le_bytes());
    assert!(matches!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::TooLarge { .. }
    ));
}

#[test]
fn malformed_payloads() {
    // Trailing bytes on a fixed-size frame.
    let mut b = encode_to_vec(&Frame::Barrier { seq: 1 });
    b.push(0);
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::Malformed { .. }
    ));
    // A raw chunk whose payload disagrees with its length.
    let f = Frame::Chunk(ChunkFrame {
        index: 0,
        encoding: Encoding::Raw,
        raw_len: 10,
        digest: 0,
        payload: Bytes::from_static(b"abc"),
    });
    assert!(decode(&encode_to_vec(&f), MAX).is_err());
    // A zero chunk with a payload.
    let f = Frame::Chunk(ChunkFrame {
        index: 0,
        encoding: Encoding::Zero,
        raw_len: 10,
        digest: 0,
        payload: Bytes::from_static(b"abc"),
    });
    assert!(decode(&encode_to_vec(&f), MAX).is_err());
    // Chunks (a resync's too) claiming more plaintext than the largest chunk.
    let big = ChunkFrame {
        index: 0,
        encoding: Encoding::Lz4,
        raw_len: crate::config::CHUNK_BYTES_MAX + 1,
        digest: 0,
        payload: Bytes::from_static(b"abc"),
    };
    for f in [
        Frame::Chunk(big.clone()),
        Frame::LiveChunk { seq: 1, chunk: big },
    ] {
        let err = decode(&encode_to_vec(&f), MAX).unwrap_err();
        assert!(err.to_string().contains("largest chunk size"), "{err}");
    }
    // Zero runs must cover 1..=ZERO_RUN_CHUNKS_MAX chunks.
    for count in [0, ZERO_RUN_CHUNKS_MAX + 1] {
        let b = encode_to_vec(&Frame::ZeroRun { first: 0, count });
        assert!(decode(&b, MAX).is_err(), "{count}");
    }
    // A digest batch claiming too many digests.
    let mut b = encode_to_vec(&Frame::DigestBatch {
        first: 0,
        digests: vec![],
    });
    b[16..20].copy_from_slice(&(DIGESTS_PER_BATCH + 1).to_le_bytes());
    assert!(decode(&b, MAX).is_err());
}

#[test]
fn open_chunk_checks() {
    let vol = 3 * 4096 + 100;
    let zero = digest(&[0u8; 4096]);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
    let c = seal_chunk(1, data.clone(), digest(&data), zero, true);
    assert_eq!(c.encoding, Encoding::Lz4);
    let mut out = vec![0u8; 4096];
    assert_eq!(open_chunk(&c, vol, 4096, &mut out).unwrap(), 4096);
    assert_eq!(out, data);
    // Beyond the volume.
    let mut c2 = c.clone();
    c2.index = 4;
    assert!(matches!(
        open_chunk(&c2, vol, 4096, &mut out),
        Err(ProtocolError::ChunkOutOfRange { .. })
    ));
    // Last chunk is short: a full-length chunk is refused there.
    let mut c3 = c.clone();
    c3.index = 3;
    assert!(matches!(
        open_chunk(&c3, vol, 4096, &mut out),
        Err(ProtocolError::ChunkLength { .. })
    ));
    // Digest mismatch.
    let mut c4 = c.clone();
    c4.digest ^= 1;
    assert!(matches!(
        open_chunk(&c4, vol, 4096, &mut out),
        Err(ProtocolError::DigestMismatch { .. })
    ));
    // Corrupt lz4 stream.
    let mut c5 = c.clone();
    let mut p = c5.payload.to_vec();
    p.truncate(p.len() / 2);
    c5.payload = Bytes::from(p);
    assert!(open_chunk(&c5, vol, 4096, &mut out).is_err());
    // Zero chunk.
    let z = seal_chunk(0, vec![0u8; 4096], zero, zero, true);
    assert_eq!(z.encoding, Encoding::Zero);
    out.fill(1);
    open_chunk(&z, vol, 4096, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0));
    // Random data stays raw.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let r: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    assert_eq!(
        seal_chunk(0, r.clone(), digest(&r), zero, true).encoding,
        Encoding::Raw
    );
}

/// Random and mutated inputs never panic the decoder.
#[test]
fn decoder_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let frames: Vec<Vec<u8>> = samples().iter().map(encode_to_vec).collect();
    for i in 0..20_000 {
        let mut b = frames[i % frames.len()].clone();
        let flips = rng.gen_range(1..4);
        for _ in 0..flips {
            let p = rng.gen_range(0..b.len());
            b[p] = rng.gen();
        }
        if rng.gen_bool(0.2) {
            let n = rng.gen_range(0..b.len());
            b.truncate(n);
        }
        if let Ok(Some((Frame::Chunk(c), _))) = decode(&b, MAX) {
            let mut out = vec![0u8; 8192];
            let _ = open_chunk(&c, 1 << 20, 4096, &mut out);
        }
    }
    for _ in 0..5_000 {
        let n = rng.gen_range(0..64);
        let b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        let _ = decode(&b, MAX);
    }
}

/// Restore frames: every malformed input is a clean `Malformed` error.
#[test]
fn restore_frames_reject_malformed_input() {
    let malformed = |b: &[u8]| {
        assert!(
            matches!(decode(b, MAX), Err(ProtocolError::Malformed { .. })),
            "{b:?} decoded as {:?}",
            decode(b, MAX)
        );
    };
    // Unknown request flags.
    let mut b = encode_to_vec(&Frame::RestoreRequest {
        point: 1,
        digests: true,
    });
    b[16] = 0x81;
    malformed(&b);
    // Truncated payloads of every fixed-size restore frame (header patched).
    for f in [
        Frame::RestoreRequest {
            point: 1,
            digests: false,
        },
        Frame::RestoreReady { point: 1 },
        Frame::ReadEnd { chunks: 1 },
        Frame::RestoreEnd { chunks: 1 },
        Frame::ReadChunks {
            first_word: 0,
            words: vec![1, 2],
        },
    ] {
        let full = encode_to_vec(&f);
        for cut in HEADER_BYTES..full.len() {
            let mut b = full[..cut].to_vec();
            let n = (cut - HEADER_BYTES) as u32;
            b[4..8].copy_from_slice(&n.to_le_bytes());
            malformed(&b);
        }
        // And one trailing byte.
        let mut b = full.clone();
        b.push(0);
        let n = (b.len() - HEADER_BYTES) as u32;
        b[4..8].copy_from_slice(&n.to_le_bytes());
        malformed(&b);
    }
    // ReadChunks word counts: 0 and more than a batch are refused before
    // anything is allocated; a count larger than the payload is truncation.
    let base = encode_to_vec(&Frame::ReadChunks {
        first_word: 0,
        words: vec![7],
    });
    for n in [0u32, CHANGED_WORDS_PER_BATCH + 1, u32::MAX, 2] {
        let mut b = base.clone();
        b[16..20].copy_from_slice(&n.to_le_bytes());
        malformed(&b);
    }
    // Words beyond the largest possible volume, and an overflowing start.
    for first in [
        crate::config::VOLUME_CHUNKS_MAX / 64,
        u64::MAX,
        u64::MAX - 1,
    ] {
        let b = encode_to_vec(&Frame::ReadChunks {
            first_word: first,
            words: vec![1, 2],
        });
        malformed(&b);
    }
    // The last word of the largest volume is fine.
    let b = encode_to_vec(&Frame::ReadChunks {
        first_word: crate::config::VOLUME_CHUNKS_MAX / 64 - 1,
        words: vec![1],
    });
    assert!(decode(&b, MAX).unwrap().is_some());
    // Unknown hello flags are still refused next to the read flag.
    let mut b = encode_to_vec(&Frame::Hello(Hello {
        volume: "v".into(),
        volume_bytes: 0,
        chunk_bytes: 0,
        flags: HELLO_FLAG_READ,
        source_id: 0,
    }));
    let flags_at = HEADER_BYTES + 2 + 1 + 8 + 4;
    assert_eq!(b[flags_at], HELLO_FLAG_READ);
    b[flags_at] = 128 | HELLO_FLAG_READ;
    malformed(&b);
}

/// Failover frames: bitmap batches within their limits, known roles only.
#[test]
fn failover_frames_reject_malformed_input() {
    // ChangedBatch with no words, or more than allowed.
    let mut b = encode_to_vec(&Frame::ChangedBatch {
        first_word: 0,
        words: vec![1],
    });
    b[16..20].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::Malformed { .. }
    ));
    b[16..20].copy_from_slice(&(CHANGED_WORDS_PER_BATCH + 1).to_le_bytes());
    assert!(decode(&b, MAX).is_err());
    // A HelloAck with an unknown role byte.
    let ack = HelloAck {
        replica_id: 1,
        state: ReplicaState::UpToDate,
        source_id: 2,
        gen: GenIds::default(),
        volume_bytes: 4096,
        chunk_bytes: 4096,
        created: false,
        primary: false,
        changed: 0,
        promoted_unix: 0,
    };
    let mut b = encode_to_vec(&Frame::HelloAck(ack));
    // Role is after the fixed fields and the generation ids: 8 header +
    // 16 + 1 + 16 + 8 + 8 + 4 + 1 + 8 + 16 bytes.
    let role = 8 + 16 + 1 + 16 + 8 + 8 + 4 + 1 + 8 + 16;
    b[role] = 7;
    assert!(matches!(
        decode(&b, MAX).unwrap_err(),
        ProtocolError::Malformed { .. }
    ));
    // A Takeover carries nothing.
    let mut b = encode_to_vec(&Frame::Takeover);
    b.push(0);
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(decode(&b, MAX).is_err());
}
