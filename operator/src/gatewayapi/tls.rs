//! Certificates for HTTPS listeners, from Secrets of type
//! `kubernetes.io/tls` (`tls.crt`: a PEM chain, leaf first; `tls.key`: a
//! PEM private key).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificate and key of `secret`, checked to belong together.
pub fn load(secret: &Secret) -> Result<Arc<CertifiedKey>, String> {
    let data = secret.data.as_ref().ok_or("the Secret has no data")?;
    let crt = data.get("tls.crt").ok_or("the Secret has no tls.crt")?;
    let key = data.get("tls.key").ok_or("the Secret has no tls.key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt.0)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key.0).map_err(|e| format!("tls.key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(certified))
}

/// Whether `secret` holds a usable certificate and key.
pub fn usable(secret: &Secret) -> bool {
    load(secret).is_ok()
}
