//! A sigstore of the tests' own: a Fulcio-like CA, a CT log and a Rekor-like
//! transparency log, each with a P-256 key made here, their
//! `trusted_root.json`, and keyless bundles signed under them (a
//! certificate with an embedded SCT, a hashedrekord entry with its signed
//! entry timestamp). Every field can be bent to make a bad bundle.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::EncodePublicKey as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use x509_cert::der::asn1::{BitString, ObjectIdentifier, OctetString};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate};

const ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const FULCIO_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
const CT_PRECERT_SCTS: &str = "1.3.6.1.4.1.11129.2.4.2";

fn key() -> SigningKey {
    SigningKey::random(&mut rand_core::OsRng)
}

fn spki_der(k: &SigningKey) -> Vec<u8> {
    k.verifying_key()
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn sign(k: &SigningKey, msg: &[u8]) -> Vec<u8> {
    let sig: DerSignature = k.sign(msg);
    sig.as_bytes().to_vec()
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend([0x81, n as u8]);
    } else {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(body);
    out
}

fn ext(oid: &str, critical: bool, value: Vec<u8>) -> Extension {
    Extension {
        extn_id: ObjectIdentifier::new_unwrap(oid),
        critical,
        extn_value: OctetString::new(value).unwrap(),
    }
}

fn time(t: SystemTime) -> Time {
    Time::try_from(t).unwrap()
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn tbs(
    serial: u8,
    issuer: &Name,
    subject: &Name,
    validity: (SystemTime, SystemTime),
    key: &SigningKey,
    extensions: Vec<Extension>,
) -> TbsCertificate {
    TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: SerialNumber::new(&[serial]).unwrap(),
        signature: alg(),
        issuer: issuer.clone(),
        validity: Validity {
            not_before: time(validity.0),
            not_after: time(validity.1),
        },
        subject: subject.clone(),
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(&spki_der(key)).unwrap(),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    }
}

fn alg() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: ObjectIdentifier::new_unwrap(ECDSA_SHA256),
        parameters: None,
    }
}

fn certify(tbs: TbsCertificate, by: &SigningKey) -> Vec<u8> {
    let sig = sign(by, &tbs.to_der().unwrap());
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg(),
        signature: BitString::from_bytes(&sig).unwrap(),
    }
    .to_der()
    .unwrap()
}

/// The CA, the CT log and the transparency log, with their validity.
pub struct Sigstore {
    pub ca_key: SigningKey,
    pub ca_name: Name,
    pub ca_der: Vec<u8>,
    pub ct_key: SigningKey,
    pub tlog_key: SigningKey,
    pub since: SystemTime,
}

/// What a keyless signature is made of; change a field to break it.
pub struct Signing {
    /// The SAN (an email address here).
    pub identity: String,
    /// The OIDC issuer written into the certificate.
    pub issuer: String,
    /// The certificate's validity.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The transparency log's time for the entry.
    pub integrated_time: SystemTime,
    /// Sign the SCT with this key instead of the CT log's.
    pub sct_key: Option<SigningKey>,
    /// Sign the certificate with this CA instead of the trusted one.
    pub other_ca: Option<(SigningKey, Name)>,
    /// Flip a byte of the signed entry timestamp.
    pub forge_set: bool,
    /// Leave the signed entry timestamp out.
    pub no_set: bool,
    /// Write a v0.3 bundle: one certificate, and an inclusion proof with a
    /// checkpoint signed by the log, besides the signed entry timestamp.
    pub v03: bool,
    /// Sign the checkpoint with this key instead of the log's.
    pub checkpoint_key: Option<SigningKey>,
    /// Flip a bit of the root hash the checkpoint and the proof give.
    pub corrupt_root: bool,
    /// Leave the inclusion proof out (of a v0.3 bundle).
    pub no_proof: bool,
}

impl Sigstore {
    pub fn new() -> Sigstore {
        let since = SystemTime::now() - Duration::from_secs(86_400);
        let ca_key = key();
        let ca_name: Name = "CN=pullgate test fulcio,O=pullgate tests".parse().unwrap();
        let ca_der = ca_cert(&ca_key, &ca_name, since);
        Sigstore {
            ca_key,
            ca_name,
            ca_der,
            ct_key: key(),
            tlog_key: key(),
            since,
        }
    }

    /// `trusted_root.json` naming this CA and these logs.
    pub fn trusted_root(&self) -> String {
        let log = |k: &SigningKey, url: &str| {
            let der = spki_der(k);
            json!({
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": B64.encode(&der),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": { "start": rfc3339(self.since) }
                },
                "logId": { "keyId": B64.encode(sha256(&der)) }
            })
        };
        json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(&self.tlog_key, "https://rekor.test.invalid")],
            "certificateAuthorities": [{
                "subject": { "organization": "pullgate tests", "commonName": "pullgate test fulcio" },
                "uri": "https://fulcio.test.invalid",
                "certChain": { "certificates": [{ "rawBytes": B64.encode(&self.ca_der) }] },
                "validFor": { "start": rfc3339(self.since) }
            }],
            "ctlogs": [log(&self.ct_key, "https://ctfe.test.invalid")],
            "timestampAuthorities": []
        })
        .to_string()
    }

    /// A good signing: valid now, logged a minute ago.
    pub fn signing(&self, identity: &str, issuer: &str) -> Signing {
        let now = SystemTime::now();
        Signing {
            identity: identity.into(),
            issuer: issuer.into(),
            not_before: now - Duration::from_secs(300),
            not_after: now + Duration::from_secs(300),
            integrated_time: now - Duration::from_secs(60),
            sct_key: None,
            other_ca: None,
            forge_set: false,
            no_set: false,
            v03: false,
            checkpoint_key: None,
            corrupt_root: false,
            no_proof: false,
        }
    }

    /// A v0.1 sigstore bundle of `artifact` signed under `s`.
    pub fn bundle(&self, artifact: &[u8], s: &Signing) -> String {
        let signer = key();
        let (ca_key, ca_name) = match &s.other_ca {
            Some((k, n)) => (k, n),
            None => (&self.ca_key, &self.ca_name),
        };
        let ca_spki = spki_der(ca_key);
        let san = tlv(0x30, &tlv(0x81, s.identity.as_bytes()));
        let mut exts = vec![
            ext("2.5.29.15", true, vec![0x03, 0x02, 0x07, 0x80]), // digitalSignature
            ext(
                "2.5.29.37",
                false,
                tlv(
                    0x30,
                    &tlv(0x06, &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03]),
                ),
            ), // codeSigning
            ext("2.5.29.17", true, san),
            ext(FULCIO_ISSUER_V2, false, tlv(0x0c, s.issuer.as_bytes())),
        ];
        let empty: Name = Name::default();
        let pre = tbs(
            7,
            ca_name,
            &empty,
            (s.not_before, s.not_after),
            &signer,
            exts.clone(),
        );
        // The SCT signs the certificate as it is without the SCT list.
        let ct_key = s.sct_key.as_ref().unwrap_or(&self.ct_key);
        let ts = s
            .integrated_time
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let pre_der = pre.to_der().unwrap();
        let mut signed = vec![0u8, 0u8]; // v1, certificate_timestamp
        signed.extend(ts.to_be_bytes());
        signed.extend([0, 1]); // precert_entry
        signed.extend(sha256(&ca_spki));
        let n = pre_der.len();
        signed.extend([(n >> 16) as u8, (n >> 8) as u8, n as u8]);
        signed.extend(&pre_der);
        signed.extend([0, 0]); // no extensions
        let sct_sig = sign(ct_key, &signed);
        let mut sct = vec![0u8]; // v1
        sct.extend(sha256(&spki_der(&self.ct_key)));
        sct.extend(ts.to_be_bytes());
        sct.extend([0, 0]);
        sct.extend([4, 3]); // sha256, ecdsa
        sct.extend((sct_sig.len() as u16).to_be_bytes());
        sct.extend(&sct_sig);
        let mut list = ((sct.len() + 2) as u16).to_be_bytes().to_vec();
        list.extend((sct.len() as u16).to_be_bytes());
        list.extend(&sct);
        exts.push(ext(CT_PRECERT_SCTS, false, tlv(0x04, &list)));
        let leaf = certify(
            tbs(
                7,
                ca_name,
                &empty,
                (s.not_before, s.not_after),
                &signer,
                exts,
            ),
            ca_key,
        );

        // The signature, and its hashedrekord entry with a signed entry
        // timestamp from the transparency log.
        let signature = sign(&signer, artifact);
        let leaf_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            B64.encode(&leaf)
        );
        let body = json!({
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": { "hash": { "algorithm": "sha256", "value": hex::encode(sha256(artifact)) } },
                "signature": {
                    "content": B64.encode(&signature),
                    "publicKey": { "content": B64.encode(leaf_pem.as_bytes()) }
                }
            }
        })
        .to_string();
        let body_b64 = B64.encode(body.as_bytes());
        let integrated = s
            .integrated_time
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let log_id = sha256(&spki_der(&self.tlog_key));
        // The canonical JSON of the entry: keys sorted, no spaces.
        let entry = json!({
            "body": body_b64,
            "integratedTime": integrated,
            "logID": hex::encode(log_id),
            "logIndex": 42
        })
        .to_string();
        let mut set = sign(&self.tlog_key, entry.as_bytes());
        if s.forge_set {
            let last = set.len() - 1;
            set[last] ^= 1;
        }
        let mut tlog = json!({
            "logIndex": "42",
            "logId": { "keyId": B64.encode(log_id) },
            "kindVersion": { "kind": "hashedrekord", "version": "0.0.1" },
            "integratedTime": integrated.to_string(),
            "inclusionPromise": { "signedEntryTimestamp": B64.encode(&set) },
            "canonicalizedBody": body_b64
        });
        if s.no_set {
            tlog.as_object_mut().unwrap().remove("inclusionPromise");
        }
        if s.v03 {
            if !s.no_proof {
                // A tree of one entry: the root is the leaf's hash
                // (RFC 6962: SHA-256 of 0x00 and the entry), no path.
                let mut leaf = vec![0u8];
                leaf.extend(body.as_bytes());
                let mut root = sha256(&leaf);
                if s.corrupt_root {
                    root[0] ^= 1;
                }
                let origin = "rekor.test.invalid - 1";
                let note = format!("{origin}\n1\n{}\n", B64.encode(root));
                let ck = s.checkpoint_key.as_ref().unwrap_or(&self.tlog_key);
                let mut hint_sig = log_id[..4].to_vec();
                hint_sig.extend(sign(ck, note.as_bytes()));
                let envelope = format!(
                    "{note}\n\u{2014} rekor.test.invalid {}\n",
                    B64.encode(hint_sig)
                );
                tlog["inclusionProof"] = json!({
                    "logIndex": "0",
                    "rootHash": B64.encode(root),
                    "treeSize": "1",
                    "hashes": [],
                    "checkpoint": { "envelope": envelope }
                });
            }
            return json!({
                "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                "verificationMaterial": {
                    "certificate": { "rawBytes": B64.encode(&leaf) },
                    "tlogEntries": [tlog]
                },
                "messageSignature": {
                    "messageDigest": { "algorithm": "SHA2_256", "digest": B64.encode(sha256(artifact)) },
                    "signature": B64.encode(&signature)
                }
            })
            .to_string();
        }
        json!({
            "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1",
            "verificationMaterial": {
                "x509CertificateChain": { "certificates": [{ "rawBytes": B64.encode(&leaf) }] },
                "tlogEntries": [tlog]
            },
            "messageSignature": {
                "messageDigest": { "algorithm": "SHA2_256", "digest": B64.encode(sha256(artifact)) },
                "signature": B64.encode(&signature)
            }
        })
        .to_string()
    }
}

/// The annotations cosign writes on a legacy `.sig` layer for a keyless
/// signing, read off a (v0.1) bundle of this sigstore: the signature, the
/// leaf certificate (PEM) and `dev.sigstore.cosign/bundle` (JSON).
pub fn legacy_annotations(bundle: &str) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_str(bundle).unwrap();
    let vm = &v["verificationMaterial"];
    let leaf = vm["x509CertificateChain"]["certificates"][0]["rawBytes"]
        .as_str()
        .unwrap();
    let cert = format!("-----BEGIN CERTIFICATE-----\n{leaf}\n-----END CERTIFICATE-----\n");
    let t = &vm["tlogEntries"][0];
    let log_id = hex::encode(B64.decode(t["logId"]["keyId"].as_str().unwrap()).unwrap());
    let rekor = json!({
        "SignedEntryTimestamp": t["inclusionPromise"]["signedEntryTimestamp"],
        "Payload": {
            "body": t["canonicalizedBody"],
            "integratedTime": t["integratedTime"].as_str().unwrap().parse::<i64>().unwrap(),
            "logIndex": t["logIndex"].as_str().unwrap().parse::<i64>().unwrap(),
            "logID": log_id,
        }
    })
    .to_string();
    let sig = v["messageSignature"]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    (sig, cert, rekor)
}

impl Sigstore {
    /// A legacy cosign `.sig` manifest signing `image` (a digest) keyless as
    /// `identity`: (manifest, payload blob, config blob).
    pub fn legacy_signature(
        &self,
        docker_reference: &str,
        image: &str,
        identity: &str,
        issuer: &str,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        self.legacy_signature_with(docker_reference, image, &self.signing(identity, issuer))
    }

    /// The same under a signing bent by the caller. `image` is the digest
    /// the payload names.
    pub fn legacy_signature_with(
        &self,
        docker_reference: &str,
        image: &str,
        signing: &Signing,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let d: pullgate::names::Digest = image.parse().unwrap();
        let payload = pullgate::cosign::payload(docker_reference, &d);
        let (sig, cert, rekor) = legacy_annotations(&self.bundle(&payload, signing));
        let config = b"{}".to_vec();
        let digest = |b: &[u8]| format!("sha256:{}", hex::encode(sha256(b)));
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": digest(&config)},
            "layers": [{
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "size": payload.len(),
                "digest": digest(&payload),
                "annotations": {
                    "dev.cosignproject.cosign/signature": sig,
                    "dev.sigstore.cosign/certificate": cert,
                    "dev.sigstore.cosign/bundle": rekor,
                }
            }]
        }))
        .unwrap();
        (manifest, payload, config)
    }
}

/// Another CA, for certificates the trusted root does not know.
pub fn other_ca() -> (SigningKey, Name) {
    (key(), "CN=someone else,O=elsewhere".parse().unwrap())
}

pub fn other_key() -> SigningKey {
    key()
}

fn ca_cert(k: &SigningKey, name: &Name, since: SystemTime) -> Vec<u8> {
    let exts = vec![
        ext("2.5.29.19", true, tlv(0x30, &[0x01, 0x01, 0xff])), // CA
        ext("2.5.29.15", true, vec![0x03, 0x02, 0x01, 0x06]),   // keyCertSign, cRLSign
    ];
    certify(
        tbs(
            1,
            name,
            name,
            (since, since + Duration::from_secs(10 * 365 * 86_400)),
            k,
            exts,
        ),
        k,
    )
}
