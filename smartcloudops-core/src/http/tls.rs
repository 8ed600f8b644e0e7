//! TLS with rustls (the ring provider): a certificate chain and a private key from PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problems, Result};

/// `tls = { cert_file, key_file }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate, then any intermediates; relative to the
    /// configuration file.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// Every problem of this table, paths relative to it.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::new();
        for (field, path) in [("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            p.check(
                !path.as_os_str().is_empty(),
                field,
                "must name a PEM file",
                "",
            );
        }
        p
    }

    /// Reads the certificate and key now and builds the acceptor (HTTP/1.1 over TLS 1.2/1.3).
    pub(crate) fn acceptor(&self, base_dir: &Path) -> Result<tokio_rustls::TlsAcceptor> {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        let (cert_path, key_path) = (resolve(&self.cert_file), resolve(&self.key_file));
        let fail = |what: &str, path: &Path, e: &dyn std::fmt::Display| Error::Connector {
            connector: "tls".into(),
            message: format!("{what} {}: {e}", path.display()),
        };
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| fail("reading the certificate file", &cert_path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("parsing the certificate file", &cert_path, &e))?;
        if certs.is_empty() {
            return Err(fail(
                "no certificate in",
                &cert_path,
                &"expected a PEM CERTIFICATE block",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| fail("reading the private key file", &key_path, &e))?;
        // rustls 0.23.48 deprecates ring's provider for lacking post-quantum key exchange;
        // ring builds with only a C compiler, aws-lc-rs needs more of the build machine.
        // Classical TLS 1.2/1.3 is what Prometheus and proxies speak today.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("configuring TLS for", &cert_path, &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| fail("the certificate and key do not match:", &cert_path, &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}
