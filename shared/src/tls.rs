//! TLS for every outgoing HTTP connection of both binaries (ClickHouse,
//! the OTLP collector): rustls with the ring provider.
//!
//! The roots are the system's, found as OpenSSL-based tools find them
//! (`SSL_CERT_FILE` and `SSL_CERT_DIR` first, then the distribution's
//! bundle), plus the certificates of an optional CA file, for a private CA
//! or a self-signed server. A CA file that cannot be read or holds no
//! certificate stops start-up naming the key; a server whose certificate
//! does not chain to these roots fails its connections with rustls's
//! reason ("invalid peer certificate: UnknownIssuer"), which the callers
//! put in their log and `/readyz`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {error}")]
    Read {
        key: &'static str,
        path: String,
        error: String,
    },
    #[error("{key}: {path} holds no PEM certificate")]
    NoCertificate { key: &'static str, path: String },
    #[error("{key}: {path}: a certificate is not valid: {error}")]
    Invalid {
        key: &'static str,
        path: String,
        error: String,
    },
    #[error("TLS set-up: {0}")]
    Setup(String),
}

/// The certificates of the PEM file `path` (`key` names the setting in
/// errors).
pub fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read {
        key,
        path: shown.clone(),
        error: e.to_string(),
    })?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            key,
            path: shown.clone(),
            error: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { key, path: shown });
    }
    Ok(certificates)
}

/// A client configuration trusting the system's roots and those of
/// `ca_file` (named `key` in errors).
pub fn client_config(
    key: &'static str,
    ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable entries of the system store are skipped, as OpenSSL does;
    // an empty system store is fine when a CA file is given.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        for certificate in read_certificates(key, path)? {
            roots.add(certificate).map_err(|e| TlsError::Invalid {
                key,
                path: path.display().to_string(),
                error: e.to_string(),
            })?;
        }
    }
    // ring, not aws-lc-rs: no C library to build with cmake on every
    // machine. rustls 0.23.48 deprecates it for lacking post-quantum key
    // exchange; connections use classical ECDHE key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_names_its_key() {
        let error = client_config(
            "ingester.clickhouse.ca_file",
            Some(Path::new("/nonexistent")),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ingester.clickhouse.ca_file"), "{error}");
        assert!(error.contains("/nonexistent"), "{error}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(empty.path(), "not a certificate\n").unwrap();
        let error = client_config("telemetry.otlp_ca_file", Some(empty.path()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no PEM certificate"), "{error}");
    }

    #[test]
    fn without_a_ca_file_the_system_roots_are_enough() {
        client_config("x", None).unwrap();
    }
}
