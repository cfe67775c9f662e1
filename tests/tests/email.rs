//! The email channel end to end: real SMTP in (`swaks` against the daemon's listener), the
//! agent's reply out through a real SMTP server (`python3 -m aiosmtpd`) with threading headers,
//! a reply to that landing in the same conversation; refusals (552, 550), automatic mail,
//! sender authentication with DKIM records injected through config, and a crash between the
//! 250 and the delivery.

use gatehouse_e2e::*;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

/// A daemon with one email route (`support@bridge.test`) whose agent is `agent`, sending
/// replies through `sink`. `extra` goes into `channels.email`.
fn email_config(
    s: &Setup,
    smtp_port: u16,
    sink: &SmtpSink,
    agent: &str,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        "data_dir: data\nnode: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
         channels:\n  email:\n    listen: 127.0.0.1:{smtp_port}\n    hostname: bridge.test\n    max_message_bytes: 20000\n    \
         relay: {{host: 127.0.0.1, port: {}, tls: none}}\n{extra}\
         plugins: {{email: {{builtin: email}}}}\n\
         routes:\n  - {{name: support, channel: email, subscribe: \"support@bridge.test\", plugin: email, agents: [\"{agent}\"]}}\n",
        s.node_port, s.admin_port, sink.port
    );
    let path = s.dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(s: &Setup, config: &std::path::Path) -> Daemon {
    start_env(s, config, &[])
}

fn start_env(s: &Setup, config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
    let d = s.spawn_daemon_env(config, env);
    d.wait_log(&["SMTP listening"]);
    d.wait_log(&["gatehouse running"]);
    d
}

#[test]
fn mail_in_reply_out_and_the_answer_lands_in_the_same_conversation() {
    let s = Setup::new("email-round-trip");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let config = email_config(&s, smtp, &sink, &a.inbox_id(), "    dns: {system: false}\n");
    let _d = start(&s, &config);
    a.init();

    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Printer jam",
            "--header",
            "Message-ID: <m1@example.org>",
            "--body",
            "The printer on floor 2 is jammed.",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("250 2.0.0 Stored"), "{out}");

    let m = &a.listen(1)[0];
    assert_eq!(
        m["text"],
        "Subject: Printer jam\n\nThe printer on floor 2 is jammed."
    );
    let origin = &m["sender_endpoint"];
    assert_eq!(origin["channel"], "email");
    assert_eq!(origin["address"], "ann@example.org");
    assert_eq!(
        origin["verified"], true,
        "the bridge's signature checks out"
    );
    assert_eq!(
        origin["sender_auth"]["verified"], false,
        "no DKIM, SPF or DMARC here"
    );
    assert_eq!(
        origin["sender_auth"]["results"],
        "dkim=none spf=none dmarc=none"
    );
    let conversation = m["conversation"].as_str().unwrap().to_string();
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();
    let info: serde_json::Value =
        serde_json::from_str(&a.ok(&["group", "info", "--conversation", &conversation])).unwrap();
    assert_eq!(
        info["name"], "Printer jam",
        "the thread is a conversation named by its subject: {info}"
    );

    a.ok(&[
        "send",
        "--conversation",
        &conversation,
        "A technician is on the way.",
    ]);
    let reply = sink.wait_messages(1).remove(0);
    assert_eq!(
        mail_header(&reply, "To").as_deref(),
        Some("ann@example.org")
    );
    assert_eq!(
        mail_header(&reply, "From").as_deref(),
        Some("support@bridge.test")
    );
    assert_eq!(
        mail_header(&reply, "Subject").as_deref(),
        Some("Re: Printer jam")
    );
    assert_eq!(
        mail_header(&reply, "In-Reply-To").as_deref(),
        Some("<m1@example.org>")
    );
    assert_eq!(
        mail_header(&reply, "References").as_deref(),
        Some("<m1@example.org>")
    );
    assert_eq!(
        mail_header(&reply, "X-Gatehouse-Loop").as_deref(),
        Some("bridge.test; hops=1")
    );
    assert!(reply.contains("A technician is on the way."), "{reply}");
    let our_id = mail_header(&reply, "Message-ID").unwrap();
    assert!(
        our_id.starts_with("<gh.") && our_id.ends_with("@bridge.test>"),
        "{our_id}"
    );

    // Ann answers in the thread, quoting us: only what is new reaches the same conversation.
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Re: Printer jam",
            "--header",
            "Message-ID: <m2@example.org>",
            "--header",
            &format!("In-Reply-To: {our_id}"),
            "--header",
            &format!("References: <m1@example.org> {our_id}"),
            "--body",
            "Thanks, it works again.\n\nOn Wed, Support wrote:\n> A technician is on the way.\n",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Thanks, it works again.");
    assert_eq!(m["conversation"], conversation.as_str());

    // Another mail from Ann, a new thread: a conversation of its own.
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Badge reader",
            "--header",
            "Message-ID: <n1@example.org>",
            "--body",
            "My badge does not open door 3.",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let other = &a.listen(1)[0];
    assert_eq!(
        other["text"],
        "Subject: Badge reader\n\nMy badge does not open door 3."
    );
    assert_ne!(other["conversation"], conversation.as_str());
    assert_eq!(
        other["sender_inbox"],
        endpoint.as_str(),
        "the same endpoint: Ann"
    );

    // Our second reply in the first conversation continues the first thread.
    a.ok(&["send", "--conversation", &conversation, "Good to hear."]);
    let second = sink.wait_messages(2).remove(1);
    assert_eq!(
        mail_header(&second, "In-Reply-To").as_deref(),
        Some("<m2@example.org>")
    );
    assert_eq!(
        mail_header(&second, "References").as_deref(),
        Some(format!("<m1@example.org> {our_id} <m2@example.org>").as_str())
    );
    assert_eq!(
        mail_header(&second, "Subject").as_deref(),
        Some("Re: Printer jam")
    );

    // The agent writes first (its DM with Ann): a new thread, and Ann's answer comes back to
    // that DM.
    let dm = a.ok(&["send", "--to", &endpoint, "Your badge works again."]);
    let dm = dm.trim().to_string();
    let third = sink.wait_messages(3).remove(2);
    assert_eq!(mail_header(&third, "In-Reply-To"), None);
    let dm_id = mail_header(&third, "Message-ID").unwrap();
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Re: badge",
            "--header",
            &format!("In-Reply-To: {dm_id}"),
            "--body",
            "Confirmed.",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Confirmed.");
    assert_eq!(m["conversation"], dm.as_str());
}

#[test]
fn oversized_unknown_automatic_and_looping_mail_make_no_chat_message() {
    let s = Setup::new("email-refusals");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let config = email_config(&s, smtp, &sink, &a.inbox_id(), "    dns: {system: false}\n");
    let d = start(&s, &config);
    a.init();

    let big = "x".repeat(30_000);
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--body",
            &big,
        ],
    );
    assert_ne!(code, 0);
    assert!(out.contains("552 5.3.4"), "{out}");
    assert_eq!(d.status()["inbox_depth"], 0, "nothing stored");
    d.wait_log(&["larger than max_message_bytes"]);

    let (code, out) = swaks(
        smtp,
        &["--from", "ann@example.org", "--to", "sales@bridge.test"],
    );
    assert_ne!(code, 0);
    assert!(out.contains("550 5.1.1"), "{out}");

    // Not a mail at all (no header, binary bytes): refused with the reason, the daemon goes on.
    let junk = s.dir.join("junk.eml");
    std::fs::write(
        &junk,
        b"\x00\xff\xfe garbage without headers\r\n\x01\x02\r\n",
    )
    .unwrap();
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--data",
            &format!("@{}", junk.display()),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        out.contains("550 5.1.7 The message has no From address"),
        "{out}"
    );
    d.wait_log(&["mail refused: no From address"]);

    // Accepted (so nobody bounces them) but not chat messages.
    for (from, header) in [
        ("ann@example.org", "Auto-Submitted: auto-replied"),
        ("ann@example.org", "Precedence: bulk"),
        ("ann@example.org", "X-Gatehouse-Loop: other.test; hops=3"),
        ("<>", "Subject: Undelivered Mail Returned to Sender"),
    ] {
        let (code, out) = swaks(
            smtp,
            &[
                "--from",
                from,
                "--to",
                "support@bridge.test",
                "--header",
                header,
                "--body",
                "auto",
            ],
        );
        assert_eq!(code, 0, "{header}: {out}");
    }
    // The next chat message is the marker: nothing of the above got through.
    let (code, _) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: marker",
            "--body",
            "marker",
        ],
    );
    assert_eq!(code, 0);
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "Subject: marker\n\nmarker");
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "unexpected: {extra}");
    let log = d.log_text();
    assert_eq!(
        log.matches("automatic mail (auto-reply, bounce, list) not turned into a chat message")
            .count(),
        3,
        "{log}"
    );
    assert!(log.contains("a loop"), "{log}");
}

/// A DKIM-signed mail (ed25519, the key published through `channels.email.dns.records`).
fn signed_mail(key_der: &[u8], subject: &str, body: &str) -> String {
    let key = Ed25519Key::from_pkcs8_der(key_der).unwrap();
    let raw = format!(
        "From: Ann <ann@example.org>\r\nTo: support@bridge.test\r\nSubject: {subject}\r\n\
         Message-ID: <{}@example.org>\r\n\r\n{body}\r\n",
        subject.replace(' ', "-")
    );
    let sig = DkimSigner::from_key(key)
        .domain("example.org")
        .selector("sel")
        .headers(["From", "To", "Subject", "Message-ID"])
        .sign(raw.as_bytes())
        .unwrap();
    format!("{}{raw}", sig.to_header())
}

fn dkim_setup(name: &str, policy: &str) -> (Setup, SmtpSink, Agent, u16, Daemon, Vec<u8>) {
    let s = Setup::new(name);
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let public = base64_encode(&Ed25519Key::from_pkcs8_der(&der).unwrap().public_key());
    let extra = format!(
        "    unverified: {policy}\n    dns:\n      system: false\n      records:\n        \
         sel._domainkey.example.org: [\"v=DKIM1; k=ed25519; p={public}\"]\n        \
         _dmarc.example.org: [\"v=DMARC1; p=reject\"]\n"
    );
    let config = email_config(&s, smtp, &sink, &a.inbox_id(), &extra);
    let d = start(&s, &config);
    a.init();
    (s, sink, a, smtp, d, der)
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn send_data(s: &Setup, smtp: u16, name: &str, data: &str) -> (i32, String) {
    let file = s.dir.join(name);
    std::fs::write(&file, data).unwrap();
    swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--data",
            &format!("@{}", file.display()),
        ],
    )
}

#[test]
fn dkim_pass_fail_and_none_under_the_reject_policy() {
    let (s, _sink, a, smtp, _d, key) = dkim_setup("email-dkim-reject", "reject");

    let good = signed_mail(&key, "Signed", "Hello from a signed mail.");
    let (code, out) = send_data(&s, smtp, "good.eml", &good);
    assert_eq!(code, 0, "{out}");
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Subject: Signed\n\nHello from a signed mail.");
    assert_eq!(m["sender_endpoint"]["sender_auth"]["verified"], true);
    let results = m["sender_endpoint"]["sender_auth"]["results"]
        .as_str()
        .unwrap();
    assert!(
        results.starts_with("dkim=pass") && results.ends_with("dmarc=pass"),
        "{results}"
    );

    // The body changed after signing: DKIM fails, DMARC fails, refused.
    let forged =
        signed_mail(&key, "Forged", "Pay invoice 1.").replace("Pay invoice 1.", "Pay invoice 2.");
    let (code, out) = send_data(&s, smtp, "forged.eml", &forged);
    assert_ne!(code, 0);
    assert!(
        out.contains("550 5.7.1 Sender not verified (dkim=fail"),
        "{out}"
    );

    // No signature at all under a p=reject domain.
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Unsigned",
            "--body",
            "hi",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        out.contains("550 5.7.1 Sender not verified (dkim=none"),
        "{out}"
    );

    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "refused mail reached the agent: {extra}"
    );
}

#[test]
fn unverified_mail_is_quarantined_and_released_by_the_operator() {
    let (s, _sink, a, smtp, d, _key) = dkim_setup("email-dkim-quarantine", "quarantine");
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Unsigned",
            "--body",
            "hold me",
        ],
    );
    assert_eq!(code, 0, "quarantine accepts: {out}");
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "quarantined mail reached the agent: {extra}"
    );

    let dl = d.wait_dead_letter("the quarantined mail", |d| d["kind"] == "unverified");
    assert!(dl["reason"].as_str().unwrap().contains("dkim=none"), "{dl}");
    let out = d.dlq(&["retry", &dl["id"].to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Subject: Unsigned\n\nhold me");
    assert_eq!(m["sender_endpoint"]["sender_auth"]["verified"], false);
    let _ = s;
}

#[test]
fn crash_between_250_and_delivery_delivers_once() {
    let s = Setup::new("email-crash");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let config = email_config(&s, smtp, &sink, &a.inbox_id(), "    dns: {system: false}\n");
    let mut d = start_env(
        &s,
        &config,
        &[("GATEHOUSE_FAULT_CRASH_BEFORE_DELIVER", "1")],
    );
    a.init();
    let mail = [
        "--from",
        "ann@example.org",
        "--to",
        "support@bridge.test",
        "--header",
        "Subject: Once",
        "--header",
        "Message-ID: <once@example.org>",
        "--body",
        "exactly once",
    ];
    let (code, out) = swaks(smtp, &mail);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("250 2.0.0 Stored"), "{out}");
    assert!(
        d.wait_exit(),
        "the fault hook stops the daemon before delivering"
    );

    let _d = start(&s, &config);
    // The client sends it again too (as if it had missed our 250): stored once.
    let (code, out) = swaks(smtp, &mail);
    assert_eq!(code, 0, "{out}");
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Subject: Once\n\nexactly once");
    let extra = a.ok(&["listen", "--json", "--timeout", "3"]);
    assert!(extra.trim().is_empty(), "delivered twice: {extra}");
}

/// A real TLS client (Python's smtplib) sends through STARTTLS; with `require_tls` a plain
/// client is told to STARTTLS first.
#[test]
fn starttls_on_the_listener_and_plain_mail_refused_when_required() {
    let s = Setup::new("email-starttls");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(s.dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(s.dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let config = email_config(
        &s,
        smtp,
        &sink,
        &a.inbox_id(),
        "    dns: {system: false}\n    tls: {cert: cert.pem, key: key.pem}\n    require_tls: true\n",
    );
    let _d = start(&s, &config);
    a.init();

    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--body",
            "plain",
        ],
    );
    assert_ne!(code, 0);
    assert!(out.contains("STARTTLS"), "EHLO offers it: {out}");
    assert!(
        out.contains("530 5.7.0 Must issue a STARTTLS command first"),
        "{out}"
    );

    let script = r#"
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
    c.ehlo("client.test")
    c.starttls(context=ctx)
    c.ehlo("client.test")
    print("cipher", c.sock.cipher()[0])
    c.sendmail("ann@example.org", ["support@bridge.test"],
        "From: ann@example.org\r\nTo: support@bridge.test\r\nSubject: Over TLS\r\n\r\nencrypted hop\r\n")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &smtp.to_string()])
        .arg(s.dir.join("cert.pem"))
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cipher TLS"),
        "a TLS session"
    );
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], "Subject: Over TLS\n\nencrypted hop");
}

/// Attachments follow the text as XMTP attachments, each within `max_attachment_bytes`; the
/// HTML part too when `keep_html` asks for it.
#[test]
fn attachments_and_html_follow_the_text_within_the_cap() {
    let s = Setup::new("email-attachments");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let smtp = free_port();
    let config = email_config(
        &s,
        smtp,
        &sink,
        &a.inbox_id(),
        "    dns: {system: false}\n    max_attachment_bytes: 100\n    keep_html: true\n",
    );
    let d = start(&s, &config);
    a.init();
    let small = s.dir.join("r.csv");
    std::fs::write(&small, "a,b\n1,2\n").unwrap();
    let big = s.dir.join("big.bin");
    std::fs::write(&big, vec![b'x'; 500]).unwrap();
    let (code, out) = swaks(
        smtp,
        &[
            "--from",
            "ann@example.org",
            "--to",
            "support@bridge.test",
            "--header",
            "Subject: Report",
            "--attach-type",
            "text/html",
            "--attach-body",
            "<p>See <b>attached</b></p>",
            "--attach-type",
            "text/csv",
            "--attach-name",
            "r.csv",
            "--attach",
            &format!("@{}", small.display()),
            "--attach-type",
            "application/octet-stream",
            "--attach-name",
            "big.bin",
            "--attach",
            &format!("@{}", big.display()),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let got = a.listen(3);
    assert!(
        got[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Subject: Report"),
        "{:?}",
        got[0]
    );
    assert!(
        got[0]["text"].as_str().unwrap().contains("See attached"),
        "HTML reduced to text: {:?}",
        got[0]
    );
    let files: Vec<&str> = got[1..]
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(got[1]["content_type"], "xmtp.org/attachment:1.0");
    assert!(
        files.contains(&"(attachment r.csv text/csv, 8 bytes)"),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("(attachment message.html text/html")),
        "{files:?}"
    );
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "the big one is not carried: {extra}"
    );
    d.wait_log(&["attachment not carried: over channels.email.max_attachment_bytes"]);
}

/// Two bridges whose agents answer every mail: the hop header ends the exchange after three
/// bridge hops instead of letting it go round for ever.
#[test]
fn a_mail_loop_between_two_bridges_ends_after_three_hops() {
    let (sa, sb) = (Setup::new("email-loop-a"), Setup::new("email-loop-b"));
    let (smtp_a, smtp_b) = (free_port(), free_port());
    let (agent_a, agent_b) = (sa.agent("agent"), sb.agent("agent"));
    let config = |s: &Setup, smtp: u16, relay: u16, mailbox: &str, agent: &str| {
        let text = format!(
            "data_dir: data\nnode: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
             channels:\n  email:\n    listen: 127.0.0.1:{smtp}\n    hostname: {}\n    dns: {{system: false}}\n    \
             relay: {{host: 127.0.0.1, port: {relay}, tls: none}}\n\
             plugins: {{email: {{builtin: email}}}}\n\
             routes:\n  - {{name: support, channel: email, subscribe: \"{mailbox}\", plugin: email, agents: [\"{agent}\"]}}\n",
            s.node_port,
            s.admin_port,
            mailbox.split('@').nth(1).unwrap()
        );
        let path = s.dir.join("config.yaml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca = config(&sa, smtp_a, smtp_b, "support@a.test", &agent_a.inbox_id());
    let cb = config(&sb, smtp_b, smtp_a, "help@b.test", &agent_b.inbox_id());
    let da = start(&sa, &ca);
    let db = start(&sb, &cb);
    agent_a.init();
    agent_b.init();

    // B's mailbox writes to A once (as if B's agent had started it).
    let (code, out) = swaks(
        smtp_a,
        &[
            "--from",
            "help@b.test",
            "--to",
            "support@a.test",
            "--header",
            "Subject: ping",
            "--body",
            "ping",
        ],
    );
    assert_eq!(code, 0, "{out}");
    // Each agent answers what it gets, as an automatic agent would.
    let answer = |a: &Agent| {
        let m = &a.listen(1)[0];
        let conv = m["conversation"].as_str().unwrap().to_string();
        a.ok(&["send", "--conversation", &conv, "auto: received"]);
    };
    answer(&agent_a); // hop 1: A → B
    answer(&agent_b); // hop 2: B → A
    answer(&agent_a); // hop 3: A → B, which drops it
    db.wait_log(&["it went through 3 bridges already (a loop)"]);
    for a in [&agent_a, &agent_b] {
        let extra = a.ok(&["listen", "--json", "--timeout", "3"]);
        assert!(extra.trim().is_empty(), "the exchange went on: {extra}");
    }
    let _ = da;
}

/// SIGHUP adding and dropping email routes changes the mailboxes the running SMTP server
/// takes mail for, without restarting it.
#[test]
fn sighup_changes_the_mailboxes_in_place() {
    let s = Setup::new("email-reload");
    let sink = SmtpSink::start(&s.dir);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let smtp = free_port();
    let config = email_config(&s, smtp, &sink, &inbox, "    dns: {system: false}\n");
    let original = std::fs::read_to_string(&config).unwrap();
    let d = start(&s, &config);
    a.init();
    let mail_to = |to: &str| {
        swaks(
            smtp,
            &["--from", "ann@example.org", "--to", to, "--body", "hello"],
        )
    };
    let (code, out) = mail_to("sales@bridge.test");
    assert_ne!(code, 0);
    assert!(out.contains("550 5.1.1"), "{out}");

    let sales = format!(
        "  - {{name: sales, channel: email, subscribe: \"sales@bridge.test\", plugin: email, agents: [\"{inbox}\"]}}\n"
    );
    std::fs::write(&config, format!("{original}{sales}")).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes added: sales"]);
    let (code, out) = mail_to("sales@bridge.test");
    assert_eq!(code, 0, "{out}");
    let m = &a.listen(1)[0];
    assert!(m["text"].as_str().unwrap().ends_with("hello"), "{m}");
    let endpoints = d.endpoints();
    assert!(
        endpoints.iter().any(|e| e["route"] == "sales"),
        "{endpoints:?}"
    );

    // The first route dropped: its mailbox is refused now; the other one goes on.
    let only_sales = original.replace(
        "  - {name: support, channel: email, subscribe: \"support@bridge.test\"",
        "  - {name: sales, channel: email, subscribe: \"sales@bridge.test\"",
    );
    std::fs::write(&config, &only_sales).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes dropped: support"]);
    let (code, out) = mail_to("support@bridge.test");
    assert_ne!(code, 0);
    assert!(out.contains("550 5.1.1"), "{out}");
    let (code, out) = mail_to("sales@bridge.test");
    assert_eq!(code, 0, "{out}");
    assert_eq!(a.listen(1).len(), 1);
    let log = d.log_text();
    assert_eq!(log.matches("SMTP listening").count(), 1, "restarted: {log}");
}
