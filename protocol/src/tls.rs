//! TLS settings for the agent → aggregator hop, built on rustls with the `ring` provider: the
//! client side (which roots an agent trusts) and the server side (the aggregator's certificate).
//!
//! Trust: with a CA bundle file, an agent trusts exactly the certificates in it (an aggregator
//! inside a cluster normally carries a certificate from a private CA, and pinning that CA keeps any
//! public CA from vouching for it); without one, it trusts the Mozilla root set compiled into the
//! binary (`webpki-roots`), so the behaviour is the same on every host and in images that ship no
//! CA bundle. This module only reads PEM files and builds configurations; it never opens a socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS file that cannot be used; names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file; an error if there is none.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(what, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            what,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// Client settings for posting hints: roots from `ca_file` alone, or the compiled-in Mozilla
/// roots without one.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs("CA file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_err("CA file", path, format!("unusable certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // No ALPN here: the HTTPS connector sets it from the HTTP versions it enables.
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTP/1 connector that takes both `http://` and `https://` URLs, the latter through
/// rustls with `tls`; TCP connects give up after `connect_timeout`.
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    // The TLS layer needs the TCP connector to accept https:// URIs too.
    connector.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector)
}

/// Server settings for the aggregator's HTTP API: the certificate chain in `cert` (leaf first)
/// and the private key in `key` (PKCS#8, PKCS#1 or SEC1 PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = read_certs("--tls-cert", cert)?;
    let key_bytes = std::fs::read(key).map_err(|e| file_err("--tls-key", key, e))?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        file_err(
            "--tls-key",
            key,
            format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            file_err(
                "--tls-key",
                key,
                format!("does not fit the certificate in {}: {e}", cert.display()),
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("CA file") && e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(Some(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = server_config(&empty, &missing).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("empty.pem"), "{e}");
        assert!(client_config(None).is_ok(), "compiled-in roots always load");
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("a.pem"), dir.path().join("b.key"));
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        let e = server_config(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("b.key") && e.contains("does not fit"), "{e}");
        std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
        server_config(&cert, &key).unwrap();
    }
}
