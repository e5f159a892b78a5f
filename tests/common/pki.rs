//! A test PKI made here: a CA, a server certificate for localhost and
//! 127.0.0.1, a client certificate, and one from another CA.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// Certificates and keys, PEM.
pub struct Pki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
    pub stranger: (String, String),
}

pub fn pki() -> Pki {
    let authority = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("ca");
        (cert.pem(), Issuer::new(params, key))
    };
    let leaf = |names: Vec<String>, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, issuer)
            .expect("leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (ca, issuer) = authority("keyward test CA");
    let (_, other) = authority("someone else");
    Pki {
        ca,
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()], &issuer),
        client: leaf(vec!["client.local".into()], &issuer),
        stranger: leaf(vec!["stranger.local".into()], &other),
    }
}
