//! A node's kernel program (as `api::render` writes it) read back line by line, with the comment
//! each rule carries: the Service and the field that made it (`default/nginx-svc:http nodePort`).
//! The service view shows a service's rules next to that comment, so every rule can be traced to
//! the line of YAML behind it.

use switchyard_engine::model::ObjectKey;
use switchyard_engine::policy::Backend;

/// One line of the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramLine {
    /// 1-based, as in the whole program.
    pub number: usize,
    pub text: String,
    /// The rule's comment, unquoted.
    pub comment: Option<String>,
    /// The comment without its `namespace/name:port` prefix: the field that made the rule.
    pub field: Option<String>,
    /// The comment names the service asked about.
    pub mine: bool,
}

/// The comment of an nftables (`comment "..."`) or iptables (`--comment "..."`) line.
pub fn comment_of(line: &str) -> Option<String> {
    let start = line.find("comment \"")? + "comment \"".len();
    let rest = &line[start..];
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Whether a comment is about `key`: it starts with `namespace/name` followed by `:`, a space or
/// its end (so `default/nginx` does not claim `default/nginx-svc`).
pub fn names(comment: &str, key: &ObjectKey) -> bool {
    let prefix = format!("{}/{}", key.namespace, key.name);
    comment.strip_prefix(&prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', ' ']))
}

/// The comment without its `namespace/name[:port]` prefix.
fn field_of(comment: &str) -> Option<String> {
    let (head, rest) = comment.split_once(' ')?;
    head.contains('/').then(|| rest.trim().to_string())
}

/// Splits a program into lines with their comments. IPVS programs write a `# comment` line before
/// the rules it explains; those rules inherit it up to the next blank line or comment.
pub fn lines(program: &str, backend: Backend, service: Option<&ObjectKey>) -> Vec<ProgramLine> {
    let mut out = Vec::new();
    let mut inherited: Option<String> = None;
    for (i, text) in program.lines().enumerate() {
        let trimmed = text.trim();
        let comment = match backend {
            Backend::Ipvs => {
                if let Some(c) = trimmed.strip_prefix('#') {
                    inherited = Some(c.trim().to_string());
                    None
                } else if trimmed.is_empty() {
                    inherited = None;
                    None
                } else {
                    inherited.clone()
                }
            }
            Backend::Nftables | Backend::Iptables => comment_of(text),
        };
        let mine = match (&comment, service) {
            (Some(c), Some(k)) => names(c, k),
            _ => false,
        };
        let field = comment.as_deref().and_then(field_of);
        out.push(ProgramLine { number: i + 1, text: text.to_string(), comment, field, mine });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::demo;

    #[test]
    fn comments_are_read_and_unescaped() {
        assert_eq!(
            comment_of(r#"-A X -m comment --comment "default/a:http nodePort" -j Y"#).as_deref(),
            Some("default/a:http nodePort")
        );
        assert_eq!(comment_of(r#"10.0.0.1 comment "a \"b\"" : x"#).as_deref(), Some(r#"a "b""#));
        assert_eq!(comment_of("no comment here"), None);
        let k = ObjectKey::new("default", "nginx");
        assert!(names("default/nginx:http nodePort", &k));
        assert!(!names("default/nginx-svc:http nodePort", &k));
    }

    /// Each backend's program for the demo cluster attributes nginx-svc's rules to the fields
    /// that made them, and no rule of another service.
    #[test]
    fn every_backend_traces_rules_to_service_fields() {
        let c = demo::cluster();
        let k = ObjectKey::new("default", "nginx-svc");
        for backend in [Backend::Nftables, Backend::Iptables, Backend::Ipvs] {
            let program = switchyard_engine::render(&c, "node-1", backend).expect("renders");
            let ls = lines(&program, backend, Some(&k));
            assert_eq!(ls.len(), program.lines().count());
            let mine: Vec<&ProgramLine> = ls.iter().filter(|l| l.mine).collect();
            assert!(mine.len() >= 2, "{backend:?}");
            assert!(mine.iter().all(|l| l.comment.as_deref().is_some_and(|c| c.starts_with("default/nginx-svc"))));
            let fields: Vec<&str> = mine.iter().filter_map(|l| l.field.as_deref()).collect();
            let wanted = match backend {
                Backend::Nftables => "nodePort",
                Backend::Iptables => "nodePort",
                Backend::Ipvs => "node port",
            };
            assert!(fields.iter().any(|f| f.contains(wanted)), "{backend:?}: {fields:?}");
        }
    }
}
