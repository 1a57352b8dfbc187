//! Making certificates, without I/O: a cell's CA (self-signed, `CA_DAYS`) and a process's
//! certificate signed by it (`LEAF_DAYS`), ECDSA P-256, for server and client authentication.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Result, TlsError};

/// A CA lives ten years: replacing it means re-issuing every certificate of the cell.
pub const CA_DAYS: i64 = 3_650;
/// A process certificate lives about a year (the most public CAs issue today); `keel cert
/// renew` replaces it, and the log warns `EXPIRY_WARNING_DAYS` before.
pub const LEAF_DAYS: i64 = 397;
/// A certificate is back-dated this much, so a peer whose clock is a little behind accepts it.
const BACKDATE_S: i64 = 3_600;

/// Who a process certificate is for: `<node>/<process>` (the process is `nodeagent` or a
/// server's name), and the host names and addresses it answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node: String,
    pub process: String,
    pub hosts: Vec<String>,
}

impl Identity {
    /// `node01.server1`: the file stem and the name `keel cert` shows.
    pub fn name(&self) -> String {
        format!("{}.{}", self.node, self.process)
    }
}

/// A certificate and its private key, PEM.
pub(crate) struct Made {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(params: &mut CertificateParams, now_s: i64, days: i64) -> Result<()> {
    let at = |s: i64| {
        time::OffsetDateTime::from_unix_timestamp(s).map_err(|e| TlsError::Generate {
            who: "the certificate's validity".into(),
            problem: e.to_string(),
        })
    };
    params.not_before = at(now_s - BACKDATE_S)?;
    params.not_after = at(now_s + days * 86_400)?;
    Ok(())
}

fn serial(params: &mut CertificateParams) -> Result<()> {
    // Random, positive, 16 bytes: a renewed certificate never shares its serial.
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| TlsError::Generate {
        who: "a certificate serial number".into(),
        problem: format!("the system's random source failed ({e})"),
    })?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    params.serial_number = Some(b.to_vec().into());
    Ok(())
}

fn gen_err(who: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Generate {
        who: who.to_string(),
        problem: e.to_string(),
    }
}

/// A new CA for cell `cell`.
pub(crate) fn make_ca(cell: &str, now_s: i64) -> Result<Made> {
    let who = format!("the certificate authority of cell {cell}");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keel");
    dn.push(DnType::CommonName, format!("Keel cell {cell} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, now_s, CA_DAYS)?;
    serial(&mut params)?;
    let key = KeyPair::generate().map_err(gen_err(&who))?;
    let cert = params.self_signed(&key).map_err(gen_err(&who))?;
    Ok(Made {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for `id`, signed by the CA whose certificate and key are given (PEM).
pub(crate) fn make_leaf(
    id: &Identity,
    ca_cert_pem: &str,
    ca_key_pem: &str,
    now_s: i64,
) -> Result<Made> {
    let who = format!("process {}", id.name());
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(gen_err(&who))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(gen_err(&who))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keel");
    dn.push(DnType::CommonName, format!("{}/{}", id.node, id.process));
    params.distinguished_name = dn;
    params.subject_alt_names = id
        .hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(
                h.clone().try_into().map_err(gen_err(&who))?,
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now_s, LEAF_DAYS)?;
    serial(&mut params)?;
    let key = KeyPair::generate().map_err(gen_err(&who))?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err(&who))?;
    Ok(Made {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
