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
//! given, or the system's roots with `sslrootcert=system`. As in libpq, `require` with root
//! certificates at hand (`sslrootcert` given, or `~/.postgresql/root.crt` present) verifies the chain
//! as `verify-ca` does. tokio-postgres itself knows neither `verify-*` nor `sslrootcert`: the settings
//! are read from the parsed connection string (`conninfo`) and tokio-postgres is asked for
//! `require`. A mode pgfresh cannot honour (`allow`, which prefers plain text) is an error, never a
//! quiet downgrade.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Socket;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The stream type of a connection made with [`PostgresTls::connector`].
pub(crate) type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// How much of the server's certificate is checked.
#[derive(Clone, Debug)]
pub(crate) enum Verify {
    /// Nothing (`prefer`, `require`, or no TLS at all).
    Nothing,
    /// The chain leads to one of these trusted roots (`verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The chain leads to one of these trusted roots and the certificate names the host
    /// (`verify-full`).
    ChainAndName(Arc<RootCertStore>),
}

/// A PostgreSQL connection's TLS settings.
pub(crate) struct PostgresTls {
    /// What tokio-postgres is asked for: no TLS, TLS if offered, or TLS or fail.
    pub(crate) mode: SslMode,
    /// What is checked of the server's certificate.
    pub(crate) verify: Verify,
}

impl PostgresTls {
    /// Reads `sslmode` and `sslrootcert` as libpq does; loads the trusted roots when the mode needs
    /// them. `home` is where `~/.postgresql/root.crt` is looked for. The error is one line saying what
    /// to fix.
    pub(crate) fn from_settings(
        sslmode: Option<&str>,
        sslrootcert: Option<&str>,
        home: Option<&Path>,
    ) -> Result<Self, String> {
        let default_roots = home.map(|home| home.join(".postgresql").join("root.crt"));
        let roots = || load_roots(sslrootcert, default_roots.as_deref()).map(Arc::new);
        let roots_at_hand =
            sslrootcert.is_some() || default_roots.as_deref().is_some_and(Path::exists);
        // As in libpq 16: the system's roots trust any public certificate authority, so they only
        // make sense checking the host name too; that is the default, and anything less an error.
        let sslmode = match (sslrootcert, sslmode) {
            (Some("system"), None) => Some("verify-full"),
            (Some("system"), Some(mode)) if mode != "verify-full" => {
                return Err(format!(
                    "sslrootcert=system needs sslmode=verify-full (the system's roots would trust any public certificate for any name), not sslmode={mode}"
                ));
            }
            (_, mode) => mode,
        };
        let (mode, verify) = match sslmode {
            None | Some("disable") => (SslMode::Disable, Verify::Nothing),
            Some("prefer") => (SslMode::Prefer, Verify::Nothing),
            Some("require") if roots_at_hand => (SslMode::Require, Verify::Chain(roots()?)),
            Some("require") => (SslMode::Require, Verify::Nothing),
            Some("verify-ca") => (SslMode::Require, Verify::Chain(roots()?)),
            Some("verify-full") => (SslMode::Require, Verify::ChainAndName(roots()?)),
            Some("allow") => {
                return Err(
                    "sslmode=allow (plain text first, TLS only if refused) is not supported: use prefer, require or disable"
                        .into(),
                );
            }
            Some(other) => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        };
        Ok(Self { mode, verify })
    }

    /// The TLS connector for these settings; it is only engaged when `sslmode` asks for TLS.
    pub(crate) fn connector(&self) -> MakeRustlsConnect {
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

/// The roots `sslrootcert` names: a PEM file, `system`, or by default `~/.postgresql/root.crt`.
fn load_roots(sslrootcert: Option<&str>, default: Option<&Path>) -> Result<RootCertStore, String> {
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
        None => default.map(Path::to_path_buf).ok_or(
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
    fn modes_are_honoured_or_refused_never_downgraded() {
        let mode = |sslmode| PostgresTls::from_settings(sslmode, None, None).map(|tls| tls.mode);
        assert!(matches!(mode(None), Ok(SslMode::Disable)));
        assert!(matches!(mode(Some("prefer")), Ok(SslMode::Prefer)));
        assert!(matches!(mode(Some("require")), Ok(SslMode::Require)));
        let allow = mode(Some("allow")).err().unwrap();
        assert!(allow.contains("not supported"), "{allow}");
        assert!(mode(Some("requir")).is_err());
    }

    #[test]
    fn the_systems_roots_check_the_host_name_too_or_are_refused() {
        let tls = PostgresTls::from_settings(None, Some("system"), None).unwrap();
        assert!(matches!(tls.mode, SslMode::Require));
        assert!(matches!(tls.verify, Verify::ChainAndName(_)));
        for weaker in ["require", "verify-ca", "prefer"] {
            let error = PostgresTls::from_settings(Some(weaker), Some("system"), None)
                .err()
                .unwrap();
            assert!(error.contains("needs sslmode=verify-full"), "{error}");
        }
    }

    #[test]
    fn a_missing_root_file_is_one_line_saying_what_to_do() {
        let error =
            PostgresTls::from_settings(Some("verify-full"), Some("/nonexistent/ca.pem"), None)
                .err()
                .unwrap();
        assert!(error.starts_with("cannot read root certificates from /nonexistent/ca.pem"));
        assert!(error.contains("sslrootcert=system"), "{error}");
        assert!(!error.contains('\n'));
    }
}
