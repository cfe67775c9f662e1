//! Guest-side helpers for Gatehouse plugin authors. The bindings themselves come from
//! `wit-bindgen` in each plugin (`wit_bindgen::generate!({ path: "../../wit", world: "mapper" })`);
//! these helpers are plain functions over the WIT types' shapes.

#![forbid(unsafe_code)]

/// Looks a key up in a WIT metadata list.
pub fn meta<'a>(metadata: &'a [(String, String)], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Fills `{name}` placeholders of a template from a lookup.
pub fn fill(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template}"))?
            + start;
        let name = &rest[start + 1..end];
        out.push_str(
            &lookup(name).ok_or_else(|| format!("no value for {{{name}}} in {template}"))?,
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_template() {
        let r = super::fill("devices/{device}/down", |k| {
            (k == "device").then(|| "t1".to_string())
        });
        assert_eq!(r.unwrap(), "devices/t1/down");
        assert!(super::fill("x/{nope}", |_| None).is_err());
    }
}
