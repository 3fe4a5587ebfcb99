//! Prometheus exporter for the counters and gauges recorded through the
//! `metrics` crate.

use std::net::SocketAddr;

use crate::error::{Error, Result};

/// Serve metrics in Prometheus text format on `addr` (call inside a tokio runtime).
pub fn install(addr: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| Error::Config(format!("cannot serve metrics on {addr}: {e}")))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        "blkmirror_sync_bytes_read_total",
        Unit::Bytes,
        "Bytes read from the source by syncs"
    );
    describe_counter!(
        "blkmirror_sync_bytes_on_wire_total",
        Unit::Bytes,
        "UDP payload bytes sent by syncs"
    );
    describe_counter!("blkmirror_sync_chunks_sent_total", "Chunks sent with data");
    describe_counter!(
        "blkmirror_sync_chunks_zero_total",
        "Chunks sent as zero markers"
    );
    describe_counter!(
        "blkmirror_sync_chunks_skipped_total",
        "Chunks found unchanged and not sent"
    );
    describe_gauge!(
        "blkmirror_sync_duration_seconds",
        Unit::Seconds,
        "Duration of the last sync"
    );
    describe_gauge!(
        "blkmirror_replica_state",
        "Replica state: 1 UpToDate, 2 Inconsistent, 3 New"
    );
    describe_counter!(
        "blkmirror_mirror_chunks_written_total",
        "Chunks written to replicas"
    );
    describe_counter!(
        "blkmirror_mirror_bytes_written_total",
        Unit::Bytes,
        "Bytes written to replicas"
    );
    describe_counter!(
        "blkmirror_mirror_chunks_zero_total",
        "Zero markers received by the mirror"
    );
}
