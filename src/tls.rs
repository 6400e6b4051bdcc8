//! Certificates and keys: PEM files turned into rustls configurations for
//! the registry listener (`server.tls`), and the names a verified client
//! certificate carries. Config validation loads through here too, so that
//! `check-config` finds a key that does not belong to its certificate.
//! A leaf: rustls, x509-cert.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// The ALPN protocols the listener offers, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (a PEM block \"BEGIN CERTIFICATE\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{} holds no usable private key: {e}", path.display()))
}

/// Which file of a TLS setup a problem is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    Cert,
    Key,
    ClientCa,
}

/// A problem with a TLS file, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub file: File,
    pub message: String,
}

fn at(file: File) -> impl FnOnce(String) -> TlsError {
    move |message| TlsError { file, message }
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = read_certs(cert).map_err(at(File::Cert))?;
    let key_der = read_key(key).map_err(at(File::Key))?;
    let signing = ring::sign::any_supported_type(&key_der).map_err(|e| TlsError {
        file: File::Key,
        message: format!(
            "{}: the key type is not supported ({e}); use RSA, ECDSA P-256/P-384 or Ed25519",
            key.display()
        ),
    })?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| TlsError {
        file: File::Key,
        message: format!(
            "{} is not the key of the certificate in {}",
            key.display(),
            cert.display()
        ),
    })?;
    Ok(ck)
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `h2` and
/// `http/1.1`, and with `client_ca` client certificates verified against
/// it. A client without a certificate is let through the handshake: the
/// request is answered 401 in the registry's format, which clients can
/// show, instead of a failed handshake they cannot explain. A certificate
/// that does not verify (another CA, expired) fails the handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let ck = certified_key(cert, key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError {
            file: File::Cert,
            message: format!("TLS setup: {e}"),
        })?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca).map_err(at(File::ClientCa))? {
                roots.add(c).map_err(|e| TlsError {
                    file: File::ClientCa,
                    message: format!("{}: not a usable CA certificate: {e}", ca.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError {
                    file: File::ClientCa,
                    message: format!("{}: {e}", ca.display()),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The DNS names of its subjectAltName, else its subject's common name:
    /// what `[[tenant]] clients` patterns match.
    pub names: Vec<String>,
}

impl ClientCert {
    /// The name audit records and logs show.
    pub fn shown(&self) -> &str {
        self.names.first().map_or("(no name)", String::as_str)
    }
}

/// Reads the names of a client certificate (DER) that rustls has verified.
pub fn client_cert(der: &[u8]) -> Result<ClientCert, String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;

    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    let tbs = &cert.tbs_certificate;
    let mut names = Vec::new();
    if let Ok(Some((_, san))) = tbs.get::<SubjectAltName>() {
        for n in san.0 {
            if let GeneralName::DnsName(d) = n {
                names.push(d.as_str().to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = common_name(&tbs.subject) {
            names.push(cn);
        }
    }
    Ok(ClientCert { names })
}

fn common_name(subject: &x509_cert::name::Name) -> Option<String> {
    use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
    const CN: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .and_then(|atv| {
            atv.value
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_owned())
                .or_else(|_| {
                    atv.value
                        .decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_owned())
                })
                .ok()
        })
}
