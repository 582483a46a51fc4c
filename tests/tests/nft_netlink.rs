//! The netlink applier on a real kernel: it must leave exactly the ruleset `nft -f` leaves, and
//! a batch the kernel refuses must change nothing.
//!
//! Two namespaces get the same full program, one through the agent's [`Hybrid`] applier (a whole
//! program in one netlink batch, its declarations staged by `nft`), the other through `nft -f`;
//! then the same series of incremental transactions goes to both (element-only transactions over
//! netlink, the rest through `nft`), and last the final full program again. After each
//! transaction both rulesets must be equal (elements compared as sets: the kernel lists a hash
//! set in its own order), and no staging table may be left. Skipped, with the reason printed,
//! when not root or without `nft`.

use switchyard_agent::apply::nft_netlink::{Hybrid, NetlinkError, Path, Socket, program};
use switchyard_agent::apply::nftables::{self, ApplyError, NftApplier};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy::{self, Backend, NodePlan};
use switchyard_engine::render::nftables::{render, render_incremental_for};
use switchyard_engine::synthetic;
use switchyard_tests::changes;
use switchyard_tests::listing::normalize_nft;
use switchyard_tests::netns::{self, Netns};

fn hybrid(ns: &Netns) -> Hybrid<nftables::Kernel> {
    let nft = nftables::Kernel::in_netns(ns.name());
    let name = ns.name().to_string();
    Hybrid::new(
        nft,
        Box::new(move || {
            Socket::open(Some(&name)).map(|s| Box::new(s) as Box<dyn switchyard_agent::apply::nft_netlink::BatchSender>)
        }),
    )
}

/// `nft list ruleset`, as sorted lines.
fn ruleset(ns: &Netns) -> Vec<String> {
    normalize_nft(&ns.exec("nft", &["list", "ruleset"], None).expect("nft list ruleset"))
}

fn skip() -> bool {
    if let Some(why) = netns::skip_reason(&["nft"]) {
        println!("skipped nft netlink kernel tests: {why}");
        return true;
    }
    false
}

/// Loads `start`'s program into two namespaces, then each step's transaction into both.
fn walk(name: &str, start: &Cluster, node: &str, steps: Vec<(String, Cluster)>, via_netlink: &mut usize) {
    let (a, b) = (Netns::new().expect("namespace"), Netns::new().expect("namespace"));
    let mut fast = hybrid(&a);
    let mut slow = nftables::Kernel::in_netns(b.name());
    let mut old: NodePlan = policy::plan(start, node, Backend::Nftables);
    let program = render(&old);
    fast.apply(&program).expect("full program through the hybrid");
    slow.apply(&program).expect("full program through nft");
    assert_eq!(fast.last, Some(Path::Netlink), "{name} {node}: the full program went through nft");
    assert_same(&a, &b, &format!("{name} {node}: full program"));
    for (what, cluster) in steps {
        let new = policy::plan(&cluster, node, Backend::Nftables);
        let txn = render_incremental_for(&old, &new, None);
        if txn.is_empty() {
            continue;
        }
        fast.apply(&txn).unwrap_or_else(|e| panic!("{name} {what}: hybrid: {e}\n{txn}"));
        slow.apply(&txn).unwrap_or_else(|e| panic!("{name} {what}: nft: {e}\n{txn}"));
        if fast.last == Some(Path::Netlink) {
            *via_netlink += 1;
        }
        assert_same(&a, &b, &format!("{name} {what} ({:?})\n{txn}", fast.last));
        old = new;
    }
    // A full sync over what is there: the table is replaced in the same batch.
    let program = render(&old);
    fast.apply(&program).expect("full program again through the hybrid");
    slow.apply(&program).expect("full program again through nft");
    assert_eq!(fast.last, Some(Path::Netlink));
    assert_same(&a, &b, &format!("{name} {node}: full program again"));
}

fn assert_same(a: &Netns, b: &Netns, what: &str) {
    let (got, want) = (ruleset(a), ruleset(b));
    if got != want {
        let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).take(5).collect();
        let missing: Vec<&String> = want.iter().filter(|l| !got.contains(l)).take(5).collect();
        panic!("{what}: rulesets differ\n  only netlink: {extra:?}\n  only nft: {missing:?}");
    }
    let tables = a.exec("nft", &["list", "tables"], None).expect("nft list tables");
    assert!(!tables.contains(program::STAGING), "{what}: a staging table is left: {tables}");
}

/// Netlink and `nft -f` end in identical rulesets after every transaction: endpoint replaced
/// and restored, endpoint count 10 → 11 → 10 (the service's verdict elements move to another
/// load-balancing chain), a service removed and added back, for a synthetic cluster and every
/// node of the scenario clusters (dual-stack ones included, so `ip6` elements too).
#[test]
fn netlink_and_nft_leave_identical_rulesets() {
    if skip() {
        return;
    }
    let mut via_netlink = 0;
    let mut base = synthetic::cluster(40, 10);
    let eleven = synthetic::slice(3, 11, 0);
    base.endpoint_slices.insert(eleven.key.clone(), eleven);
    let with = |i: u32, eps: u32, generation: u32| {
        let mut c = base.clone();
        let s = synthetic::slice(i, eps, generation);
        c.endpoint_slices.insert(s.key.clone(), s);
        c
    };
    let mut steps = Vec::new();
    for (what, i, eps, generation) in [
        ("endpoint replaced", 7, 10, 1),
        ("endpoint restored", 7, 10, 0),
        ("endpoint added (10 → 11)", 7, 11, 0),
        ("endpoint removed (11 → 10)", 7, 10, 0),
        ("NodePort service endpoint replaced", 12, 10, 2),
    ] {
        steps.push((format!("{what}, service {i}"), with(i, eps, generation)));
    }
    steps.extend(changes::steps(&base).into_iter().map(|s| (s.what, s.cluster)));
    walk("synthetic", &base, "node-a", steps, &mut via_netlink);

    for s in switchyard_tests::scenario::scenarios(&switchyard_tests::repo_scenarios()) {
        let Ok(cluster) = s.cluster() else { continue };
        for node in cluster.nodes.keys() {
            let steps = changes::steps(&cluster).into_iter().map(|st| (st.what, st.cluster)).collect();
            walk(&s.name, &cluster, node, steps, &mut via_netlink);
        }
    }
    println!("{via_netlink} transactions went through netlink");
    assert!(via_netlink >= 5, "only {via_netlink} transactions went through netlink");
}

/// A batch whose second element is invalid (a verdict to a chain that does not exist) is
/// refused whole: the kernel keeps the ruleset it had, the error names the statement and the
/// kernel's reason, and the socket goes on working.
#[test]
fn a_refused_batch_changes_nothing() {
    if skip() {
        return;
    }
    let ns = Netns::new().expect("namespace");
    let mut k = hybrid(&ns);
    let plan = policy::plan(&synthetic::cluster(20, 10), "node-a", Backend::Nftables);
    k.apply(&render(&plan)).expect("program");
    let before = ruleset(&ns);
    let txn = "add element ip switchyard cluster-ips { 10.99.0.1 }\n\
               add element ip switchyard service-ips { 10.99.0.1 . tcp . 80 : goto lb-ip-10, 10.99.0.2 . tcp . 80 : goto no-such-chain }\n";
    let e = k.apply(txn).expect_err("refused");
    assert!(matches!(&e, ApplyError::Netlink(NetlinkError::Rejected { .. })), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("add element ip switchyard service-ips") && text.contains("No such file or directory"),
        "{text}"
    );
    assert_eq!(ruleset(&ns), before, "the first statement and the first element must not be committed");
    // nft refuses the same transaction.
    assert!(nftables::Kernel::in_netns(ns.name()).apply(txn).is_err());
    // A delete of an element that is not there, after a valid add: refused whole too.
    let txn =
        "add element ip switchyard cluster-ips { 10.99.0.1 }\ndelete element ip switchyard cluster-ips { 10.99.0.2 }\n";
    assert!(k.apply(txn).is_err());
    assert_eq!(ruleset(&ns), before);
    // The same socket then applies a valid batch.
    k.apply("add element ip switchyard cluster-ips { 10.99.0.1 }\n").expect("applies");
    assert_eq!(k.last, Some(Path::Netlink));
    let after = ruleset(&ns);
    assert!(after.iter().any(|l| l.ends_with("cluster-ips / element 10.99.0.1")), "{after:?}");
}

/// A full program the kernel refuses (a verdict element that jumps to a chain which does not
/// exist: `nft` stages the declarations fine, the batch fails on the element) changes nothing:
/// the previous program stays, `nft -f` refuses it too, no staging table is left, and a foreign
/// table is untouched. The next valid program goes over netlink again.
#[test]
fn a_refused_program_changes_nothing() {
    if skip() {
        return;
    }
    let ns = Netns::new().expect("namespace");
    ns.exec("nft", &["-f", "-"], Some("table inet foreign {\n\tchain c {\n\t\ttcp dport 9 drop\n\t}\n}\n"))
        .expect("foreign table");
    let mut k = hybrid(&ns);
    let plan = policy::plan(&synthetic::cluster(20, 10), "node-a", Backend::Nftables);
    let good = render(&plan);
    k.apply(&good).expect("program");
    assert_eq!(k.last, Some(Path::Netlink));
    let before = ruleset(&ns);
    let bad = good.replacen(": goto lb-ip-10", ": goto no-such-chain", 1);
    assert_ne!(bad, good);
    let e = k.apply(&bad).expect_err("refused");
    assert!(matches!(e, ApplyError::Failed { .. }), "nft's verdict is the one returned: {e:?}");
    assert_eq!(ruleset(&ns), before);
    let tables = ns.exec("nft", &["list", "tables"], None).expect("tables");
    assert!(!tables.contains(program::STAGING), "{tables}");
    assert!(before.iter().any(|l| l.contains("foreign")), "{before:?}");
    k.apply(&good).expect("program again");
    assert_eq!(k.last, Some(Path::Netlink));
    assert_eq!(ruleset(&ns), before);
}
