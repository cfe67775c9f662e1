//! Where a node placed published group messages, and streams that leave none out: answer
//! headers of Gatehouse's node.
//!
//! XMTP's `SendGroupMessages` answers with nothing, so a sender learns the ids its messages got
//! only by querying (it needs them to move its read cursor past its own messages, which it
//! cannot decrypt). Gatehouse's node adds a response header, [`HEADER`], that names for each
//! published message, in request order, the id of the message before it in its group and its
//! own id (`before:id`, comma-separated). Other XMTP clients ignore it; a client talking to a
//! node without it queries as before.

/// The gRPC response header (ASCII metadata) of `SendGroupMessages`.
pub const HEADER: &str = "gatehouse-placed";

/// The longest value the node sends in [`HEADER`]; a publish of more messages than fit
/// (≈ 200) gets no header, and its sender queries instead. HTTP/2 peers bound the size of an
/// answer's headers (16 KiB is common), and an answer they refuse would look like a failed
/// publish to a client that never asked for the header.
pub const MAX_HEADER_LEN: usize = 4096;

/// The response header of `SubscribeGroupMessages` with which Gatehouse's node says, with the
/// value [`GAP_FREE`], that the stream carries every message after each filter's (non-zero)
/// cursor, in id order, none left out — so a client that has read up to where the stream had
/// got can take what it streams next as the messages that follow, without asking. (XMTP's
/// streams promise no such thing; without the header a client reads after each news.)
pub const STREAM_HEADER: &str = "gatehouse-stream";

/// The value of [`STREAM_HEADER`].
pub const GAP_FREE: &str = "gap-free";

/// The header's value for `placed` (per message: the id before it in its group, its id).
pub fn encode(placed: &[(u64, u64)]) -> String {
    placed
        .iter()
        .map(|(before, id)| format!("{before}:{id}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The pairs in a header's value; `None` when it is not one.
pub fn decode(value: &str) -> Option<Vec<(u64, u64)>> {
    if value.is_empty() {
        return Some(Vec::new());
    }
    value
        .split(',')
        .map(|pair| {
            let (before, id) = pair.split_once(':')?;
            let (before, id) = (before.parse().ok()?, id.parse().ok()?);
            (before < id).then_some((before, id))
        })
        .collect()
}

/// For messages published together into one group, with the reader's cursor at `cursor`
/// before: the id the cursor can move to when they are all that followed it (each placed
/// right after the one before, the first right after the cursor), `None` otherwise.
pub fn cursor_after(cursor: u64, placed: &[(u64, u64)]) -> Option<u64> {
    let mut at = cursor;
    for (before, id) in placed {
        if *before != at {
            return None;
        }
        at = *id;
    }
    (at != cursor).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_a_value() {
        let placed = vec![(0, 7), (7, 9), (9, 12)];
        assert_eq!(encode(&placed), "0:7,7:9,9:12");
        assert_eq!(decode(&encode(&placed)), Some(placed));
        assert_eq!(decode(""), Some(Vec::new()));
        for bad in ["7", "a:b", "3:4,", "5:5", "9:3", "1:2;3:4", "-1:2"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_cursor_moves_only_over_an_unbroken_run() {
        assert_eq!(cursor_after(7, &[(7, 9), (9, 12)]), Some(12));
        assert_eq!(cursor_after(0, &[(0, 1)]), Some(1));
        // Someone else's message (8) between the cursor and ours.
        assert_eq!(cursor_after(7, &[(8, 9)]), None);
        // Someone else's message between two of ours.
        assert_eq!(cursor_after(7, &[(7, 9), (10, 12)]), None);
        assert_eq!(cursor_after(7, &[]), None);
    }
}
