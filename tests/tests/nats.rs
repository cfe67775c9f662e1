//! The NATS channel end to end against a real `nats-server -js` started by each test: core
//! subjects both ways with the loop header, request-reply with an agent answering (and the
//! timeout path), a queue group splitting messages between two bridges, JetStream through
//! SIGKILLs of the daemon and a restart of the server, and refusals.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use gatehouse_e2e::*;

/// A test-side NATS client (async-nats on its own runtime).
struct Client {
    rt: tokio::runtime::Runtime,
    nc: async_nats::Client,
}

impl Client {
    fn connect(url: &str) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let nc = rt.block_on(async_nats::connect(url)).unwrap();
        Client { rt, nc }
    }

    fn publish(&self, subject: &str, payload: &[u8]) {
        self.publish_with(subject, &[], payload);
    }

    fn publish_with(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        self.rt.block_on(async {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, *v);
            }
            self.nc
                .publish_with_headers(subject.to_string(), h, payload.to_vec().into())
                .await
                .unwrap();
            self.nc.flush().await.unwrap();
        });
    }

    /// Messages on `subject`, as (payload, headers).
    fn subscribe(
        &self,
        subject: &str,
    ) -> std::sync::mpsc::Receiver<(String, Vec<(String, String)>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sub = self
            .rt
            .block_on(self.nc.subscribe(subject.to_string()))
            .unwrap();
        self.rt.block_on(self.nc.flush()).unwrap();
        self.rt.spawn(async move {
            while let Some(m) = sub.next().await {
                let headers = m
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                    .collect();
                let _ = tx.send((String::from_utf8_lossy(&m.payload).into_owned(), headers));
            }
        });
        rx
    }

    /// Starts a request; its answer (or the error) arrives on the receiver.
    fn request(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
        timeout: Duration,
    ) -> std::sync::mpsc::Receiver<Result<String, String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let nc = self.nc.clone();
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        let req = async_nats::Request::new()
            .payload(payload.to_vec().into())
            .headers(h)
            .timeout(Some(timeout));
        let subject = subject.to_string();
        self.rt.spawn(async move {
            let r = nc
                .send_request(subject, req)
                .await
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        rx
    }

    fn create_stream(&self, name: &str, subjects: &[&str]) {
        self.rt.block_on(async {
            let js = async_nats::jetstream::new(self.nc.clone());
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }

    /// What a stream holds, in order: (subject, payload) per message.
    fn stream_messages(&self, name: &str) -> Vec<(String, String)> {
        self.rt.block_on(async {
            let js = async_nats::jetstream::new(self.nc.clone());
            let mut stream = js.get_stream(name).await.unwrap();
            let state = stream.info().await.unwrap().state.clone();
            let mut out = Vec::new();
            for seq in state.first_sequence..=state.last_sequence {
                if state.messages == 0 {
                    break;
                }
                let m = stream.get_raw_message(seq).await.unwrap();
                out.push((
                    m.subject.to_string(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                ));
            }
            out
        })
    }

    /// Publishes to a stream, waiting for each acknowledgement.
    fn js_publish(&self, subject: &str, payloads: impl Iterator<Item = String>) {
        self.rt.block_on(async {
            let js = async_nats::jetstream::new(self.nc.clone());
            for p in payloads {
                loop {
                    match js
                        .publish(subject.to_string(), p.clone().into_bytes().into())
                        .await
                    {
                        Ok(ack) => {
                            if ack.await.is_ok() {
                                break;
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        });
    }
}

/// One NATS route `events.{device}.>` → agents; replies on `reply`.
fn nats_config(
    s: &Setup,
    node: &str,
    nats_url: &str,
    agent: &str,
    route_extra: &str,
    reply: &str,
) -> std::path::PathBuf {
    let text = format!(
        "data_dir: data\nnode: {node}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
         channels: {{nats: {{urls: [\"{nats_url}\"], max_payload: 4096}}}}\n\
         plugins: {{nats: {{builtin: nats}}}}\n\
         routes:\n  - {{name: svc, channel: nats, subscribe: \"events.{{device}}.>\", reply: \"{reply}\", plugin: nats, agents: [\"{agent}\"]{route_extra}}}\n",
        s.admin_port
    );
    let path = s.dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn embedded(s: &Setup) -> String {
    format!("{{listen: 127.0.0.1:{}}}", s.node_port)
}

fn start(s: &Setup, config: &std::path::Path) -> Daemon {
    let d = s.spawn_daemon(config);
    d.wait_log(&["NATS connected"]);
    d.wait_log(&["gatehouse running"]);
    d
}

fn json_n(m: &serde_json::Value) -> u64 {
    let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn core_subjects_both_ways_without_echo() {
    let s = Setup::new("nats-core");
    let mut server = NatsServer::start(&s.dir);
    let a = s.agent("agent");
    // The reply subject is inside the subscribed pattern: the origin header keeps our own
    // publishes from coming back in.
    let config = nats_config(
        &s,
        &embedded(&s),
        &server.url(),
        &a.inbox_id(),
        "",
        "events.{device}.out",
    );
    let d = start(&s, &config);
    a.init();
    let c = Client::connect(&server.url());
    let out = c.subscribe("events.billing.out");

    c.publish_with(
        "events.billing.created",
        &[("Trace-Id", "t-1")],
        br#"{"n":1}"#,
    );
    let m = &a.listen(1)[0];
    assert_eq!(json_n(m), 1);
    assert_eq!(m["sender_endpoint"]["channel"], "nats");
    assert_eq!(m["sender_endpoint"]["address"], "events.billing.>");
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();

    a.ok(&["send", "--to", &endpoint, "invoice sent"]);
    let (payload, headers) = out.recv_timeout(EVENT_TIMEOUT).expect("the reply on NATS");
    assert_eq!(payload, "invoice sent");
    assert!(
        headers.iter().any(|(k, _)| k == "Gatehouse-Origin"),
        "{headers:?}"
    );
    // Ten more each way: counts stay exact (nothing of ours came back as a device message).
    for n in 2..12 {
        c.publish(
            "events.billing.created",
            format!("{{\"n\":{n}}}").as_bytes(),
        );
    }
    let got: Vec<u64> = a.listen(10).iter().map(json_n).collect();
    assert_eq!(got, (2..12).collect::<Vec<_>>());
    for i in 0..10 {
        a.ok(&["send", "--to", &endpoint, &format!("r{i}")]);
        assert_eq!(out.recv_timeout(EVENT_TIMEOUT).unwrap().0, format!("r{i}"));
    }
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "echo: {extra}");

    // The server restarts: core NATS kept nothing meanwhile, and the status says so.
    assert_eq!(d.status()["nats"]["disconnects"], 0);
    server.restart();
    wait_for("the reconnection", || {
        (d.log_text().matches("NATS connected").count() >= 2).then_some(())
    });
    assert_eq!(d.status()["nats"]["disconnects"], 1);
    assert_eq!(d.status()["nats"]["state"], "Connected");
}

#[test]
fn request_reply_answered_by_the_agent_and_late_answers_dropped() {
    let s = Setup::new("nats-request");
    let server = NatsServer::start(&s.dir);
    let a = s.agent("agent");
    let config = nats_config(
        &s,
        &embedded(&s),
        &server.url(),
        &a.inbox_id(),
        "",
        "replies.{device}",
    );
    let d = start(&s, &config);
    a.init();
    let c = Client::connect(&server.url());
    let replies = c.subscribe("replies.>");

    let answer = c.request(
        "events.pricing.quote",
        &[],
        br#"{"n":7}"#,
        Duration::from_secs(30),
    );
    let m = &a.listen(1)[0];
    assert_eq!(json_n(m), 7);
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();
    a.ok(&["send", "--to", &endpoint, "42 EUR"]);
    assert_eq!(
        answer.recv_timeout(EVENT_TIMEOUT).unwrap(),
        Ok("42 EUR".to_string())
    );

    // A request that gives up after 300 ms; the agent answers after it did.
    let late = c.request(
        "events.pricing.quote",
        &[("Gatehouse-Timeout-Ms", "300")],
        br#"{"n":8}"#,
        Duration::from_millis(300),
    );
    assert_eq!(json_n(&a.listen(1)[0]), 8);
    assert!(
        late.recv_timeout(EVENT_TIMEOUT).unwrap().is_err(),
        "the requester timed out"
    );
    a.ok(&["send", "--to", &endpoint, "too late"]);
    d.wait_log(&["late reply dropped"]);
    // It went nowhere: the next answer, with no request open, is the next thing on replies.
    a.ok(&["send", "--to", &endpoint, "marker"]);
    assert_eq!(replies.recv_timeout(EVENT_TIMEOUT).unwrap().0, "marker");
}

#[test]
fn a_queue_group_splits_1000_messages_between_two_bridges() {
    let s1 = Setup::new("nats-queue-1");
    let s2 = Setup::new("nats-queue-2");
    let server = NatsServer::start(&s1.dir);
    let node = StandaloneNode::start(&s1.dir);
    let a = Agent::at(s1.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let external = format!("{{embedded: false, url: \"{}\"}}", node.url);
    let extra = ", queue_group: bridges";
    let c1 = nats_config(
        &s1,
        &external,
        &server.url(),
        &inbox,
        extra,
        "replies.{device}",
    );
    let c2 = nats_config(
        &s2,
        &external,
        &server.url(),
        &inbox,
        extra,
        "replies.{device}",
    );
    let d1 = start(&s1, &c1);
    let d2 = start(&s2, &c2);
    a.init();
    let c = Client::connect(&server.url());
    for n in 0..1000 {
        c.publish(
            &format!("events.dev{}.tick", n % 10),
            format!("{{\"n\":{n}}}").as_bytes(),
        );
    }
    let got: Vec<u64> = a.listen(1000).iter().map(json_n).collect();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique,
        (0..1000).collect::<Vec<_>>(),
        "each message exactly once"
    );
    assert_eq!(got.len(), 1000);
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    // Both bridges took a share.
    let share = |d: &Daemon| d.log_text().matches("delivered to conversation").count();
    assert!(
        share(&d1) > 0 && share(&d2) > 0,
        "{} / {}",
        share(&d1),
        share(&d2)
    );
}

#[test]
fn jetstream_through_sigkills_and_a_server_restart_delivers_each_once_in_order() {
    let s = Setup::new("nats-jetstream");
    let mut server = NatsServer::start(&s.dir);
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let external = format!("{{embedded: false, url: \"{}\"}}", node.url);
    let c = Client::connect(&server.url());
    c.create_stream("JOBS", &["events.>"]);
    let config = nats_config(
        &s,
        &external,
        &server.url(),
        &a.inbox_id(),
        ", stream: JOBS",
        "replies.{device}",
    );
    let mut d = start(&s, &config);
    a.init();
    const DEVICES: u64 = 5;
    const TOTAL: u64 = 5000;
    let publisher = std::thread::spawn({
        let url = server.url();
        move || {
            let c = Client::connect(&url);
            for n in 0..TOTAL {
                c.js_publish(
                    &format!("events.dev{}.job", n % DEVICES),
                    std::iter::once(format!("{{\"n\":{n}}}")),
                );
            }
        }
    });
    // SIGKILLs while the stream fills and drains, then a restart of the server itself.
    for wait in [700u64, 1300, 900] {
        std::thread::sleep(Duration::from_millis(wait));
        d.kill9();
        d = start(&s, &config);
    }
    server.restart();
    publisher.join().unwrap();

    let mut per_device: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for m in a.listen_within(TOTAL as usize, Duration::from_secs(600)) {
        let n = json_n(&m);
        per_device.entry(n % DEVICES).or_default().push(n);
    }
    for dev in 0..DEVICES {
        let want: Vec<u64> = (0..TOTAL).filter(|n| n % DEVICES == dev).collect();
        assert_eq!(
            per_device[&dev], want,
            "device {dev}: every message once, in order"
        );
    }
    let extra = a.ok(&["listen", "--json", "--timeout", "3"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    let resumed: Vec<String> = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains("JetStream consumer ready"))
                .filter_map(|l| l.split("after=").nth(1).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("JetStream consumers resumed after stream sequences {resumed:?}");
}

/// Each answer once, in order: on a difference, says where the stream first differs.
fn same(got: &[(String, String)], want: &[(String, String)]) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "the stream holds {} messages, {} expected (each answer once, in order); at {i}: {:?} instead of {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// The way back through a stream: a route with `stream:` publishes the agent's answers to
/// JetStream and marks each delivered once the stream acknowledged it (a pass's answers await
/// their acknowledgements together). A crash after the stream has a pass's answers and before
/// they are marked, then the server away while they are published again (a warning says they
/// will be retried) and more answers: the stream holds each answer once (deduplicated by
/// `Nats-Msg-Id`), in order. An answer on a subject no stream takes is a dead letter that says
/// so, and the daemon goes on.
#[test]
fn jetstream_answers_reach_the_stream_once_each_in_order_through_a_crash_and_an_outage() {
    let s = Setup::new("nats-jetstream-back");
    let mut server = NatsServer::start(&s.dir);
    let a = s.agent("agent");
    let c = Client::connect(&server.url());
    c.create_stream("JOBS", &["events.>"]);
    c.create_stream("REPLIES", &["replies.>"]);
    let url = server.url();
    let stream_route = |reply: &str| {
        nats_config(
            &s,
            &embedded(&s),
            &url,
            &a.inbox_id(),
            ", stream: JOBS",
            reply,
        )
    };
    let config = stream_route("replies.{device}");
    let mut d = start(&s, &config);
    a.init();
    c.js_publish("events.dev0.job", std::iter::once(r#"{"n":0}"#.to_string()));
    let m = &a.listen(1)[0];
    assert_eq!(json_n(m), 0);
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();

    const ANSWERS: usize = 300;
    let want: Vec<(String, String)> = (0..ANSWERS)
        .map(|i| ("replies.dev0".to_string(), format!("a{i}")))
        .collect();
    let lines = |r: std::ops::Range<usize>| r.map(|i| format!("a{i}\n")).collect::<String>();
    let stream_holds = |c: &Client, n: usize| {
        wait_for(&format!("{n} answers in the stream"), || {
            let got = c.stream_messages("REPLIES");
            (got.len() >= n).then_some(got)
        })
    };
    a.send_lines(&endpoint, &lines(0..100));
    same(&stream_holds(&c, 100), &want[..100]);

    // The stream acknowledged a pass's answers; the daemon dies before marking them.
    d.kill9();
    let mut d = s.spawn_daemon_env(&config, &[("GATEHOUSE_FAULT_CRASH_BEFORE_MARK", "1")]);
    d.wait_log(&["gatehouse running"]);
    a.send_lines(&endpoint, &lines(100..200));
    assert!(
        d.wait_exit(),
        "the fault hook aborts the daemon before it marks the pass"
    );
    d.wait_log(&["GATEHOUSE_FAULT_CRASH_BEFORE_MARK: aborting before marking"]);
    assert!(
        c.stream_messages("REPLIES").len() > 100,
        "the crashed pass's answers are in the stream"
    );

    // The server goes away: the answers published again cannot be confirmed, and wait.
    drop(c);
    server.stop();
    let d = s.spawn_daemon(&config);
    d.wait_log(&["gatehouse running"]);
    a.send_lines(&endpoint, &lines(200..ANSWERS));
    d.wait_log(&["conversation message not published yet; will retry"]);
    server.start_again();
    let c = Client::connect(&server.url());
    same(&stream_holds(&c, ANSWERS), &want);
    assert!(
        d.dead_letters().is_empty(),
        "nothing dead-lettered: {:?}",
        d.dead_letters()
    );

    // No stream takes the subject: a dead letter with the reason, and the daemon goes on.
    let config = stream_route("nowhere.{device}");
    drop(d);
    let d = start(&s, &config);
    a.ok(&["send", "--to", &endpoint, "lost?"]);
    let dl = d.wait_dead_letter("the answer no stream takes", |d| d["kind"] == "nats");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("add the subject to a stream"),
        "{dl}"
    );
    drop(d);
    let config = stream_route("replies.{device}");
    let _d = start(&s, &config);
    a.ok(&["send", "--to", &endpoint, "a-last"]);
    let last = wait_for("the answer after the dead letter", || {
        let got = c.stream_messages("REPLIES");
        (got.len() > ANSWERS).then(|| got[ANSWERS].1.clone())
    });
    assert_eq!(last, "a-last");
}

#[test]
fn oversized_payloads_are_refused_with_a_reason_both_ways() {
    let s = Setup::new("nats-refusals");
    let server = NatsServer::start(&s.dir);
    let a = s.agent("agent");
    let config = nats_config(
        &s,
        &embedded(&s),
        &server.url(),
        &a.inbox_id(),
        "",
        "replies.{device}",
    );
    let d = start(&s, &config);
    a.init();
    let c = Client::connect(&server.url());
    c.publish("events.big.x", &vec![b'x'; 5000]);
    d.wait_log(&["rejected: payload over the size limit"]);
    c.publish("events.big.x", br#"{"n":1}"#);
    assert_eq!(json_n(&a.listen(1)[0]), 1, "the daemon goes on");
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "the big one got through: {extra}");

    // The other way: an answer over max_payload is dead-lettered with the reason.
    let endpoint = d.endpoints()[0]["inbox_id"].as_str().unwrap().to_string();
    a.ok(&["send", "--to", &endpoint, &"y".repeat(5000)]);
    let dl = d.wait_dead_letter("the oversized answer", |d| d["kind"] == "nats");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("over channels.nats.max_payload"),
        "{dl}"
    );
}

/// SIGHUP with route changes applies them in place on the same NATS connection: an added
/// route's subject is taken in, a changed route moves to its new subject, a dropped route's
/// subject is no longer taken in; the connection and the daemon are not restarted.
#[test]
fn sighup_changes_nats_routes_in_place() {
    let s = Setup::new("nats-reload");
    let server = NatsServer::start(&s.dir);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = nats_config(
        &s,
        &embedded(&s),
        &server.url(),
        &inbox,
        "",
        "replies.{device}",
    );
    let original = std::fs::read_to_string(&config).unwrap();
    let d = start(&s, &config);
    a.init();
    let c = Client::connect(&server.url());
    c.publish("events.billing.created", br#"{"n":1}"#);
    assert_eq!(json_n(&a.listen(1)[0]), 1);

    let jobs = format!(
        "  - {{name: jobs, channel: nats, subscribe: \"jobs.{{device}}.>\", reply: \"jobs.{{device}}.done\", plugin: nats, agents: [\"{inbox}\"]}}\n"
    );
    std::fs::write(&config, format!("{original}{jobs}")).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes added: jobs"]);
    c.publish("jobs.j1.new", br#"{"n":2}"#);
    let m = &a.listen(1)[0];
    assert_eq!(json_n(m), 2);
    assert_eq!(m["sender_endpoint"]["address"], "jobs.j1.>");

    // The first route moves to another subject.
    let moved = original.replace("events.{device}.>", "ev2.{device}.>");
    std::fs::write(&config, format!("{moved}{jobs}")).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes changed: svc"]);
    c.publish("events.billing.created", br#"{"n":3}"#);
    c.publish("ev2.billing.created", br#"{"n":4}"#);
    assert_eq!(json_n(&a.listen(1)[0]), 4);

    // The added route dropped again.
    std::fs::write(&config, &moved).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes dropped: jobs"]);
    c.publish("jobs.j1.new", br#"{"n":5}"#);
    c.publish("ev2.billing.created", br#"{"n":6}"#);
    assert_eq!(json_n(&a.listen(1)[0]), 6);
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "a moved or dropped route's subject was taken in: {extra}"
    );
    let log = d.log_text();
    assert_eq!(
        log.matches("NATS connected").count(),
        1,
        "reconnected: {log}"
    );
    assert_eq!(
        log.matches("gatehouse running").count(),
        1,
        "restarted: {log}"
    );
}
