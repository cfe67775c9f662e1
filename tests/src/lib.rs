//! Harness for end-to-end tests: starts real processes (mosquitto, the `gatehouse` binary,
//! agents) on free loopback ports in a temporary directory, and stops them when dropped.
//!
//! A test that needs a missing tool fails and says which Debian package to install.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for any single event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A free loopback TCP port, never one this process handed out before: the tests of one file
/// run in parallel threads, and the kernel can give two of them the same port between one's
/// probe here and its server's bind (two tests would then share a broker).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The `gatehouse` binary built by `cargo test --workspace`.
pub fn gatehouse_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target.join(profile).join("gatehouse");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (it builds the binary)",
        bin.display()
    );
    bin
}

/// Builds a plugin crate for `wasm32-wasip2` (release) into `target/test-plugins` and returns
/// the component. `manifest` is relative to the repository root (a workspace or a crate);
/// `package` picks a member; `artifact` is the file name cargo writes (`name.wasm`).
pub fn build_plugin(manifest: &str, package: Option<&str>, artifact: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/test-plugins");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(root.join(manifest))
    .env("CARGO_TARGET_DIR", &target);
    if let Some(p) = package {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().expect("running cargo");
    assert!(
        out.status.success(),
        "building plugin {artifact} failed (needs `rustup target add wasm32-wasip2`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2/release").join(artifact)
}

/// The test plugin `plugins/misbehave` (loops, allocates, traps… on request).
pub fn misbehave_plugin() -> PathBuf {
    build_plugin(
        "plugins/Cargo.toml",
        Some("gatehouse-plugin-misbehave"),
        "gatehouse_plugin_misbehave.wasm",
    )
}

/// The first-party MQTT plugin as a file (the daemon also embeds it as `builtin: mqtt`).
pub fn mqtt_plugin() -> PathBuf {
    build_plugin(
        "plugins/Cargo.toml",
        Some("gatehouse-plugin-mqtt"),
        "gatehouse_plugin_mqtt.wasm",
    )
}

/// Requires a tool on PATH, naming the package that provides it.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: install the Debian package `{package}` (.ci/run does)"
    );
}

/// Polls `f` until it returns `Some`, failing with `what` after `EVENT_TIMEOUT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mosquitto broker on a free port.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    conf: PathBuf,
    proc: Proc,
}

impl Mosquitto {
    /// Starts one in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None, false)
    }

    /// Starts one on a given port.
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, Some(port), false)
    }

    /// Starts one that saves its sessions and queued messages in `dir` when it stops (as a
    /// production broker does), so [`Mosquitto::restart`] keeps them.
    pub fn start_persistent(dir: &Path) -> Self {
        Self::start_with(dir, None, true)
    }

    /// A mosquitto password file in `dir` with these `(user, password)` accounts.
    fn password_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
        require("mosquitto_passwd", "mosquitto");
        let file = dir.join("mosquitto-passwords");
        for (i, (user, password)) in users.iter().enumerate() {
            let mut cmd = Command::new("mosquitto_passwd");
            cmd.arg("-b");
            if i == 0 {
                cmd.arg("-c");
            }
            let out = cmd
                .arg(&file)
                .args([user, password])
                .output()
                .expect("running mosquitto_passwd");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        file
    }

    /// Its log (`-v`: connections, subscriptions, acknowledgements with their reason codes).
    pub fn log(&self) -> PathBuf {
        self.conf.with_extension("log")
    }

    /// Starts one that admits only these `(user, password)` accounts.
    pub fn start_with_password(dir: &Path, users: &[(&str, &str)]) -> Self {
        let file = Self::password_file(dir, users);
        Self::start_with_extra(
            dir,
            None,
            false,
            &format!("allow_anonymous false\npassword_file {}\n", file.display()),
        )
    }

    /// The same with a TLS listener (certificate `cert`/`key`, PEM files).
    pub fn start_tls_with_password(
        dir: &Path,
        cert: &Path,
        key: &Path,
        users: &[(&str, &str)],
    ) -> Self {
        let file = Self::password_file(dir, users);
        Self::start_with_extra(
            dir,
            None,
            false,
            &format!(
                "certfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
                cert.display(),
                key.display(),
                file.display()
            ),
        )
    }

    fn start_with(dir: &Path, port: Option<u16>, persistent: bool) -> Self {
        Self::start_with_extra(dir, port, persistent, "allow_anonymous true\n")
    }

    /// Writes its configuration and starts it on `port`, or on a free port: one that someone
    /// else took before mosquitto bound it is replaced by another (5 tries).
    fn start_with_extra(dir: &Path, port: Option<u16>, persistent: bool, access: &str) -> Self {
        let given = port;
        let mut port = port.unwrap_or_else(free_port);
        for _ in 0..5 {
            let conf = Self::configure(dir, port, persistent, access);
            match Self::spawn(&conf) {
                Ok(proc) => return Mosquitto { port, conf, proc },
                Err(log) if given.is_none() && log.contains("Address already in use") => {
                    port = free_port()
                }
                Err(log) => panic!("mosquitto did not start: {log}"),
            }
        }
        panic!("mosquitto could not bind any of 5 free ports");
    }

    /// Writes its configuration file for `port`.
    fn configure(dir: &Path, port: u16, persistent: bool, access: &str) -> PathBuf {
        require("mosquitto", "mosquitto");
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                dir.display()
            )
        } else {
            "persistence false\n".to_string()
        };
        // Started as root, mosquitto switches to the `mosquitto` user, which cannot write its
        // persistence file into this test's directory (it would then lose every session at a
        // restart); it stays the user that owns the directory.
        use std::os::unix::fs::MetadataExt as _;
        let persistence = if std::fs::metadata(dir).unwrap().uid() == 0 {
            format!("{persistence}user root\n")
        } else {
            persistence
        };
        std::fs::write(
            &conf,
            // The default queue of 1,000 messages per offline session drops the rest of a
            // backlog (the daemon's session is persistent; production brokers bridging bursts
            // raise it too, see README "MQTT").
            format!("listener {port} 127.0.0.1\n{access}max_queued_messages 0\n{persistence}"),
        )
        .unwrap();
        conf
    }

    /// Starts mosquitto on `conf` and waits until it says it runs (its own log line, not a TCP
    /// connect, which could reach whoever else holds the port); `Err` with what it logged when
    /// it exited instead.
    fn spawn(conf: &Path) -> Result<Proc, String> {
        // Its log (connections, subscriptions, errors) beside its config, for a failed test.
        let path = conf.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let from = log.metadata().unwrap().len() as usize;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut proc = Proc(child);
        wait_for("mosquitto to listen", || {
            let text = std::fs::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if text.contains(" running") {
                Some(Ok(()))
            } else if proc.0.try_wait().unwrap().is_some() {
                Some(Err(text.into_owned()))
            } else {
                None
            }
        })?;
        Ok(proc)
    }

    /// Stops the broker with SIGTERM (it saves its state if persistent), waits for it to exit,
    /// and starts it again on the same port and configuration.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops the broker with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        let pid = self.proc.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_for("mosquitto to exit", || self.proc.0.try_wait().unwrap());
    }

    /// Starts a stopped broker again on the same port and configuration.
    pub fn start_again(&mut self) {
        self.proc = Self::spawn(&self.conf)
            .unwrap_or_else(|log| panic!("mosquitto did not start again: {log}"));
    }

    /// Publishes a retained message (QoS 1) through `mosquitto_pub -r`.
    pub fn publish_retained(&self, topic: &str, payload: &[u8]) {
        require("mosquitto_pub", "mosquitto-clients");
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-r",
                "-t",
                topic,
                "-m",
            ])
            .arg(String::from_utf8_lossy(payload).as_ref())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publishes with QoS 1 through `mosquitto_pub`.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        require("mosquitto_pub", "mosquitto-clients");
        let file =
            std::env::temp_dir().join(format!("gh-pub-{}-{}", std::process::id(), rand_suffix()));
        std::fs::write(&file, payload).unwrap();
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-f",
            ])
            .arg(&file)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publishes each line as its own QoS 1 message over one connection (`mosquitto_pub -l`).
    pub fn publish_lines(&self, topic: &str, lines: &[String]) {
        self.publish_lines_qos(topic, lines, 1);
    }

    /// The same with a given QoS.
    pub fn publish_lines_qos(&self, topic: &str, lines: &[String], qos: u8) {
        require("mosquitto_pub", "mosquitto-clients");
        use std::io::Write;
        let mut child = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                &qos.to_string(),
                "-t",
                topic,
                "-l",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
        drop(stdin);
        assert!(child.wait().unwrap().success(), "mosquitto_pub -l failed");
    }

    /// Subscribes with `mosquitto_sub` (QoS 1) and returns once the broker has acknowledged
    /// the subscription; the process collects messages until it is finished with `collect`.
    pub fn subscribe(&self, topic: &str) -> Subscriber {
        self.subscribe_qos(topic, 1)
    }

    /// [`Mosquitto::subscribe`] with the given QoS (2: the broker delivers each message once).
    pub fn subscribe_qos(&self, topic: &str, qos: u8) -> Subscriber {
        self.subscribe_with(topic, qos, &[])
    }

    /// A QoS 1 subscriber with a persistent session under `client_id`: the broker keeps what is
    /// published for it while it is away (and, when persistent, across its own restart), and
    /// `mosquitto_sub` reconnects by itself.
    pub fn subscribe_session(&self, topic: &str, client_id: &str) -> Subscriber {
        self.subscribe_with(topic, 1, &["-c", "-i", client_id])
    }

    fn subscribe_with(&self, topic: &str, qos: u8, extra: &[&str]) -> Subscriber {
        require("mosquitto_sub", "mosquitto-clients");
        // stdbuf makes mosquitto_sub flush each line into the pipe as it happens.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                &qos.to_string(),
                "-d",
                "-t",
                topic,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let sub = Subscriber {
            _proc: Proc(child),
            lines: rx,
        };
        sub.next_matching(|l| l.contains("SUBACK"));
        sub
    }
}

/// A running `mosquitto_sub -d`.
pub struct Subscriber {
    _proc: Proc,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Subscriber {
    fn next_matching(&self, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .expect("timed out waiting for mosquitto_sub output");
            if f(&line) {
                return line;
            }
        }
    }

    /// The next message payload (debug lines are skipped).
    pub fn next_message(&self) -> String {
        self.next_matching(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
    }

    /// The next message payload, or `None` after [`EVENT_TIMEOUT`] without one.
    pub fn try_next_message(&self) -> Option<String> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if !line.starts_with("Client ") && !line.starts_with("Subscribed") {
                return Some(line);
            }
        }
    }

    /// Messages that arrive within `window` (used only to show that nothing else arrived).
    pub fn drain(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if !l.starts_with("Client ") && !l.starts_with("Subscribed") {
                out.push(l);
            }
        }
        out
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// The value of a Prometheus sample `name{labels…}` in `text` (labels in any order; 0 when
/// the series has not appeared yet).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let have: Vec<&str> = rest.split(',').filter(|s| !s.is_empty()).collect();
            let all = labels
                .iter()
                .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()));
            (all && have.len() == labels.len()).then(|| value.parse().ok())?
        })
        .next()
        .unwrap_or(0.0)
}

/// A `gatehouse run` daemon.
pub struct Daemon {
    proc: Option<Proc>,
    /// Its config file.
    pub config: PathBuf,
    /// Its stderr log.
    pub log: PathBuf,
    /// Embedded node URL.
    pub node_url: String,
    /// Admin address.
    pub admin: String,
}

/// Ports and paths of one bridge set-up.
pub struct Setup {
    /// Working directory.
    pub dir: PathBuf,
    /// Broker.
    pub broker: Mosquitto,
    /// Node port.
    pub node_port: u16,
    /// Admin port.
    pub admin_port: u16,
}

impl Setup {
    /// A temporary directory with a broker.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-e2e-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let broker = Mosquitto::start(&dir);
        Setup {
            dir,
            broker,
            node_port: free_port(),
            admin_port: free_port(),
        }
    }

    /// The node URL.
    pub fn node_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.node_port)
    }

    /// Writes a config for one MQTT route whose agents are `agents`.
    pub fn write_config(&self, agents: &[&str]) -> PathBuf {
        self.write_config_for(self.broker.port, agents)
    }

    /// The same, for a broker on `mqtt_port`.
    pub fn write_config_for(&self, mqtt_port: u16, agents: &[&str]) -> PathBuf {
        let node = format!("{{listen: 127.0.0.1:{}}}", self.node_port);
        self.write_route_config(&node, mqtt_port, agents)
    }

    /// Writes a config for one MQTT route (`devices/{device}/up` → `devices/{device}/down`)
    /// that uses an external node at `node_url` (so agents can write while the daemon is down).
    pub fn write_config_external(&self, node_url: &str, agents: &[&str]) -> PathBuf {
        let node = format!("{{embedded: false, url: \"{node_url}\"}}");
        self.write_route_config(&node, self.broker.port, agents)
    }

    /// `config.yaml` with the given `node:` section and the one `devices` route.
    fn write_route_config(&self, node: &str, mqtt_port: u16, agents: &[&str]) -> PathBuf {
        let agents = agents
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "data_dir: data\nnode: {node}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
             channels: {{mqtt: {{port: {mqtt_port}, client_id: gatehouse-e2e}}}}\nplugins: {{mqtt: {{builtin: mqtt}}}}\n\
             routes:\n  - {{name: devices, channel: mqtt, subscribe: \"devices/{{device}}/up\", reply: \"devices/{{device}}/down\", plugin: mqtt, agents: [{agents}], max_payload: 65536}}\n",
            self.admin_port
        );
        let path = self.dir.join("config.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Devices `dev0..devN` each publish `{"hello":N}`; returns each one's endpoint inbox as
    /// the agent sees it (so the agent can write to them).
    pub fn hello_endpoints(
        &self,
        a: &Agent,
        devices: u64,
    ) -> std::collections::BTreeMap<u64, String> {
        for dev in 0..devices {
            self.broker.publish(
                &format!("devices/dev{dev}/up"),
                format!("{{\"hello\":{dev}}}").as_bytes(),
            );
        }
        let mut endpoint = std::collections::BTreeMap::new();
        for m in a.listen(devices as usize) {
            let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
            endpoint.insert(
                v["hello"].as_u64().unwrap(),
                m["sender_inbox"].as_str().unwrap().to_string(),
            );
        }
        assert_eq!(endpoint.len() as u64, devices, "every device said hello");
        endpoint
    }

    /// Starts the daemon and waits until MQTT is connected.
    pub fn start_daemon(&self, config: &Path) -> Daemon {
        let d = self.spawn_daemon(config);
        wait_for("the daemon's MQTT connection", || {
            d.log_text().contains("MQTT connected").then_some(())
        });
        d
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn_daemon(&self, config: &Path) -> Daemon {
        self.spawn_daemon_env(config, &[])
    }

    /// The same, with extra environment variables (fault injection).
    pub fn spawn_daemon_env(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = self.dir.join(format!("daemon-{}.log", rand_suffix()));
        let child = Command::new(gatehouse_bin())
            .args(["run", "--config"])
            .arg(config)
            // GATEHOUSE_E2E_LOG sets the daemons' log filter when debugging a test; a test's
            // own environment (`env`) can override it or remove it (an empty value).
            .env(
                "GATEHOUSE_LOG",
                std::env::var("GATEHOUSE_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            proc: Some(Proc(child)),
            config: config.to_path_buf(),
            log,
            node_url: self.node_url(),
            admin: format!("127.0.0.1:{}", self.admin_port),
        }
    }

    /// Starts the daemon with its `data_dir` (`DIR/data`) on a tmpfs of `size_mb` MiB of its
    /// own (a user and mount namespace, so no root is needed; the tmpfs and its state go
    /// away with the daemon). Creating `DIR/fill` fills the tmpfs up to `leave_mb` MiB of free
    /// space (`DIR/filled` appears once done); removing it frees the space again.
    pub fn spawn_daemon_on_tmpfs(&self, config: &Path, size_mb: u64, leave_mb: u64) -> Daemon {
        require("unshare", "util-linux");
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = self.dir.join(format!("daemon-{}.log", rand_suffix()));
        // PID 1 of a new PID namespace: when the test kills it, the kernel kills the daemon too.
        let script = format!(
            r#"set -e
mount -t tmpfs -o size={size_mb}m gatehouse-test "$DATA"
"$BIN" run --config "$CONFIG" 2>"$LOG" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  if [ -e "$DIR/fill" ] && [ ! -e "$DATA/filler" ]; then
    avail=$(df --output=avail -B1 "$DATA" | tail -1)
    size=$((avail - {leave_mb} * 1048576))
    if [ "$size" -gt 0 ]; then head -c "$size" /dev/zero > "$DATA/filler"; else : > "$DATA/filler"; fi
    touch "$DIR/filled"
  elif [ ! -e "$DIR/fill" ] && [ -e "$DATA/filler" ]; then
    rm -f "$DATA/filler" "$DIR/filled"
  fi
  sleep 0.05
done
wait "$pid""#
        );
        let child = Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .env("DATA", &data)
            .env("DIR", &self.dir)
            .env("BIN", gatehouse_bin())
            .env("CONFIG", config)
            .env("LOG", &log)
            .env(
                "GATEHOUSE_LOG",
                std::env::var("GATEHOUSE_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = child;
        wait_for("the daemon on its tmpfs to connect to MQTT", || {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!(
                    "the tmpfs wrapper exited ({status}): {err}\n(it needs `unshare` from util-linux \
                     and unprivileged user namespaces, or root); daemon log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("MQTT connected")
                .then_some(())
        });
        Daemon {
            proc: Some(Proc(child)),
            config: config.to_path_buf(),
            log,
            node_url: self.node_url(),
            admin: format!("127.0.0.1:{}", self.admin_port),
        }
    }

    /// An agent home in this set-up.
    pub fn agent(&self, name: &str) -> Agent {
        Agent {
            home: self.dir.join(name),
            node: self.node_url(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Daemon {
    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing all of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        wait_for(&format!("daemon log line with {needles:?}"), || {
            self.log_text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        })
    }

    /// Runs an admin command (`gatehouse ARGS --admin ADDR`) and parses its JSON output.
    fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(gatehouse_bin())
            .args(args)
            .args(["--admin", &self.admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gatehouse {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `gatehouse endpoints --json`.
    pub fn endpoints(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.admin_json(&["endpoints", "--json"])).unwrap()
    }

    /// `gatehouse plugins`.
    pub fn plugins(&self) -> serde_json::Value {
        self.admin_json(&["plugins", "--json"])
    }

    /// One plugin's entry in `gatehouse plugins --json`.
    pub fn plugin(&self, name: &str) -> serde_json::Value {
        self.plugins()
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no plugin {name} in `gatehouse plugins`"))
    }

    /// `gatehouse dlq --json`.
    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        serde_json::from_value(self.admin_json(&["dlq", "--json"])).unwrap()
    }

    /// `gatehouse dlq ARGS --json` (retry, drop): its output, succeeded or not.
    pub fn dlq(&self, args: &[&str]) -> Output {
        Command::new(gatehouse_bin())
            .arg("dlq")
            .args(args)
            .args(["--json", "--admin", &self.admin])
            .output()
            .unwrap()
    }

    /// Waits for a dead letter that `f` accepts and returns it.
    pub fn wait_dead_letter(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(&format!("a dead letter: {what}"), || {
            self.dead_letters().into_iter().find(|d| f(d))
        })
    }

    /// `gatehouse plugins reload NAME`: its output, succeeded or not.
    pub fn reload(&self, name: &str) -> Output {
        Command::new(gatehouse_bin())
            .args(["plugins", "reload", name, "--json", "--admin", &self.admin])
            .output()
            .unwrap()
    }

    /// `gatehouse routes --json`.
    pub fn routes(&self) -> Vec<serde_json::Value> {
        self.admin_json(&["routes", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `gatehouse status`.
    pub fn status(&self) -> serde_json::Value {
        self.admin_json(&["status", "--json"])
    }

    /// `gatehouse requests --json --endpoint DEVICE`: the held messages of that endpoint.
    pub fn requests(&self, device: &str) -> Vec<serde_json::Value> {
        let v = self.admin_json(&["requests", "--json", "--endpoint", device]);
        v[0]["requests"].as_array().cloned().unwrap_or_default()
    }

    /// `GET path` on the admin API: the HTTP status code and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(&self.admin).expect("admin API reachable");
        write!(
            sock,
            "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        sock.read_to_string(&mut resp).unwrap();
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// `gatehouse consent allow|deny --endpoint DEVICE TARGET`.
    pub fn consent(&self, decision: &str, device: &str, target: &str) -> serde_json::Value {
        self.admin_json(&["consent", decision, "--endpoint", device, target])
    }

    /// Waits for the daemon to exit on its own (a crash); returns whether it failed.
    pub fn wait_exit(&mut self) -> bool {
        let mut p = self.proc.take().expect("daemon running");
        let status = wait_for("the daemon to exit", || p.0.try_wait().unwrap());
        !status.success()
    }

    /// Kills the daemon with SIGKILL (no chance to flush or say goodbye) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    /// Sends a signal (`HUP`, `USR1`, …) to the running daemon.
    pub fn signal(&self, name: &str) {
        let p = self.proc.as_ref().expect("the daemon is running");
        let st = Command::new("kill")
            .args([&format!("-{name}"), &p.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{name} failed");
    }

    /// Sends SIGTERM and waits for the exit: its status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut p = self.proc.take().expect("the daemon is running");
        let pid = p.0.id().to_string();
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = started + EVENT_TIMEOUT;
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = p.0.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + EVENT_TIMEOUT;
            loop {
                if p.0.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A `gatehouse agent` home.
pub struct Agent {
    /// Its home directory.
    pub home: PathBuf,
    node: String,
}

impl Agent {
    /// An agent home against any node URL.
    pub fn at(home: PathBuf, node: String) -> Self {
        Agent { home, node }
    }

    /// Runs `gatehouse agent … args` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(gatehouse_bin())
            .args(["agent", "--home"])
            .arg(&self.home)
            .args(["--node", &self.node])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gatehouse agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The inbox id (works before the node is up).
    pub fn inbox_id(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["id", "--json"])).unwrap();
        v["inbox_id"].as_str().unwrap().to_string()
    }

    /// Registers on the node.
    pub fn init(&self) -> String {
        self.ok(&["init"]).trim().to_string()
    }

    /// Sends text to an inbox; returns the conversation id.
    pub fn send(&self, to: &str, text: &str) -> String {
        self.ok(&["send", "--to", to, text]).trim().to_string()
    }

    /// `send --lines --to INBOX`: each line a message, in order.
    pub fn send_lines(&self, to: &str, lines: &str) {
        use std::io::Write as _;
        let mut child = Command::new(gatehouse_bin())
            .args(["agent", "--home"])
            .arg(&self.home)
            .args(["--node", &self.node, "send", "--lines", "--to", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "agent send --lines failed");
    }

    /// Waits for `count` messages; returns them as JSON.
    pub fn listen(&self, count: usize) -> Vec<serde_json::Value> {
        self.listen_within(count, EVENT_TIMEOUT)
    }

    /// Waits up to `timeout` for `count` messages; returns them as JSON.
    pub fn listen_within(&self, count: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let out = self.ok(&[
            "listen",
            "--json",
            "--count",
            &count.to_string(),
            "--timeout",
            &timeout.as_secs().to_string(),
        ]);
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A standalone `gatehouse node`.
pub struct StandaloneNode {
    /// Its URL.
    pub url: String,
    _proc: Proc,
}

impl StandaloneNode {
    /// Starts one with its data in `dir` and waits until it listens. A port picked here can be
    /// taken by someone else before the node binds it; then another port is tried.
    pub fn start(dir: &Path) -> Self {
        for _ in 0..5 {
            if let Some(node) = Self::try_start(dir, free_port()) {
                return node;
            }
        }
        panic!("the node could not bind any of 5 free ports");
    }

    /// The same on a given port (a restart keeps the port and the data).
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::try_start(dir, port)
            .unwrap_or_else(|| panic!("the node could not listen on 127.0.0.1:{port}"))
    }

    /// Starts one; `None` when it exited (the port was taken).
    fn try_start(dir: &Path, port: u16) -> Option<Self> {
        let log = dir.join(format!("node-{port}-{}.log", rand_suffix()));
        let mut child = Command::new(gatehouse_bin())
            .args(["node", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(dir.join("node-data"))
            .env("GATEHOUSE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Its own log line, not a TCP connect: a connect can reach whoever else holds the port.
        let up = wait_for("the node to listen", || {
            if child.try_wait().unwrap().is_some() {
                return Some(false);
            }
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("XMTP node listening")
                .then_some(true)
        });
        up.then(|| StandaloneNode {
            url: format!("http://127.0.0.1:{port}"),
            _proc: Proc(child),
        })
    }
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// Crash loop: publishes `per_device` numbered QoS 1 messages from each of `devices` devices
/// through a real mosquitto while the daemon (with its embedded node) is SIGKILLed `kills`
/// times at pseudo-random moments and restarted; then checks that the agent received every
/// message exactly once, in per-device order.
pub fn crash_loop(name: &str, devices: u64, per_device: u64, kills: usize, listen: Duration) {
    let s = Setup::new(name);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut d = s.start_daemon(&config);
    a.init();

    std::thread::scope(|scope| {
        for dev in 0..devices {
            let broker = &s.broker;
            scope.spawn(move || {
                let lines: Vec<String> = (0..per_device)
                    .map(|n| format!("{{\"d\":{dev},\"n\":{n}}}"))
                    .collect();
                broker.publish_lines(&format!("devices/dev{dev}/up"), &lines);
            });
        }
        // The fault schedule: kill at pseudo-random moments (fixed seed, so a failure can be
        // replayed), 100 ms to 1.5 s after each start.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..kills {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_millis(100 + seed % 1400));
            d.kill9();
            d = s.start_daemon(&config);
        }
    });

    let total = (devices * per_device) as usize;
    let got = a.listen_within(total, listen);
    let mut per_device_seen: std::collections::BTreeMap<u64, Vec<u64>> =
        std::collections::BTreeMap::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
        per_device_seen
            .entry(v["d"].as_u64().unwrap())
            .or_default()
            .push(v["n"].as_u64().unwrap());
    }
    assert_eq!(
        got.len(),
        total,
        "received {} of {total} messages",
        got.len()
    );
    assert_eq!(per_device_seen.len() as u64, devices);
    for (dev, seqs) in &per_device_seen {
        assert_eq!(
            seqs,
            &(0..per_device).collect::<Vec<_>>(),
            "device {dev}: every message once, in order"
        );
    }
    let extra = a.ok(&["listen", "--json", "--timeout", "3"]);
    assert!(extra.trim().is_empty(), "duplicates after the run: {extra}");
}

/// The reverse crash loop, exactly once: with `publish_qos: 2` and the devices subscribed with
/// QoS 2, the agent sends `per_device` numbered messages to each of `devices` endpoints while
/// the daemon is SIGKILLed `kills` times at random moments and restarted. Every message reaches
/// its device once, in order (the QoS 2 journal resends an interrupted publish under its packet
/// id, or only releases it once the broker had it), and nothing follows them. `protocol` is the
/// daemon's MQTT version (`"3.1.1"` or `"5"`).
pub fn reverse_crash_loop(name: &str, devices: u64, per_device: u64, kills: usize, protocol: &str) {
    let s = Setup::new(name);
    // The node runs on its own, so the agent keeps sending while the daemon is down.
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let qos2 = text.replace(
        "client_id: gatehouse-e2e",
        &format!("client_id: gatehouse-e2e, publish_qos: 2, protocol: \"{protocol}\""),
    );
    assert_ne!(text, qos2, "the harness config changed shape");
    std::fs::write(&config, qos2).unwrap();
    let mut d = s.start_daemon(&config);
    a.init();
    let endpoint = s.hello_endpoints(&a, devices);
    let down = s.broker.subscribe_qos("devices/+/down", 2);
    let sent = std::sync::atomic::AtomicBool::new(false);

    std::thread::scope(|scope| {
        let (a, endpoint, sent) = (&a, &endpoint, &sent);
        scope.spawn(move || {
            for dev in 0..devices {
                let lines: String = (0..per_device)
                    .map(|k| format!("{{\"to\":{dev},\"k\":{k}}}\n"))
                    .collect();
                a.send_lines(&endpoint[&dev], &lines);
            }
            sent.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..kills {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_millis(300 + seed % 1500));
            d.kill9();
            d = s.start_daemon(&config);
        }
    });
    assert!(sent.load(std::sync::atomic::Ordering::SeqCst));

    let mut got: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for n in 0..devices * per_device {
        let Some(line) = down.try_next_message() else {
            let missing: Vec<(u64, u64)> = (0..devices)
                .flat_map(|dev| (0..per_device).map(move |k| (dev, k)))
                .filter(|(dev, k)| !got.get(dev).is_some_and(|v| v.contains(k)))
                .collect();
            panic!(
                "{n} of {} messages arrived; missing (device, k): {missing:?}",
                devices * per_device
            );
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        got.entry(v["to"].as_u64().unwrap())
            .or_default()
            .push(v["k"].as_u64().unwrap());
    }
    for dev in 0..devices {
        assert_eq!(
            got[&dev],
            (0..per_device).collect::<Vec<_>>(),
            "device {dev}: every message once, in order"
        );
    }
    // Nothing more is on its way: a marker published now is the next thing the devices see.
    s.broker
        .publish("devices/marker/down", b"{\"marker\":true}");
    assert_eq!(
        down.next_message(),
        "{\"marker\":true}",
        "a message arrived twice"
    );
    let resumed = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|log| log.contains("resuming QoS 2 publishes a restart interrupted"))
        .count();
    eprintln!(
        "{name}: {} messages once each, in order, across {kills} SIGKILLs; {resumed} restarts \
         resumed journalled QoS 2 publishes",
        devices * per_device
    );
}

/// A Python interpreter that has `aiosmtpd` (the Debian package installs it for
/// `/usr/bin/python3`, which may not be the first `python3` on PATH).
fn python_with_aiosmtpd() -> PathBuf {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return PathBuf::from(py);
        }
    }
    panic!(
        "python3 with aiosmtpd is not installed: install the Debian package `python3-aiosmtpd` (.ci/run does)"
    );
}

/// A real SMTP server (`python3 -m aiosmtpd`) that stores what it receives in a Maildir.
pub struct SmtpSink {
    _proc: Proc,
    /// Its port.
    pub port: u16,
    /// The Maildir it writes (`new/` holds one file per message).
    pub maildir: PathBuf,
}

impl SmtpSink {
    /// Starts the sink on a free port under `dir`.
    pub fn start(dir: &Path) -> Self {
        let py = python_with_aiosmtpd();
        let port = free_port();
        let maildir = dir.join(format!("sink-{port}"));
        let log = std::fs::File::create(dir.join(format!("sink-{port}.log"))).unwrap();
        let child = Command::new(py)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting python3 -m aiosmtpd");
        let proc = Proc(child);
        wait_for("the SMTP sink to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        SmtpSink {
            _proc: proc,
            port,
            maildir,
        }
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(self.maildir.join("new"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect()
    }

    /// Waits until `n` messages arrived; returns them.
    pub fn wait_messages(&self, n: usize) -> Vec<String> {
        wait_for(&format!("{n} mails at the SMTP sink"), || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
    }
}

/// One header's value in a raw mail (the first occurrence, unfolded).
pub fn mail_header(raw: &str, name: &str) -> Option<String> {
    let mut lines = raw.lines().peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case(name)
        {
            let mut value = v.trim().to_string();
            while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
                value.push(' ');
                value.push_str(next.trim());
                lines.next();
            }
            return Some(value);
        }
    }
    None
}

/// Runs `swaks` against `127.0.0.1:port` with `args`; returns (exit code, transcript).
pub fn swaks(port: u16, args: &[&str]) -> (i32, String) {
    require("swaks", "swaks");
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--timeout", "60"])
        .args(args)
        .output()
        .expect("running swaks");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A `nats-server -js` on a free port, its JetStream file store under the test directory.
pub struct NatsServer {
    proc: Option<Proc>,
    /// Its port.
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
}

impl NatsServer {
    /// Starts one and waits until it accepts connections.
    pub fn start(dir: &Path) -> Self {
        require("nats-server", "nats-server");
        let port = free_port();
        let mut n = NatsServer {
            proc: None,
            port,
            store: dir.join(format!("nats-{port}")),
            log: dir.join(format!("nats-{port}.log")),
        };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.proc = Some(Proc(child));
        let log = self.log.clone();
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("Server is ready")
            .count();
        wait_for("nats-server to be ready", || {
            (std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("Server is ready")
                .count()
                > before)
                .then_some(())
        });
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops it (SIGKILL): clients see the connection drop and cannot reconnect.
    pub fn stop(&mut self) {
        self.proc.take();
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) {
        self.launch();
    }
}
