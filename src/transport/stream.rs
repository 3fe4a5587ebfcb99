//! Frames over quinn streams: the only place where protocol frames meet QUIC.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use crate::protocol::{self, Frame, ProtocolError, HEADER_BYTES};

/// Application close codes.
pub const CLOSE_OK: u32 = 0;
pub const CLOSE_ERROR: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("peer closed the connection: {0}")]
    Closed(String),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

fn conn_err(e: quinn::ConnectionError) -> LinkError {
    match e {
        quinn::ConnectionError::ApplicationClosed(a) => {
            let reason = String::from_utf8_lossy(&a.reason).into_owned();
            if reason.is_empty() {
                LinkError::Closed(format!("closed with code {}", a.error_code))
            } else {
                LinkError::Closed(reason)
            }
        }
        other => LinkError::Closed(other.to_string()),
    }
}

fn read_err(e: quinn::ReadError) -> LinkError {
    match e {
        quinn::ReadError::ConnectionLost(c) => conn_err(c),
        other => LinkError::Closed(other.to_string()),
    }
}

fn write_err(e: quinn::WriteError) -> LinkError {
    match e {
        quinn::WriteError::ConnectionLost(c) => conn_err(c),
        other => LinkError::Closed(other.to_string()),
    }
}

/// An established, authenticated connection.
#[derive(Clone)]
pub struct Link {
    conn: quinn::Connection,
    payload_bytes_max: u32,
}

impl Link {
    pub fn new(conn: quinn::Connection, payload_bytes_max: u32) -> Self {
        Link {
            conn,
            payload_bytes_max,
        }
    }

    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    pub fn peer_fingerprint(&self) -> Option<super::Fingerprint> {
        super::peer_fingerprint(&self.conn)
    }

    pub async fn open_control(&self) -> Result<(FrameSender, FrameReceiver), LinkError> {
        let (s, r) = self.conn.open_bi().await.map_err(conn_err)?;
        Ok((
            FrameSender::new(s),
            FrameReceiver::new(r, self.payload_bytes_max),
        ))
    }

    pub async fn accept_control(&self) -> Result<(FrameSender, FrameReceiver), LinkError> {
        let (s, r) = self.conn.accept_bi().await.map_err(conn_err)?;
        Ok((
            FrameSender::new(s),
            FrameReceiver::new(r, self.payload_bytes_max),
        ))
    }

    pub async fn open_data(&self) -> Result<FrameSender, LinkError> {
        let s = self.conn.open_uni().await.map_err(conn_err)?;
        Ok(FrameSender::new(s))
    }

    pub async fn accept_data(&self) -> Result<FrameReceiver, LinkError> {
        let r = self.conn.accept_uni().await.map_err(conn_err)?;
        Ok(FrameReceiver::new(r, self.payload_bytes_max))
    }

    /// Close the connection, telling the peer why.
    pub fn close(&self, code: u32, reason: &str) {
        let r = reason.as_bytes();
        let r = &r[..r.len().min(1000)];
        self.conn.close(code.into(), r);
    }

    /// Wait until the connection is closed; returns why.
    pub async fn closed(&self) -> LinkError {
        conn_err(self.conn.closed().await)
    }

    /// Bytes of UDP payload sent so far (all streams, headers, retransmits).
    pub fn udp_bytes_sent(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }
}

pub struct FrameSender {
    send: quinn::SendStream,
    scratch: BytesMut,
}

impl FrameSender {
    fn new(send: quinn::SendStream) -> Self {
        FrameSender {
            send,
            scratch: BytesMut::with_capacity(4096),
        }
    }

    /// Send one frame; returns the bytes it took on the stream.
    pub async fn send(&mut self, frame: &Frame) -> Result<u64, LinkError> {
        self.scratch.clear();
        let tail = protocol::encode(frame, &mut self.scratch);
        let head = self.scratch.split().freeze();
        let mut n = head.len() as u64;
        match tail {
            Some(t) if !t.is_empty() => {
                n += t.len() as u64;
                let mut parts = [head, t];
                self.send
                    .write_all_chunks(&mut parts)
                    .await
                    .map_err(write_err)?;
            }
            _ => {
                self.send.write_chunk(head).await.map_err(write_err)?;
            }
        }
        Ok(n)
    }

    /// Finish the stream (no more frames).
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Finish the stream and wait (at most `timeout`) until the peer has
    /// received everything on it: before closing the connection with an
    /// error, so that the peer reads the error frame rather than losing it to
    /// the close.
    pub async fn finish_and_wait(&mut self, timeout: std::time::Duration) {
        let _ = self.send.finish();
        let _ = tokio::time::timeout(timeout, self.send.stopped()).await;
    }
}

pub struct FrameReceiver {
    recv: quinn::RecvStream,
    payload_bytes_max: u32,
}

impl FrameReceiver {
    fn new(recv: quinn::RecvStream, payload_bytes_max: u32) -> Self {
        FrameReceiver {
            recv,
            payload_bytes_max,
        }
    }

    /// Next frame, or `None` when the peer finished the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        let mut h = [0u8; HEADER_BYTES];
        match self.recv.read_exact(&mut h).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(LinkError::Truncated),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(read_err(e)),
        }
        let header = protocol::parse_header(&h, self.payload_bytes_max)?;
        // Gather the payload from the stream's received chunks: no zeroing,
        // one copy.
        let want = header.payload_len as usize;
        let mut payload = BytesMut::with_capacity(want);
        while payload.len() < want {
            match self.recv.read_chunk(want - payload.len(), true).await {
                Ok(Some(c)) => payload.extend_from_slice(&c.bytes),
                Ok(None) => return Err(LinkError::Truncated),
                Err(e) => return Err(read_err(e)),
            }
        }
        let payload: Bytes = payload.freeze();
        Ok(Some(protocol::decode_payload(header, payload)?))
    }

    /// Tell the peer we will read no more.
    pub fn stop(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }
}
