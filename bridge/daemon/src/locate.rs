//! Where a config error is: the line and column of a key path in the YAML text, and the
//! nearest valid key for a misspelt one.
//!
//! serde_yaml reports positions for what it cannot deserialize; the checks after it (QoS
//! ranges, route templates, …) name a key path (`routes[1].subscribe`). This finds that path
//! in the text with yaml-rust2's event parser (block and flow style alike), so every error can
//! say `file:line:column`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
pub type Pos = (usize, usize);

enum Frame {
    /// In a mapping: the key being read (`None` while expecting a key).
    Map { path: String, key: Option<String> },
    /// In a sequence: the next item's index.
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Collector {
    stack: Vec<Frame>,
    found: HashMap<String, Pos>,
}

fn pos(m: Marker) -> Pos {
    (m.line(), m.col() + 1)
}

impl Collector {
    /// The path of the value about to be read, and whether it is a mapping key.
    fn next_value(&mut self) -> Option<(String, bool)> {
        match self.stack.last_mut() {
            None => Some((String::new(), false)),
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some((join(path, &k), false)),
                None => Some((path.clone(), true)),
            },
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some((p, false))
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                let Some((path, is_key)) = self.next_value() else {
                    return;
                };
                if is_key {
                    let full = join(&path, &value);
                    self.found.entry(full).or_insert(pos(mark));
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some(value);
                    }
                } else {
                    self.found.entry(path).or_insert(pos(mark));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let Some((path, is_key)) = self.next_value() else {
                    return;
                };
                if is_key {
                    // A complex key: not something config.yaml uses; keep the shape only.
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some("?".into());
                    }
                }
                self.found.entry(path.clone()).or_insert(pos(mark));
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.next_value();
            }
            _ => {}
        }
    }
}

/// Every key path in `text` (`channels.mqtt.port`, `routes[0].name`) with the position of its
/// key (of the item, for sequence items). Empty if the text does not parse.
pub fn key_positions(text: &str) -> HashMap<String, Pos> {
    let mut c = Collector::default();
    let mut parser = Parser::new_from_str(text);
    let _ = parser.load(&mut c, false);
    c.found
}

/// The YAML syntax error in `text`, if any: its position and description.
pub fn syntax_error(text: &str) -> Option<(Pos, String)> {
    let mut c = Collector::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut c, false)
        .err()
        .map(|e| (pos(*e.marker()), e.info().to_string()))
}

/// The position of `path`, or of its nearest ancestor that is in the text.
pub fn find(positions: &HashMap<String, Pos>, path: &str) -> Option<Pos> {
    let mut p = path.to_string();
    loop {
        if let Some(at) = positions.get(&p) {
            return Some(*at);
        }
        let cut = p.rfind(['.', '['])?;
        p.truncate(cut);
    }
}

/// The leading key path of a validation message (`routes[0] (devices).subscribe: …` →
/// `routes[0].subscribe`), if it has one.
pub fn message_path(message: &str) -> Option<String> {
    let (head, _) = message.split_once(": ")?;
    // `routes[0] (name)` carries the route's name for the reader; the path drops it.
    let mut path = String::new();
    let mut rest = head;
    while let Some(open) = rest.find(" (") {
        path.push_str(&rest[..open]);
        let close = rest[open..].find(')')? + open;
        rest = &rest[close + 1..];
    }
    path.push_str(rest);
    let ok = !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'));
    ok.then_some(path)
}

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment), for
/// suggestions: `hots` is one edit from `host`.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The candidate nearest to `word`, if it is near enough to be a likely misspelling.
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1) || c.starts_with(word))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant"): the word,
/// and the valid ones.
pub fn unknown_word(message: &str) -> Option<(&str, Vec<&str>)> {
    let at = message
        .find("unknown field `")
        .map(|i| i + "unknown field `".len())
        .or_else(|| {
            message
                .find("unknown variant `")
                .map(|i| i + "unknown variant `".len())
        })?;
    let rest = &message[at..];
    let end = rest.find('`')?;
    let word = &rest[..end];
    let expected: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
    Some((word, expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_in_block_and_flow_style() {
        let text = "admin:\n  listen: 1.2.3.4:5\nchannels: {mqtt: {port: 1, publish_qos: 3}}\nroutes:\n  - name: a\n    subscribe: x\n  - {name: b, subscribe: y}\n";
        let p = key_positions(text);
        assert_eq!(p["admin.listen"], (2, 3));
        assert_eq!(p["channels.mqtt.publish_qos"], (3, 28));
        assert_eq!(p["routes[0].subscribe"], (6, 5));
        assert_eq!(p["routes[1].subscribe"], (7, 15));
        assert_eq!(find(&p, "routes[1].reply"), Some((7, 5)));
    }

    #[test]
    fn paths_from_messages_and_suggestions() {
        assert_eq!(
            message_path("routes[0] (devices).subscribe: \"x\" must contain").as_deref(),
            Some("routes[0].subscribe")
        );
        assert_eq!(
            message_path("channels.mqtt.publish_qos: 3 is not").as_deref(),
            Some("channels.mqtt.publish_qos")
        );
        assert_eq!(message_path("something else entirely"), None);
        assert_eq!(nearest("hots", &["host", "port"]), Some("host"));
        assert_eq!(nearest("rotes", &["routes", "node"]), Some("routes"));
        assert_eq!(nearest("zzz", &["host", "port"]), None);
        let (w, e) = unknown_word("unknown field `hots`, expected one of `host`, `port`").unwrap();
        assert_eq!((w, e), ("hots", vec!["host", "port"]));
    }
}
