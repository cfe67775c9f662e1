//! The email parsing path under fuzzing: everything an SMTP client controls goes through
//! [`fuzz_one`] — the SMTP state machine with our handler, our parser, and the
//! authentication parser. Nothing may panic or hang. `fuzz/` holds the cargo-fuzz target
//! (`cargo +nightly fuzz run email`); [`mutate`] drives a seeded, test-sized run in
//! `cargo test` (`GATEHOUSE_FUZZ_ITERS` sets its length).

/// Feeds `data` through the SMTP session (line by line, then as one DATA body), the MIME
/// parser and the DKIM/ARC header parser.
pub fn fuzz_one(data: &[u8]) {
    super::smtp::fuzz_session(data);
    let _ = super::parse::parse(data, false);
    let _ = super::parse::parse(data, true);
    let _ = super::auth::parse_authenticated(data);
}

/// Seed messages: the shapes real mail takes.
pub const SEEDS: &[&[u8]] = &[
    b"From: =?utf-8?q?Ann_M=C3=BCller?= <ann@example.org>\r\nTo: support@bridge.test\r\nSubject: =?utf-8?b?SGVsbG8g4oCU?=\r\nMessage-ID: <m2@example.org>\r\nIn-Reply-To: <m1@example.org>\r\nReferences: <m0@example.org> <m1@example.org>\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe\r\n",
    b"From: a@example.org\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>there</b></p>\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--b--\r\n",
    b"DKIM-Signature: v=1; a=ed25519-sha256; s=sel; d=example.org; c=relaxed/relaxed;\r\n\th=From:To; bh=YQtM7sTJLXGyFTlwQ55WradiAtQ4EmkfkCjF26Danx0=; b=DQfz;\r\nFrom: Ann <ann@example.org>\r\nAuto-Submitted: auto-replied\r\n\r\nbody\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\nFrom: MAILER-DAEMON@x\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\nStatus: 5.1.1\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nFrom: a@b\r\n\r\nhi\r\n--x--\r\n",
    b"EHLO x\r\nMAIL FROM:<> SIZE=10\r\nRCPT TO:<support@bridge.test>\r\nDATA\r\nFrom: a@b\r\n\r\n..dot\r\n.\r\nRSET\r\nQUIT\r\n",
];

const TOKENS: &[&[u8]] = &[
    b"=?utf-8?b?",
    b"?=",
    b"\r\n",
    b"\r\n\r\n",
    b"--b",
    b"--b--",
    b"Content-Type: multipart/mixed; boundary=\"b\"\r\n",
    b":",
    b"<",
    b">",
    b"@",
    b";",
    b"=\r\n",
    b"\r\n.\r\n",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA\r\n",
    b"base64",
    b"\xff\xfe",
    b"\t",
    b"\"",
    b"=?",
    b"charset=utf-16",
];

/// A small xorshift generator (deterministic runs).
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutated input from the seeds.
pub fn mutate(rng: &mut Rng) -> Vec<u8> {
    let mut d = SEEDS[rng.below(SEEDS.len())].to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(d.len() + 1);
        match rng.below(7) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 => d.insert(at, rng.next() as u8),
            2 if at < d.len() => {
                let end = (at + rng.below(64)).min(d.len());
                d.drain(at..end);
            }
            3 if at < d.len() => {
                let end = (at + rng.below(256)).min(d.len());
                let chunk = d[at..end].to_vec();
                for _ in 0..1 + rng.below(4) {
                    d.splice(at..at, chunk.iter().copied());
                }
            }
            4 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                d.splice(at..at, t.iter().copied());
            }
            5 => {
                let other = SEEDS[rng.below(SEEDS.len())];
                let from = rng.below(other.len());
                d.splice(at..at, other[from..].iter().copied());
            }
            _ => d.truncate(at),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test-sized fuzz run: every mutated input passes the whole parsing path without a
    /// panic. `GATEHOUSE_FUZZ_ITERS` makes it longer (the closing note of issue 8 names the
    /// long run's size).
    #[test]
    fn the_parsing_path_survives_mutated_mail() {
        let iters: usize = std::env::var("GATEHOUSE_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut parsed = 0;
        for _ in 0..iters {
            let d = mutate(&mut rng);
            fuzz_one(&d);
            parsed += usize::from(super::super::parse::parse(&d, false).is_some());
        }
        // The run exercised the parser, not only its early exits.
        assert!(parsed > iters / 2, "only {parsed} of {iters} inputs parsed");
    }
}
