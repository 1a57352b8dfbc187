//! What a certificate says, read from its PEM (Keel's own or an operator's): subject, issuer,
//! names, validity and SHA-256 fingerprint. Reading checks the PEM holds exactly one
//! certificate that parses whole.

use serde::Serialize;
use sha2::Digest;
use x509_parser::extensions::GeneralName;

/// A certificate's facts, for `keel cert show`, admin attributes and expiry warnings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// DNS names and IP addresses the certificate is valid for.
    pub names: Vec<String>,
    pub is_ca: bool,
    /// Unix seconds.
    pub not_before_s: i64,
    pub not_after_s: i64,
    /// SHA-256 of the DER, hex with colons (as `openssl x509 -fingerprint -sha256` prints).
    pub sha256: String,
    pub serial: String,
}

impl CertInfo {
    /// Parses one PEM certificate; the error says what is wrong with it.
    pub fn from_pem(pem: &str) -> Result<CertInfo, String> {
        let (rest, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| format!("holds no PEM certificate ({e})"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "holds a PEM {} block where a CERTIFICATE was expected",
                pem.label
            ));
        }
        if rest.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err("holds more than one PEM block (one certificate per file)".into());
        }
        CertInfo::from_der(&pem.contents)
    }

    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("does not parse as an X.509 certificate ({e})"))?;
        if !rest.is_empty() {
            return Err("has trailing bytes after the certificate".into());
        }
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::IPAddress(b) => names.push(ip_text(b)),
                    _ => {}
                }
            }
        }
        let fp = sha2::Sha256::digest(der);
        let sha256 = fp
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let info = CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            names,
            is_ca: cert.is_ca(),
            not_before_s: cert.validity().not_before.timestamp(),
            not_after_s: cert.validity().not_after.timestamp(),
            sha256,
            serial: cert.raw_serial_as_string(),
        };
        if info.not_before_s > info.not_after_s {
            return Err("is valid from a date after its expiry".into());
        }
        Ok(info)
    }

    /// Whole days until it expires at `now_s` (negative: expired that many days ago).
    pub fn days_left(&self, now_s: i64) -> i64 {
        (self.not_after_s - now_s).div_euclid(86_400)
    }

    /// Whether it is valid at `now_s`.
    pub fn valid_at(&self, now_s: i64) -> bool {
        self.not_before_s <= now_s && now_s <= self.not_after_s
    }
}

fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => format!("ip:{}", keel_core::hex::encode(b)),
    }
}
