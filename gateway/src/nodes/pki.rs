//! moat's private PKI for gateway ↔ node mTLS, kept in `<state-dir>/pki`.
//!
//! Two CAs, so a certificate can only ever play one role: the *node CA*
//! signs node server certificates (CN and DNS name = the node's registered
//! name, which the gateway checks on every connection), and the *client CA*
//! signs only the gateway's client certificate, which is all a node accepts.
//! A node's certificate therefore cannot be used to call another node.
//!
//! Files (keys 0600): `node-ca.{pem,key}`, `client-ca.{pem,key}`,
//! `gateway.{pem,key}`. A node's bundle (from `moat node enroll`) is
//! `node.pem`, `node.key` and `client-ca.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

const NODE_CA_CN: &str = "moat node CA";
const CLIENT_CA_CN: &str = "moat gateway client CA";
/// The gateway's client certificate names it this.
pub const GATEWAY_CN: &str = "moat-gateway";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("no PKI in {0}: run `moat pki init` first")]
    Missing(PathBuf),
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("`{0}` cannot be a certificate name: use a DNS label like n1")]
    BadName(String),
    #[error("the PKI files in {dir} are unusable: {detail}")]
    Unusable { dir: PathBuf, detail: String },
}

/// A node's certificate bundle, as written by `moat node enroll`.
#[derive(Debug)]
pub struct NodeBundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

impl NodeBundle {
    /// Writes `node.pem`, `node.key` (0600) and `client-ca.pem` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.into(), source })?;
        write_file(&dir.join("client-ca.pem"), &self.client_ca_pem, 0o644)?;
        write_file(&dir.join("node.key"), &self.key_pem, 0o600)?;
        write_file(&dir.join("node.pem"), &self.cert_pem, 0o644)
    }
}

#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn at(state_dir: &Path) -> Pki {
        Pki { dir: state_dir.join("pki") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        ["node-ca.pem", "node-ca.key", "client-ca.pem", "client-ca.key", "gateway.pem", "gateway.key"]
            .iter()
            .all(|f| self.dir.join(f).is_file())
    }

    /// Creates both CAs and the gateway's certificate. Returns false (and changes nothing)
    /// when the PKI already exists.
    pub fn init(&self) -> Result<bool, PkiError> {
        if self.exists() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io { path: self.dir.clone(), source })?;
        for (cn, name) in [(NODE_CA_CN, "node-ca"), (CLIENT_CA_CN, "client-ca")] {
            let key = KeyPair::generate()?;
            let cert = ca_params(cn).self_signed(&key)?;
            write_file(&self.dir.join(format!("{name}.key")), &key.serialize_pem(), 0o600)?;
            write_file(&self.dir.join(format!("{name}.pem")), &cert.pem(), 0o644)?;
        }
        self.rotate_gateway()?;
        Ok(true)
    }

    /// Issues the gateway a new client certificate and key. Nodes trust the client CA, not the
    /// certificate, so they accept the new one at once; a running gateway switches on SIGHUP.
    pub fn rotate_gateway(&self) -> Result<(), PkiError> {
        let issuer = self.issuer("client-ca", CLIENT_CA_CN)?;
        let key = KeyPair::generate()?;
        let cert = leaf_params(GATEWAY_CN, ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(&key, &issuer)?;
        write_file(&self.dir.join("gateway.key"), &key.serialize_pem(), 0o600)?;
        write_file(&self.dir.join("gateway.pem"), &cert.pem(), 0o644)
    }

    /// Issues node `name` a server certificate (CN and DNS name = `name`) with a new key.
    pub fn issue_node(&self, name: &str) -> Result<NodeBundle, PkiError> {
        if !self.exists() {
            return Err(PkiError::Missing(self.dir.clone()));
        }
        let issuer = self.issuer("node-ca", NODE_CA_CN)?;
        let key = KeyPair::generate()?;
        let cert = leaf_params(name, ExtendedKeyUsagePurpose::ServerAuth)?.signed_by(&key, &issuer)?;
        Ok(NodeBundle {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            client_ca_pem: self.read("client-ca.pem")?,
        })
    }

    /// The gateway's TLS client side: presents `gateway.pem`, trusts only the node CA.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        if !self.exists() {
            return Err(PkiError::Missing(self.dir.clone()));
        }
        let unusable = |detail: String| PkiError::Unusable { dir: self.dir.clone(), detail };
        let provider = moat_node::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in moat_node::tls::read_certs(&self.dir.join("node-ca.pem")).map_err(|e| unusable(e.to_string()))? {
            roots.add(cert).map_err(|e| unusable(e.to_string()))?;
        }
        let certs = moat_node::tls::read_certs(&self.dir.join("gateway.pem")).map_err(|e| unusable(e.to_string()))?;
        let key = moat_node::tls::read_key(&self.dir.join("gateway.key")).map_err(|e| unusable(e.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| unusable(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| unusable(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn read(&self, file: &str) -> Result<String, PkiError> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
    }

    /// A CA as a signer. Its parameters are rebuilt exactly as at `init`, so the issuer name
    /// and key identifier in new certificates match the CA certificate.
    fn issuer(&self, name: &str, cn: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.read(&format!("{name}.key"))?)?;
        Ok(Issuer::new(ca_params(cn), key))
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, "moat");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn leaf_params(name: &str, usage: ExtendedKeyUsagePurpose) -> Result<CertificateParams, PkiError> {
    if !crate::names::is_dns_label(name) {
        return Err(PkiError::BadName(name.into()));
    }
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "moat");
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io { path: path.into(), source };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_issues_node_bundles() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::at(tmp.path());
        assert!(matches!(pki.issue_node("n1"), Err(PkiError::Missing(_))));
        assert!(pki.init().unwrap());
        let before = std::fs::read(pki.dir().join("node-ca.pem")).unwrap();
        assert!(!pki.init().unwrap(), "a second init changes nothing");
        assert_eq!(std::fs::read(pki.dir().join("node-ca.pem")).unwrap(), before);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.dir().join("node-ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let bundle = pki.issue_node("n1").unwrap();
        assert!(bundle.cert_pem.contains("BEGIN CERTIFICATE") && bundle.key_pem.contains("PRIVATE KEY"));
        assert!(matches!(pki.issue_node("../x"), Err(PkiError::BadName(_))));
        pki.client_config().unwrap();
        let old = std::fs::read(pki.dir().join("gateway.pem")).unwrap();
        pki.rotate_gateway().unwrap();
        assert_ne!(std::fs::read(pki.dir().join("gateway.pem")).unwrap(), old);
    }
}
