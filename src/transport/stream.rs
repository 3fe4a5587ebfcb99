//! Frames over quinn streams: the only place where protocol frames meet QUIC.

use std::future::Future;
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
    /// A frame being read: the header bytes so far, then the parsed header
    /// and the payload so far. Kept here (not in the future) so that `recv`
    /// is cancel-safe: a dropped `recv` loses nothing.
    head: [u8; HEADER_BYTES],
    head_len: usize,
    header: Option<protocol::Header>,
    payload: BytesMut,
}

impl FrameReceiver {
    fn new(recv: quinn::RecvStream, payload_bytes_max: u32) -> Self {
        FrameReceiver {
            recv,
            payload_bytes_max,
            head: [0; HEADER_BYTES],
            head_len: 0,
            header: None,
            payload: BytesMut::new(),
        }
    }

    /// Next frame, or `None` when the peer finished the stream cleanly.
    /// Cancel-safe: if the future is dropped, the next call continues where
    /// it stopped (quinn's `read` and `read_chunk` are cancel-safe, and the
    /// partial frame lives in `self`).
    pub async fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        while self.header.is_none() {
            match self.recv.read(&mut self.head[self.head_len..]).await {
                Ok(Some(n)) => self.head_len += n,
                Ok(None) if self.head_len == 0 => return Ok(None),
                Ok(None) => return Err(LinkError::Truncated),
                Err(e) => return Err(read_err(e)),
            }
            if self.head_len == HEADER_BYTES {
                let header = protocol::parse_header(&self.head, self.payload_bytes_max)?;
                // Gather the payload from the stream's received chunks: no
                // zeroing, one copy.
                self.payload = BytesMut::with_capacity(header.payload_len as usize);
                self.header = Some(header);
            }
        }
        let want = self.header.map_or(0, |h| h.payload_len as usize);
        while self.payload.len() < want {
            match self.recv.read_chunk(want - self.payload.len(), true).await {
                Ok(Some(c)) => self.payload.extend_from_slice(&c.bytes),
                Ok(None) => return Err(LinkError::Truncated),
                Err(e) => return Err(read_err(e)),
            }
        }
        let header = self.header.take().expect("set above");
        self.head_len = 0;
        let payload: Bytes = std::mem::take(&mut self.payload).freeze();
        Ok(Some(protocol::decode_payload(header, payload)?))
    }

    /// The next frame if it has already arrived in full, without waiting:
    /// `None` if it has not (what has arrived of it is kept for `recv`).
    pub fn try_recv(&mut self) -> Option<Result<Option<Frame>, LinkError>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let fut = std::pin::pin!(self.recv());
        match fut.poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }

    /// Tell the peer we will read no more.
    pub fn stop(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }
}
