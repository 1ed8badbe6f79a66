//! Tests of the signing authority: loading, plugging in, issuing, refusing.
use super::*;
use std::os::unix::fs::PermissionsExt;
use x509_parser::extensions::GeneralName;

fn csr(key: &KeyPair, sans: &[&str]) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    for san in sans {
        params
            .subject_alt_names
            .push(if san.starts_with("spiffe://") {
                SanType::URI((*san).try_into().unwrap())
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            });
    }
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[test]
fn creates_then_reloads_the_same_root_with_private_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let a =
        Authority::load_or_create(&ca_dir, "cluster.local", AuthorityOptions::default()).unwrap();
    let mode = |name| {
        std::fs::metadata(ca_dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(ROOT_KEY_FILE), 0o600);
    assert_eq!(
        std::fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let b =
        Authority::load_or_create(&ca_dir, "cluster.local", AuthorityOptions::default()).unwrap();
    assert_eq!(a.root_pem(), b.root_pem());
    assert_eq!(
        std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap(),
        a.root_pem()
    );

    let root_der = der_of(a.root_pem());
    let root = parse_cert(&root_der).unwrap();
    assert!(root.is_ca());
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
    assert!(
        (life - (10 * 365 * 24 * 3600 + 60)).abs() < 5,
        "root life {life}"
    );
    assert_eq!(
        root.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1"
    );
}

#[test]
fn recovers_a_key_without_cert_and_refuses_a_cert_without_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    std::fs::remove_file(dir.path().join(ROOT_CERT_FILE)).unwrap();
    let b = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    // Same key, new certificate.
    assert_ne!(a.root_pem(), b.root_pem());
    let (ra, rb) = (der_of(a.root_pem()), der_of(b.root_pem()));
    assert_eq!(
        parse_cert(&ra).unwrap().public_key().raw,
        parse_cert(&rb).unwrap().public_key().raw
    );
    std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let err = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap_err();
    assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
}

#[test]
fn leaf_names_only_the_given_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let request = csr(
        &key,
        &[
            "spiffe://cluster.local/ns/istio-system/sa/istiod",
            "evil.example",
        ],
    );
    let id = SpiffeId::new("cluster.local", "vm", "payment").unwrap();
    let chain = ca.sign_workload(&request, &id, None).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_pem());
    let leaf_der = der_of(&chain[0]);
    let leaf = parse_cert(&leaf_der).unwrap();
    let names = &leaf.subject_alternative_name().unwrap().unwrap();
    assert!(names.critical, "SAN must be critical with an empty subject");
    assert_eq!(
        names.value.general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/vm/sa/payment")]
    );
    assert_eq!(leaf.subject().iter().count(), 0);
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth && !eku.any);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let root_der = der_of(ca.root_pem());
    let root = parse_cert(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((life - (24 * 3600 + 60)).abs() < 5, "default life {life}");
}

#[test]
fn a_leaf_carries_its_lineage_and_reads_back_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let request = csr(&key, &[]);
    let id = SpiffeId::new("cluster.local", "vm", "payment").unwrap();
    let lineage = "0123abcd.5f6e7d";
    let chain = ca
        .sign_workload_in_lineage(&request, &id, None, Some(lineage))
        .unwrap();
    let peer = crate::PeerIdentity::from_certificate(&der_of(&chain[0]), "cluster.local").unwrap();
    assert_eq!(peer.id, id);
    assert_eq!(peer.lineage.as_deref(), Some(lineage));

    let plain = ca.sign_workload(&request, &id, None).unwrap();
    let peer = crate::PeerIdentity::from_certificate(&der_of(&plain[0]), "cluster.local").unwrap();
    assert_eq!(peer.lineage, None);
}

#[test]
fn ttl_defaults_and_clamps() {
    let dir = tempfile::tempdir().unwrap();
    let options = AuthorityOptions {
        max_workload_ttl: Duration::from_secs(3600),
        default_workload_ttl: Duration::from_secs(600),
        ..AuthorityOptions::default()
    };
    let ca = Authority::load_or_create(dir.path(), "cluster.local", options).unwrap();
    assert_eq!(ca.effective_ttl(None), Duration::from_secs(600));
    assert_eq!(
        ca.effective_ttl(Some(Duration::ZERO)),
        Duration::from_secs(600)
    );
    assert_eq!(
        ca.effective_ttl(Some(Duration::from_secs(60))),
        Duration::from_secs(60)
    );
    assert_eq!(
        ca.effective_ttl(Some(Duration::from_secs(86400))),
        Duration::from_secs(3600)
    );
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
    let chain = ca
        .sign_workload(&csr(&key, &[]), &id, Some(Duration::from_secs(86400 * 365)))
        .unwrap();
    let der = der_of(&chain[0]);
    let leaf = parse_cert(&der).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((life - 3660).abs() < 5, "clamped life {life}");
}

#[test]
fn refuses_bad_csrs_and_foreign_identities() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
    assert!(matches!(
        ca.sign_workload("garbage", &id, None),
        Err(CaError::InvalidCsr { .. })
    ));
    let key = KeyPair::generate().unwrap();
    let good = csr(&key, &[]);
    // Flip a bit inside the signature (the end of the DER).
    let mut der = csr_der(&good);
    let n = der.len();
    der[n - 5] ^= 0x01;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    assert!(matches!(
        ca.sign_workload(&tampered, &id, None),
        Err(CaError::CsrSignature)
    ));
    let other = SpiffeId::new("other.domain", "a", "b").unwrap();
    assert!(matches!(
        ca.sign_workload(&good, &other, None),
        Err(CaError::ForeignTrustDomain { .. })
    ));
    let bad_id = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "a/b".into(),
        service_account: "c".into(),
    };
    assert!(matches!(
        ca.sign_workload(&good, &bad_id, None),
        Err(CaError::Identity(_))
    ));
    // Other key types are accepted.
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let chain = ca.sign_workload(&csr(&key, &[]), &id, None).unwrap();
        let der = der_of(&chain[0]);
        assert_eq!(
            parse_cert(&der).unwrap().public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }
}

fn csr_der(pem: &str) -> Vec<u8> {
    rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// Made by `openssl req -new -newkey rsa:2048 -subj /CN=rsa-test` with
/// a SPIFFE SAN and CA:TRUE requested (both ignored).
const OPENSSL_RSA_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIICpzCCAY8CAQAwEzERMA8GA1UEAwwIcnNhLXRlc3QwggEiMA0GCSqGSIb3DQEB\nAQUAA4IBDwAwggEKAoIBAQDi5VEtq9Mq36sDzDJ8Lr68RzAeoC6D7PRbjsmHcNbT\naOJdBLqr68qZaiFZciz3yXlBhk/dwdFcrgbsvGi3xjRJRFor0kNaPCxaouHnKMIN\nrbomXBvBqMRfJ5a/come/IjTrHh+ftVORAOljvwtcjnW48aPVh4hcG3lFoIcauEZ\nrkCMNkei3wmHieF+Qd39HctO8jIff5d+XOBasx9/Ralw/8nOqk5Z7jii1du5zDe/\n5BE5rjVZJxQ5GQQinrxelac5eabNqxeMGU++n5nMncikba1MyJaEqoJQ54My92cE\n2NkrDRFTXqaPDmbazpgrMYl6v+BOj9Zk65noX86U/CjhAgMBAAGgTzBNBgkqhkiG\n9w0BCQ4xQDA+MCsGA1UdEQQkMCKGIHNwaWZmZTovL2NsdXN0ZXIubG9jYWwvbnMv\neC9zYS95MA8GA1UdEwEB/wQFMAMBAf8wDQYJKoZIhvcNAQELBQADggEBAIzGwDGP\nEHISKRgq3Eh2VjOH453UMx4dWBI+l9nFhzZnD2kM8TpwvnTz73qcUarJrmbuSAIG\npH1UPyjagxaL7LPkp5Wav6u+uqpgJw1XiVKpHHo8AeW6EDKItftvkPjs8ew+u48+\nTa6L8LBsandeq+D4uP0WUEjKoPxgN5mmFswAkl5x52PgRVQAXfX+SKV1Da+PhFh1\ncrxSLL48ffw0tWVVyIt8BbQNijwnaMgYdzvvwahAAVe9ZPSO1a/wK8Mi2DjAiw2P\nMeE88T315A5bGxqFZVNvVzxIjL278pvGJ1HWQqGMUUZbibE2Zfz/5wqeEvxqCGdK\nb1csXzXpSbekoQ8=\n-----END CERTIFICATE REQUEST-----\n";

#[test]
fn accepts_an_openssl_rsa_csr_and_keeps_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
    let chain = ca.sign_workload(OPENSSL_RSA_CSR, &id, None).unwrap();
    let leaf_der = der_of(&chain[0]);
    let leaf = parse_cert(&leaf_der).unwrap();
    let csr = csr_der(OPENSSL_RSA_CSR);
    let (_, csr) = X509CertificationRequest::from_der(&csr).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        csr.certification_request_info.subject_pki.raw
    );
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/a/sa/b")]
    );
}

#[test]
fn pem_encoding_matches_rcgen() {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["a.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert_eq!(
        pem_encode("CERTIFICATE", cert.der()),
        cert.pem().replace("\r\n", "\n")
    );
}

fn make_ca(
    name: &str,
    signer: Option<(&CertificateParams, &KeyPair)>,
) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    let cert = match signer {
        None => params.self_signed(&key).unwrap(),
        Some((sp, sk)) => params
            .signed_by(&key, &Issuer::from_params(sp, sk))
            .unwrap(),
    };
    (params, key, cert.pem())
}

#[test]
fn plug_in_intermediate_chains_to_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let (root_p, root_k, root_pem) = make_ca("root", None);
    let (_int_p, int_k, int_pem) = make_ca("intermediate", Some((&root_p, &root_k)));
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("ca-cert.pem"), &int_pem).unwrap();
    std::fs::write(p("ca-key.pem"), int_k.serialize_pem()).unwrap();
    // Istio's cert-chain.pem style: the CA itself first, then the root.
    std::fs::write(p("cert-chain.pem"), format!("{int_pem}{root_pem}")).unwrap();
    let ca = Authority::from_files(
        &p("ca-cert.pem"),
        &p("ca-key.pem"),
        Some(&p("cert-chain.pem")),
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap();
    assert_eq!(
        ca.root_pem().replace("\r\n", "\n"),
        root_pem.replace("\r\n", "\n")
    );
    let key = KeyPair::generate().unwrap();
    let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
    let chain = ca.sign_workload(&csr(&key, &[]), &id, None).unwrap();
    assert_eq!(chain.len(), 3);
    let ders: Vec<_> = chain.iter().map(|c| der_of(c)).collect();
    let certs: Vec<_> = ders.iter().map(|d| parse_cert(d).unwrap()).collect();
    certs[0]
        .verify_signature(Some(certs[1].public_key()))
        .unwrap();
    certs[1]
        .verify_signature(Some(certs[2].public_key()))
        .unwrap();
    certs[2].verify_signature(None).unwrap();
    assert_eq!(ders[1].as_ref(), der_of(&int_pem).as_ref());
    assert_eq!(ders[2].as_ref(), der_of(&root_pem).as_ref());

    // Without the chain an intermediate is refused; so is a wrong key or chain.
    let err = Authority::from_files(
        &p("ca-cert.pem"),
        &p("ca-key.pem"),
        None,
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("self-signed"), "{err}");
    std::fs::write(
        p("other-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let err = Authority::from_files(
        &p("ca-cert.pem"),
        &p("other-key.pem"),
        Some(&p("cert-chain.pem")),
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("does not match its private key"),
        "{err}"
    );
    let (_, _, stranger) = make_ca("stranger", None);
    std::fs::write(p("bad-chain.pem"), &stranger).unwrap();
    let err = Authority::from_files(
        &p("ca-cert.pem"),
        &p("ca-key.pem"),
        Some(&p("bad-chain.pem")),
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not signed by"), "{err}");

    // A plugged-in root alone is its own trust anchor.
    std::fs::write(p("root.pem"), &root_pem).unwrap();
    std::fs::write(p("root-key.pem"), root_k.serialize_pem()).unwrap();
    let ca = Authority::from_files(
        &p("root.pem"),
        &p("root-key.pem"),
        None,
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap();
    let chain = ca.sign_workload(&csr(&key, &[]), &id, None).unwrap();
    assert_eq!(chain.len(), 2);
}

#[test]
fn serving_certificate_names_istiod_and_the_extras() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
        .unwrap();
    let (chain, key) = ca
        .serving_certificate(&[
            "vmesh.example".into(),
            "10.1.2.3".into(),
            ISTIOD_SERVICE_NAME.into(),
        ])
        .unwrap();
    assert_eq!(chain.last().unwrap(), ca.root_pem());
    let der = der_of(&chain[0]);
    let leaf = parse_cert(&der).unwrap();
    let names = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(
        names,
        vec![
            GeneralName::DNSName(ISTIOD_SERVICE_NAME),
            GeneralName::DNSName("vmesh.example"),
            GeneralName::IPAddress(&[10, 1, 2, 3]),
        ]
    );
    let key = KeyPair::from_pem(&key).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert!(ca.serving_certificate(&["bad name".into()]).is_err());
}
