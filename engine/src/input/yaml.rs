//! YAML documents to JSON values, built straight from the parser's events.
//!
//! Manifests only need YAML's data model as JSON sees it, so the reader turns events into
//! `serde_json::Value`s itself rather than going through a serde layer: the same values, a fraction
//! of the code (the dashboard carries this reader into the browser). Scalars resolve by the YAML 1.2
//! core schema, so `on`, `no` and `y` stay strings, as Kubernetes reads them. Hostile input is
//! bounded: nesting depth, and the nodes that aliases may copy in all.

use std::collections::HashMap;

use granit_parser::{Event, Parser, ScalarStyle, Span, Tag};
use serde_json::{Map, Number, Value};

/// Why a YAML text could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} column {column}: {message}")]
pub struct YamlError {
    /// 1-based.
    pub line: usize,
    /// 1-based.
    pub column: usize,
    /// 1-based document the error is in.
    pub document: usize,
    pub message: String,
}

/// How much a text may ask of the reader.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Collections inside collections.
    pub max_depth: usize,
    /// Nodes that aliases may copy in all, across the whole text: what an alias bomb multiplies.
    pub max_alias_nodes: usize,
}

/// Every document of `text`; an empty document is `Value::Null`.
pub fn documents(text: &str, limits: Limits) -> Result<Vec<Value>, YamlError> {
    Reader { limits, document: 0, anchors: HashMap::new(), alias_nodes: 0, stack: Vec::new(), docs: Vec::new() }
        .read(text)
}

/// A collection being built.
enum Frame {
    Seq { items: Vec<Value>, anchor: usize },
    Map { map: Map<String, Value>, anchor: usize, key: Option<(String, Span)>, merges: Vec<Value> },
}

struct Reader {
    limits: Limits,
    document: usize,
    /// Anchored values and their node counts, by the parser's anchor id.
    anchors: HashMap<usize, (Value, usize)>,
    alias_nodes: usize,
    stack: Vec<Frame>,
    docs: Vec<Value>,
}

impl Reader {
    fn read(mut self, text: &str) -> Result<Vec<Value>, YamlError> {
        for event in Parser::new_from_str(text) {
            let (event, span) = event.map_err(|e| YamlError {
                line: e.marker().line(),
                column: e.marker().col() + 1,
                document: self.document.max(1),
                message: e.info(),
            })?;
            match event {
                Event::DocumentStart(..) => {
                    self.document += 1;
                    self.anchors.clear();
                }
                // `---` with nothing after it is a null document.
                Event::DocumentEnd if self.docs.len() < self.document => self.docs.push(Value::Null),
                Event::Scalar(text, style, anchor, tag) => {
                    let v = scalar(&text, style, tag.as_deref()).map_err(|m| self.error(&span, m))?;
                    self.node(v, anchor, &span, Some(&text))?;
                }
                Event::Alias(id) => {
                    let (v, n) = self.anchors.get(&id).cloned().ok_or_else(|| self.error(&span, "unknown alias"))?;
                    self.alias_nodes += n;
                    if self.alias_nodes > self.limits.max_alias_nodes {
                        let max = self.limits.max_alias_nodes;
                        return Err(self.error(&span, format!("aliases expand to more than {max} nodes")));
                    }
                    self.node(v, 0, &span, None)?;
                }
                Event::SequenceStart(_, anchor, _) => self.open(Frame::Seq { items: Vec::new(), anchor }, &span)?,
                Event::MappingStart(_, anchor, _) => {
                    self.open(Frame::Map { map: Map::new(), anchor, key: None, merges: Vec::new() }, &span)?
                }
                Event::SequenceEnd => {
                    if let Some(Frame::Seq { items, anchor }) = self.stack.pop() {
                        self.node(Value::Array(items), anchor, &span, None)?;
                    }
                }
                Event::MappingEnd => {
                    if let Some(Frame::Map { mut map, anchor, merges, .. }) = self.stack.pop() {
                        // YAML merge keys: explicit keys win, then earlier merged maps.
                        for m in merges {
                            for (k, v) in m.as_object().into_iter().flatten() {
                                map.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                        self.node(Value::Object(map), anchor, &span, None)?;
                    }
                }
                _ => {}
            }
        }
        Ok(self.docs)
    }

    fn error(&self, span: &Span, message: impl Into<String>) -> YamlError {
        YamlError {
            line: span.start.line(),
            column: span.start.col() + 1,
            document: self.document.max(1),
            message: message.into(),
        }
    }

    fn open(&mut self, frame: Frame, span: &Span) -> Result<(), YamlError> {
        if self.stack.len() >= self.limits.max_depth {
            let max = self.limits.max_depth;
            return Err(self.error(span, format!("nested deeper than {max} levels")));
        }
        if let Some(Frame::Map { key: None, .. }) = self.stack.last() {
            return Err(self.error(span, "a mapping key must be a scalar"));
        }
        self.stack.push(frame);
        Ok(())
    }

    /// A finished node: remember it if anchored, then place it in its parent. A scalar key keeps
    /// its `text` as written (`.5: x` is the key ".5", as serde-saphyr and kubectl have it).
    fn node(&mut self, v: Value, anchor: usize, span: &Span, text: Option<&str>) -> Result<(), YamlError> {
        if anchor != 0 {
            self.anchors.insert(anchor, (v.clone(), count(&v)));
        }
        let err = |this: &Self, m: String| Err(this.error(span, m));
        match self.stack.last_mut() {
            None => self.docs.push(v),
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { key: key @ None, .. }) => match (v, text) {
                (Value::String(s), None) => *key = Some((s, *span)),
                (Value::Bool(b), None) => *key = Some((b.to_string(), *span)),
                (Value::Number(n), None) => *key = Some((n.to_string(), *span)),
                (Value::String(_) | Value::Bool(_) | Value::Number(_), Some(t)) => *key = Some((t.into(), *span)),
                // As Kubernetes' YAML-to-JSON conversion: a null key has no JSON form.
                (Value::Null, _) => return err(self, "a mapping key must not be empty (null)".into()),
                _ => return err(self, "a mapping key must be a scalar".into()),
            },
            Some(Frame::Map { map, key: key @ Some(_), merges, .. }) => {
                let Some((k, at)) = key.take() else { unreachable!("matched Some") };
                if k == "<<" {
                    match v {
                        Value::Object(_) => merges.push(v),
                        Value::Array(maps) if maps.iter().all(Value::is_object) => merges.extend(maps),
                        _ => return err(self, "a merge key (<<) takes a mapping or a list of mappings".into()),
                    }
                } else if map.contains_key(&k) {
                    return Err(self.error(&at, format!("duplicate key `{k}`")));
                } else {
                    map.insert(k, v);
                }
            }
        }
        Ok(())
    }
}

/// Nodes in a value, counting itself.
fn count(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count).sum::<usize>(),
        _ => 1,
    }
}

/// A scalar's value: quoted and block scalars are strings; plain ones resolve by the core schema.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    let core = tag.filter(|t| t.handle() == "tag:yaml.org,2002:").map(Tag::suffix);
    let plain = style == ScalarStyle::Plain;
    match core {
        Some("str") => return Ok(Value::String(text.into())),
        Some("null") => return Ok(Value::Null),
        Some(t @ ("bool" | "int" | "float")) => {
            return match resolve(text)? {
                v @ Value::Bool(_) if t == "bool" => Ok(v),
                Value::Number(n) if t == "int" && !n.is_f64() => Ok(Value::Number(n)),
                Value::Number(n) if t == "float" => Ok(Value::Number(n)),
                _ => Err(format!("`{text}` is not a valid !!{t}")),
            };
        }
        _ => {}
    }
    // The non-specific tag `!` makes a plain scalar a string; other tags (local ones like `!foo`)
    // mean nothing to Kubernetes and leave the value as written.
    let non_specific = tag.is_some_and(|t| t.handle().is_empty() && t.suffix() == "!");
    if plain && !non_specific { resolve(text) } else { Ok(Value::String(text.into())) }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve(s: &str) -> Result<Value, String> {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let b = s.as_bytes();
    let digits = |t: &str, radix: u32| !t.is_empty() && t.chars().all(|c| c.is_digit(radix));
    if let Some(h) = s.strip_prefix("0x").filter(|h| digits(h, 16)) {
        if let Ok(n) = u64::from_str_radix(h, 16) {
            return Ok(Value::Number(n.into()));
        }
    } else if let Some(o) = s.strip_prefix("0o").filter(|o| digits(o, 8)) {
        if let Ok(n) = u64::from_str_radix(o, 8) {
            return Ok(Value::Number(n.into()));
        }
    } else if digits(s.strip_prefix(['-', '+']).unwrap_or(s), 10) {
        if let Ok(n) = s.parse::<i64>() {
            return Ok(Value::Number(n.into()));
        }
        if let Ok(n) = s.trim_start_matches('+').parse::<u64>() {
            return Ok(Value::Number(n.into()));
        }
    }
    // Floats: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?. `.inf` and `.nan` have no JSON
    // number and stay strings; a literal too large for a double is an error.
    if b.first().is_some_and(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+')) && is_float(s) {
        return s
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("`{s}` is out of range for a number"));
    }
    Ok(Value::String(s.into()))
}

fn is_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |t: &str| t.bytes().all(|c| c.is_ascii_digit());
    let mantissa_ok = match frac {
        Some(f) => all_digits(int) && all_digits(f) && (!int.is_empty() || !f.is_empty()),
        None => !int.is_empty() && all_digits(int),
    };
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exp_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits { max_depth: 64, max_alias_nodes: 100_000 };

    fn docs(text: &str) -> Vec<Value> {
        documents(text, LIMITS).unwrap_or_else(|e| panic!("{text:?}: {e:?}"))
    }

    #[test]
    fn scalars_resolve_by_the_core_schema() {
        let v = docs(
            "a: 80\nb: \"80\"\nc: 1.5\nd: true\ne: on\nf: ~\ng: 0x1F\nh: 0o17\ni: -3\nj: 1e3\nk: .inf\nl: 10.0.0.1\n\
             m: 'true'\nn: !!str 443\no: |\n  text\np: no\nq: 12345678901234567890\nr: +7\n",
        );
        assert_eq!(
            v,
            vec![json!({
                "a": 80, "b": "80", "c": 1.5, "d": true, "e": "on", "f": null, "g": 31, "h": 15, "i": -3,
                "j": 1000.0, "k": ".inf", "l": "10.0.0.1", "m": "true", "n": "443", "o": "text\n", "p": "no",
                "q": 12345678901234567890u64, "r": 7
            })]
        );
    }

    #[test]
    fn documents_lists_anchors_and_merge_keys() {
        let v = docs("---\nbase: &b {x: 1, y: 2}\nuse: {<<: *b, y: 3}\nlist: [*b]\n---\n---\n- 1\n");
        assert_eq!(
            v,
            vec![
                json!({"base": {"x": 1, "y": 2}, "use": {"x": 1, "y": 3}, "list": [{"x": 1, "y": 2}]}),
                Value::Null,
                json!([1]),
            ]
        );
        assert_eq!(docs(""), Vec::<Value>::new());
        assert_eq!(docs("# only a comment\n"), Vec::<Value>::new());
    }

    #[test]
    fn errors_say_where() {
        let e = documents("a: 1\n---\nb: [1, 2\nc: 3\n", LIMITS).expect_err("unclosed");
        assert_eq!(e.document, 2);
        assert!(e.line >= 3, "{e:?}");
        let e = documents("a: 1\na: 2\n", LIMITS).expect_err("duplicate");
        assert_eq!((e.line, e.column, e.message.as_str()), (2, 1, "duplicate key `a`"));
        let e = documents("x: *nope\n", LIMITS).expect_err("unknown alias");
        assert_eq!(e.line, 1);
        let e = documents("? [1]\n: v\n", LIMITS).expect_err("complex key");
        assert!(e.message.contains("key must be a scalar"), "{e:?}");
        let e = documents("port: !!int eighty\n", LIMITS).expect_err("bad int");
        assert!(e.message.contains("!!int"), "{e:?}");
    }

    #[test]
    fn limits_hold() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(documents(&deep, LIMITS).expect_err("deep").message.contains("deeper than 64"));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(documents(&ok, LIMITS).is_ok());
        let mut bomb = String::from("a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]\n");
        for i in 1..8 {
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
                p = i - 1
            ));
        }
        assert!(documents(&bomb, LIMITS).expect_err("bomb").message.contains("aliases expand"));
    }
}
