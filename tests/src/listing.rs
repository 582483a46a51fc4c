//! Kernel listings (`nft list ruleset`, `iptables-save`) as sorted lines, so that two kernels'
//! programs compare equal when they hold the same rules, whatever order the kernel lists
//! elements and chains in.

use std::collections::BTreeMap;

/// `nft list ruleset` as sorted lines: every line keyed by the table and set, map or chain it is
/// in; rules and declarations numbered within their block (their order matters), set and map
/// elements one per line and unnumbered (the kernel lists them in no fixed order).
pub fn normalize_nft(listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut table, mut block, mut n, mut in_elements) = (String::new(), String::new(), 0usize, false);
    for line in listing.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if !in_elements {
            if t.starts_with("table ") {
                table = t.trim_end_matches(" {").to_string();
                block.clear();
                n = 0;
                continue;
            }
            if ["set ", "map ", "chain ", "flowtable "].iter().any(|p| t.starts_with(p)) {
                block = t.trim_end_matches(" {").to_string();
                out.push(format!("{table} / {block}"));
                n = 0;
                continue;
            }
        }
        let body = match t.strip_prefix("elements = {") {
            Some(rest) => {
                in_elements = true;
                rest
            }
            None if in_elements => t,
            None => {
                if t != "}" {
                    out.push(format!("{table} / {block} / {n:04} {t}"));
                    n += 1;
                }
                continue;
            }
        };
        let (body, closed) = match body.strip_suffix('}') {
            Some(b) => (b, true),
            None => (body, false),
        };
        for item in body.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            out.push(format!("{table} / {block} / element {item}"));
        }
        if closed {
            in_elements = false;
        }
    }
    out.sort();
    out
}

/// `iptables-save` as sorted lines: comments and counters dropped, chains declared in any order,
/// rules numbered within their chain (their order matters).
pub fn normalize_iptables(save: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut table = "";
    let mut per_chain: BTreeMap<String, usize> = BTreeMap::new();
    for line in save.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            per_chain.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            // `:CHAIN POLICY [packets:bytes]`: the counters are not the program.
            let decl: Vec<&str> = decl.split_whitespace().take(2).collect();
            out.push(format!("{table} :{}", decl.join(" ")));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default().to_string();
            let n = per_chain.entry(chain.clone()).or_default();
            out.push(format!("{table} {chain} {n:04} -A {rule}"));
            *n += 1;
        } else {
            out.push(format!("{table} {line}"));
        }
    }
    out.sort();
    out
}

/// The IPv4 part (for `iptables-restore`) and the IPv6 part (after the `# ip6tables-restore` line).
pub fn split_iptables(program: &str) -> (&str, &str) {
    let mut offset = 0;
    for line in program.split_inclusive('\n') {
        if line.trim_start().starts_with("# ip6tables-restore") {
            return (&program[..offset], &program[offset..]);
        }
        offset += line.len();
    }
    (program, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizers_ignore_order_of_elements_and_counters() {
        let a = "table ip t {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.1, 10.0.0.2,\n\t\t\t     10.0.0.3 }\n\t}\n\tchain c {\n\t\tip daddr @s drop\n\t\taccept\n\t}\n}\n";
        let b = "table ip t {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.3, 10.0.0.1, 10.0.0.2 }\n\t}\n\tchain c {\n\t\tip daddr @s drop\n\t\taccept\n\t}\n}\n";
        assert_eq!(normalize_nft(a), normalize_nft(b));
        let c = b.replace("ip daddr @s drop\n\t\taccept", "accept\n\t\tip daddr @s drop");
        assert_ne!(normalize_nft(a), normalize_nft(&c), "rule order matters");
        let s1 = "# x\n*nat\n:A - [3:4]\n:B - [0:0]\n-A A -j B\nCOMMIT\n";
        let s2 = "*nat\n:B - [0:0]\n:A - [0:0]\n-A A -j B\nCOMMIT\n# y\n";
        assert_eq!(normalize_iptables(s1), normalize_iptables(s2));
        assert_eq!(
            split_iptables("*nat\nCOMMIT\n# ip6tables-restore\n*nat\nCOMMIT\n"),
            ("*nat\nCOMMIT\n", "# ip6tables-restore\n*nat\nCOMMIT\n")
        );
    }
}
