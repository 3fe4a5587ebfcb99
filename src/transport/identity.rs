//! Node identity: a self-signed certificate and its private key, stored as PEM files.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Fingerprint, TransportError};

/// File name of the certificate inside an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the private key inside an identity directory.
pub const KEY_FILE: &str = "key.pem";
/// Subject common name and DNS SAN of every blkmirror certificate.
pub const CERT_NAME: &str = "blkmirror";

/// A node's TLS identity: one self-signed certificate plus its private key (both DER).
///
/// Peers authenticate each other by pinning the SHA-256 [`Fingerprint`] of the certificate,
/// so no CA, names or validity periods are involved.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Create `dir` (mode 0700) if needed and write a fresh self-signed ECDSA P-256 identity to
    /// `dir/cert.pem` and `dir/key.pem` (key mode 0600, created with `O_EXCL`).
    ///
    /// Refuses (with [`TransportError::AlreadyExists`]) if either file already exists.
    pub fn generate(dir: &Path) -> Result<Identity, TransportError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TransportError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        for path in [&cert_path, &key_path] {
            match fs::symlink_metadata(path) {
                Ok(_) => return Err(TransportError::AlreadyExists { path: path.clone() }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(TransportError::ReadFile {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }

        let (cert_pem, key_pem, identity) = new_self_signed()?;

        // Key first: if it fails nothing has been written.
        write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new_file(&cert_path, cert_pem.as_bytes(), 0o644) {
            // Do not leave a key without its certificate behind (we created it, O_EXCL).
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        tracing::info!(
            dir = %dir.display(),
            fingerprint = %identity.fingerprint,
            "generated new identity"
        );
        Ok(identity)
    }

    /// Create a fresh identity in memory only (nothing is written to disk).
    pub fn ephemeral() -> Result<Identity, TransportError> {
        new_self_signed().map(|(_, _, identity)| identity)
    }

    /// Load `dir/cert.pem` and `dir/key.pem` and check that the key belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Identity, TransportError> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TransportError::NotADirectory {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TransportError::MissingDir {
                    path: dir.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(TransportError::ReadFile {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);

        let cert_pem = read_file(&cert_path)?;
        let mut certs = Vec::new();
        for item in rustls_pemfile::certs(&mut cert_pem.as_slice()) {
            certs.push(item.map_err(|e| TransportError::BadPem {
                path: cert_path.clone(),
                reason: format!("cannot parse PEM: {e}"),
            })?);
        }
        let cert = match certs.len() {
            1 => certs.remove(0),
            0 => {
                return Err(TransportError::BadPem {
                    path: cert_path,
                    reason: "no CERTIFICATE block found".into(),
                })
            }
            n => {
                return Err(TransportError::BadPem {
                    path: cert_path,
                    reason: format!("expected exactly one CERTIFICATE block, found {n}"),
                })
            }
        };

        let key_pem = read_file(&key_path)?;
        warn_if_key_readable_by_others(&key_path);
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| TransportError::BadPem {
                path: key_path.clone(),
                reason: format!("cannot parse PEM: {e}"),
            })?
            .ok_or_else(|| TransportError::BadPem {
                path: key_path.clone(),
                reason: "no PRIVATE KEY block found".into(),
            })?;

        let identity = Identity::from_der(cert, key).map_err(|e| match e {
            FromDerError::BadKey(reason) => TransportError::BadPem {
                path: key_path.clone(),
                reason,
            },
            FromDerError::BadCert(reason) => TransportError::BadPem {
                path: cert_path.clone(),
                reason,
            },
            FromDerError::Mismatch => TransportError::KeyMismatch {
                key: key_path.clone(),
                cert: cert_path.clone(),
            },
        })?;
        Ok(identity)
    }

    fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, FromDerError> {
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| FromDerError::BadKey(format!("unusable private key: {e}")))?;
        let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(FromDerError::Mismatch)
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                return Err(FromDerError::BadKey(
                    "cannot derive the public key of this private key".into(),
                ))
            }
            Err(e) => return Err(FromDerError::BadCert(format!("invalid certificate: {e}"))),
        }
        let fingerprint = Fingerprint::of_der(&cert);
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }

    /// SHA-256 fingerprint of the certificate (what peers pin).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate, DER encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

enum FromDerError {
    BadKey(String),
    BadCert(String),
    Mismatch,
}

fn new_self_signed() -> Result<(String, String, Identity), TransportError> {
    let gen_err = |e: rcgen::Error| TransportError::CertGen(e.to_string());
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).map_err(gen_err)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, CERT_NAME);
    params.distinguished_name = dn;
    let cert = params.self_signed(&key_pair).map_err(gen_err)?;

    let cert_der = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let identity = Identity::from_der(cert_der, key_der).map_err(|_| {
        TransportError::CertGen("generated key does not match generated certificate".into())
    })?;
    Ok((cert.pem(), key_pair.serialize_pem(), identity))
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TransportError> {
    let map = |source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            TransportError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            TransportError::WriteFile {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(map)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(path);
        return Err(TransportError::WriteFile {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TransportError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            TransportError::ReadFile {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn warn_if_key_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "private key is accessible by group/others; chmod 600 recommended"
            );
        }
    }
}
