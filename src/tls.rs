//! TLS to PostgreSQL, through rustls, with libpq's meaning of `sslmode` and `sslrootcert`.
//!
//! pgfresh uses TLS only when the URL asks for it. Without `sslmode` it connects in plain text, unlike
//! libpq, whose default is `prefer`: a listener next to its database should not pay for TLS it did not
//! ask for. With it, as in libpq:
//!
//! - `prefer` (TLS if the server offers it) and `require` (TLS or fail) encrypt but do not verify the
//!   server's certificate: they protect against eavesdropping, not against an impostor;
//! - `verify-ca` also checks that the certificate chains to a trusted root;
//! - `verify-full` also checks that it names the host connected to.
//!
//! The trusted roots are the PEM file named by `sslrootcert`, `~/.postgresql/root.crt` when it is not
//! given, or the system's roots with `sslrootcert=system`. tokio-postgres itself knows neither
//! `verify-*` nor `sslrootcert`, so [`PostgresTls::from_url`] takes them out of the URL before it is
//! parsed and asks tokio-postgres for `require`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The stream type of a connection made with [`PostgresTls::connector`].
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// How much of the server's certificate is checked.
#[derive(Clone, Debug)]
pub enum Verify {
    /// Nothing (`prefer`, `require`, or no TLS at all).
    Nothing,
    /// The chain leads to one of these trusted roots (`verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The chain leads to one of these trusted roots and the certificate names the host
    /// (`verify-full`).
    ChainAndName(Arc<RootCertStore>),
}

/// A PostgreSQL URL's TLS settings, and the URL as tokio-postgres can parse it.
pub struct PostgresTls {
    /// The URL with `sslrootcert` removed and `verify-*` turned into `require`.
    pub url: String,
    /// Whether the URL asks for TLS at all (it names an `sslmode`).
    pub asks_for_tls: bool,
    /// What is checked of the server's certificate.
    pub verify: Verify,
}

impl PostgresTls {
    /// Reads `sslmode` and `sslrootcert` out of a URL or key=value string; loads the trusted roots
    /// when a `verify-*` mode needs them. The error is one line saying what to fix.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (url, params) = take_params(url);
        let roots = || load_roots(params.sslrootcert.as_deref()).map(Arc::new);
        let verify = match params.sslmode.as_deref() {
            None | Some("disable" | "prefer" | "require") => Verify::Nothing,
            Some("verify-ca") => Verify::Chain(roots()?),
            Some("verify-full") => Verify::ChainAndName(roots()?),
            Some(other) => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        };
        Ok(Self {
            url,
            asks_for_tls: params.sslmode.is_some(),
            verify,
        })
    }

    /// The TLS connector for these settings; it is only engaged when `sslmode` asks for TLS.
    pub fn connector(&self) -> MakeRustlsConnect {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let webpki = |roots: &Arc<RootCertStore>| {
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .expect("a non-empty root store builds a verifier")
        };
        let verifier: Arc<dyn ServerCertVerifier> = match &self.verify {
            Verify::ChainAndName(roots) => webpki(roots),
            Verify::Chain(roots) => Arc::new(Lenient {
                chain: Some(webpki(roots)),
                provider: provider.clone(),
            }),
            Verify::Nothing => Arc::new(Lenient {
                chain: None,
                provider: provider.clone(),
            }),
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        MakeRustlsConnect::new(config)
    }
}

/// The TLS parameters pgfresh handles itself.
#[derive(Default)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Takes `sslrootcert` out of the URL (query string or key=value form), and `sslmode=verify-*` down to
/// `require`; returns the rewritten URL and what was found.
fn take_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let in_url = url.contains("://");
    let mut keep = |key: &str, value: &str| -> Option<String> {
        match key {
            "sslrootcert" => {
                params.sslrootcert = Some(if in_url {
                    percent_decode(value)
                } else {
                    value.to_string()
                });
                None
            }
            "sslmode" => {
                params.sslmode = Some(value.to_string());
                Some(if value.starts_with("verify-") {
                    "require".to_string()
                } else {
                    value.to_string()
                })
            }
            _ => Some(value.to_string()),
        }
    };
    if in_url {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), params);
        };
        let query: Vec<String> = query
            .split('&')
            .filter_map(|pair| match pair.split_once('=') {
                Some((key, value)) => keep(key, value).map(|value| format!("{key}={value}")),
                None => Some(pair.to_string()),
            })
            .collect();
        let url = if query.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", query.join("&"))
        };
        return (url, params);
    }
    let url = url
        .split_whitespace()
        .filter_map(|pair| match pair.split_once('=') {
            Some((key, value)) => keep(key, value).map(|value| format!("{key}={value}")),
            None => Some(pair.to_string()),
        })
        .collect::<Vec<_>>()
        .join(" ");
    (url, params)
}

/// `%XX` escapes decoded, as a URL's query may carry a path.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The roots `sslrootcert` names: a PEM file, `system`, or by default `~/.postgresql/root.crt`.
fn load_roots(sslrootcert: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if sslrootcert == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(
                "sslrootcert=system: no trusted root certificates found on this system".into(),
            );
        }
        return Ok(roots);
    }
    let path = match sslrootcert {
        Some(path) => PathBuf::from(path),
        None => default_root_file().ok_or(
            "sslmode=verify-ca/verify-full needs trusted roots: add sslrootcert=<CA file> or sslrootcert=system",
        )?,
    };
    let advice = "give the CA certificates in sslrootcert=<PEM file>, or use sslrootcert=system";
    let certificates = read_certificates(&path).map_err(|reason| {
        format!(
            "cannot read root certificates from {}: {reason}; {advice}",
            path.display()
        )
    })?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(format!("no certificate in {}; {advice}", path.display()));
    }
    Ok(roots)
}

/// libpq's default root file.
fn default_root_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql").join("root.crt"))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))
}

/// The modes that check less than `verify-full`, as libpq does them. The handshake's signatures are
/// always checked. `verify-ca` (`chain` given) verifies the certificate chain as `verify-full` does but
/// accepts any name; `prefer`/`require` (no `chain`) verify neither chain nor name.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The name is checked only after the chain: a name error means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_become_require_and_sslrootcert_is_taken_out() {
        let (url, params) =
            take_params("postgres://u@db/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&x=1");
        assert_eq!(url, "postgres://u@db/app?sslmode=require&x=1");
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ca.pem"));

        let (url, params) = take_params("host=db sslmode=verify-ca sslrootcert=/ca.pem user=u");
        assert_eq!(url, "host=db sslmode=require user=u");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));

        let (url, params) = take_params("postgres://u@db/app?sslrootcert=/ca.pem");
        assert_eq!(url, "postgres://u@db/app");
        assert_eq!(params.sslmode, None);

        let (url, _) = take_params("postgres://u@db/app?sslmode=require");
        assert_eq!(url, "postgres://u@db/app?sslmode=require");
    }

    #[test]
    fn a_missing_root_file_is_one_line_saying_what_to_do() {
        let error = PostgresTls::from_url(
            "postgres://u@db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .err()
        .unwrap();
        assert!(error.starts_with("cannot read root certificates from /nonexistent/ca.pem"));
        assert!(error.contains("sslrootcert=system"), "{error}");
        assert!(!error.contains('\n'));
    }
}
