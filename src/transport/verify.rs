//! rustls certificate verifiers that authenticate peers by certificate fingerprint only.
//!
//! Both verifiers ignore names, CAs and validity periods (the certificates are self-signed and
//! pinned), but still verify the TLS 1.3 handshake signature with the crypto provider's
//! algorithms, which proves the peer holds the private key of the pinned certificate.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use super::Fingerprint;

/// Why a peer certificate was refused; carried inside `rustls::Error` so it shows up in the
/// QUIC close reason on both sides.
pub(crate) enum Refusal {
    ClientNotAllowed(Fingerprint),
    ServerNotPinned {
        presented: Fingerprint,
        pinned: Fingerprint,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ClientNotAllowed(fp) => {
                write!(f, "client certificate {fp} is not in the allowed list")
            }
            Refusal::ServerNotPinned { presented, pinned } => write!(
                f,
                "server certificate {presented} is not pinned (expected {pinned})"
            ),
        }
    }
}

// rustls formats `OtherError` with `Debug`; make that the readable message.
impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refusal {}

fn refuse(r: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
}

/// Server side: accept a client only if its certificate fingerprint is allowed.
#[derive(Debug)]
pub(crate) struct AllowListClientVerifier {
    allowed: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AllowListClientVerifier {
    pub(crate) fn new(allowed: &[Fingerprint], algorithms: WebPkiSupportedAlgorithms) -> Self {
        AllowListClientVerifier {
            allowed: allowed.to_vec(),
            algorithms,
        }
    }
}

impl ClientCertVerifier for AllowListClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of_der(end_entity);
        if self.allowed.contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %fp, "refusing client certificate: not in allowed list");
            Err(refuse(Refusal::ClientNotAllowed(fp)))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable in practice (configs are TLS 1.3 only), but verify correctly anyway.
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side: accept only the one pinned server certificate. Records what the server
/// presented so the caller can report it.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pinned: Fingerprint,
    presented: Mutex<Option<Fingerprint>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    pub(crate) fn new(pinned: Fingerprint, algorithms: WebPkiSupportedAlgorithms) -> Self {
        PinnedServerVerifier {
            pinned,
            presented: Mutex::new(None),
            algorithms,
        }
    }

    /// Fingerprint of the certificate the server presented, if it got that far.
    pub(crate) fn presented(&self) -> Option<Fingerprint> {
        *self.presented.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of_der(end_entity);
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        if fp == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(Refusal::ServerNotPinned {
                presented: fp,
                pinned: self.pinned,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
