//! The few fields of an X.509 certificate skiff reads itself: the
//! subject's common name, the DNS and URI subject alternative names, and
//! the validity period.
//!
//! rustls (webpki) verifies certificates but does not expose these. A
//! general X.509 parser (x509-parser and its ASN.1, OID-registry and time
//! crates) added 0.4 MiB to a binary that must stay under 4 MiB on the
//! boards, for three fields; this reader walks the DER to them and no
//! further. It reads certificates webpki has already verified (a client's)
//! or that the operator configured (the server's own), and returns `None`
//! on anything it does not expect, never panics: every read is bounded by
//! the slice it reads from.
//!
//! ```text
//! Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE {
//!     [0] EXPLICIT version OPTIONAL, serialNumber INTEGER,
//!     signature AlgorithmIdentifier, issuer Name, validity Validity,
//!     subject Name, subjectPublicKeyInfo, [1] [2] OPTIONAL,
//!     [3] EXPLICIT extensions SEQUENCE OF Extension OPTIONAL }
//! Validity     ::= SEQUENCE { notBefore Time, notAfter Time }
//! Name         ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
//! Extension    ::= SEQUENCE { extnID OID, critical BOOLEAN OPTIONAL, extnValue OCTET STRING }
//! SubjectAltName ::= SEQUENCE OF GeneralName   -- dNSName [2], URI [6], IA5String
//! ```

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;
/// id-at-commonName, 2.5.4.3.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// String types a common name may have that are text as they are.
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// Takes one DER element (tag, content) off the front of `input`. Only
/// single-byte tags and definite lengths of at most 4 bytes: all a
/// certificate needs.
fn take<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    *input = after;
    Some((tag, content))
}

/// Takes an element that must have `tag`.
fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
    match take(input)? {
        (t, content) if t == tag => Some(content),
        _ => None,
    }
}

/// The fields skiff reads, borrowed from the certificate's DER.
pub struct Fields<'a> {
    validity: &'a [u8],
    subject: &'a [u8],
    extensions: Option<&'a [u8]>,
}

/// Walks a certificate to its validity, subject and extensions.
pub fn parse(der: &[u8]) -> Option<Fields<'_>> {
    let mut input = der;
    let mut cert = expect(&mut input, SEQUENCE)?;
    let mut tbs = expect(&mut cert, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        take(&mut tbs)?;
    }
    take(&mut tbs)?; // serialNumber
    expect(&mut tbs, SEQUENCE)?; // signature
    expect(&mut tbs, SEQUENCE)?; // issuer
    let validity = expect(&mut tbs, SEQUENCE)?;
    let subject = expect(&mut tbs, SEQUENCE)?;
    expect(&mut tbs, SEQUENCE)?; // subjectPublicKeyInfo
    let mut extensions = None;
    while !tbs.is_empty() {
        let (tag, content) = take(&mut tbs)?;
        if tag == EXTENSIONS {
            let mut c = content;
            extensions = Some(expect(&mut c, SEQUENCE)?);
        }
    }
    Some(Fields {
        validity,
        subject,
        extensions,
    })
}

impl<'a> Fields<'a> {
    /// The subject's first common name, when it is a text string.
    pub fn common_name(&self) -> Option<&'a str> {
        let mut rdns = self.subject;
        while !rdns.is_empty() {
            let mut set = expect(&mut rdns, SET)?;
            while !set.is_empty() {
                let mut atv = expect(&mut set, SEQUENCE)?;
                let oid = expect(&mut atv, OID)?;
                let (tag, value) = take(&mut atv)?;
                if oid == OID_CN {
                    return match tag {
                        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                            std::str::from_utf8(value).ok()
                        }
                        _ => None,
                    };
                }
            }
        }
        None
    }

    /// The subject alternative names of one kind (`0x82` DNS, `0x86` URI).
    fn san(&self, kind: u8) -> Option<&'a str> {
        let mut exts = self.extensions?;
        while !exts.is_empty() {
            let mut ext = expect(&mut exts, SEQUENCE)?;
            let oid = expect(&mut ext, OID)?;
            if ext.first() == Some(&BOOLEAN) {
                take(&mut ext)?;
            }
            let mut value = expect(&mut ext, OCTET_STRING)?;
            if oid != OID_SAN {
                continue;
            }
            let mut names = expect(&mut value, SEQUENCE)?;
            while !names.is_empty() {
                let (tag, name) = take(&mut names)?;
                if tag == kind {
                    return std::str::from_utf8(name).ok();
                }
            }
            return None;
        }
        None
    }

    /// The first DNS subject alternative name.
    pub fn san_dns(&self) -> Option<&'a str> {
        self.san(SAN_DNS)
    }

    /// The first URI subject alternative name.
    pub fn san_uri(&self) -> Option<&'a str> {
        self.san(SAN_URI)
    }

    /// `(not_before, not_after)` in seconds since the Unix epoch.
    pub fn validity(&self) -> Option<(i64, i64)> {
        let mut v = self.validity;
        Some((time(&mut v)?, time(&mut v)?))
    }
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), as RFC 5280 requires them, in Unix seconds.
fn time(input: &mut &[u8]) -> Option<i64> {
    let (tag, text) = take(input)?;
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, s) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `2021-01-01 00:00:00 UTC`, for error messages.
pub fn format_utc(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // civil_from_days, the inverse of the above.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(p: rcgen::CertificateParams) -> Vec<u8> {
        p.self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn reads_the_names_and_validity_rcgen_writes() {
        let mut p = rcgen::CertificateParams::new(vec![
            "dev-17.plant.local".to_string(),
            "10.0.0.7".to_string(),
        ])
        .unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "plant");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "dev-17");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://plant/dev-17".try_into().unwrap(),
        ));
        p.not_before = rcgen::date_time_ymd(2020, 2, 29);
        p.not_after = rcgen::date_time_ymd(2051, 12, 31);
        let der = cert(p);
        let f = parse(&der).expect("parses");
        assert_eq!(f.common_name(), Some("dev-17"));
        assert_eq!(f.san_dns(), Some("dev-17.plant.local"));
        assert_eq!(f.san_uri(), Some("spiffe://plant/dev-17"));
        // 2051 is past UTCTime's range: rcgen writes a GeneralizedTime.
        assert_eq!(f.validity(), Some((1_582_934_400, 2_587_593_600)));
        assert_eq!(format_utc(1_582_934_400), "2020-02-29 00:00:00 UTC");
        assert_eq!(format_utc(2_587_593_600), "2051-12-31 00:00:00 UTC");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59 UTC");

        let bare = cert(rcgen::CertificateParams::new(Vec::<String>::new()).unwrap());
        let f = parse(&bare).expect("parses");
        assert_eq!(f.san_dns(), None);
        assert_eq!(f.san_uri(), None);
    }

    #[test]
    fn every_truncation_and_flipped_byte_is_none_or_an_answer_never_a_panic() {
        let mut p = rcgen::CertificateParams::new(vec!["a.b".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "x");
        let der = cert(p);
        for n in 0..der.len() {
            assert!(parse(&der[..n]).is_none(), "a prefix of {n} bytes");
        }
        for i in 0..der.len() {
            for bit in [0x01, 0x80] {
                let mut d = der.clone();
                d[i] ^= bit;
                if let Some(f) = parse(&d) {
                    let _ = (f.common_name(), f.san_dns(), f.san_uri(), f.validity());
                }
            }
        }
    }

    #[test]
    fn times_are_unix_seconds() {
        let t = |tag: u8, s: &str| {
            let mut der = vec![tag, s.len() as u8];
            der.extend_from_slice(s.as_bytes());
            time(&mut &der[..])
        };
        assert_eq!(t(UTC_TIME, "700101000000Z"), Some(0));
        assert_eq!(t(UTC_TIME, "491231235959Z"), Some(2_524_607_999));
        assert_eq!(t(UTC_TIME, "500101000000Z"), Some(-631_152_000));
        assert_eq!(t(GENERALIZED_TIME, "21000301000000Z"), Some(4_107_542_400));
        assert_eq!(t(UTC_TIME, "700101000000+0100"), None);
        assert_eq!(t(UTC_TIME, "701301000000Z"), None);
        assert_eq!(t(GENERALIZED_TIME, "700101000000Z"), None);
    }
}
