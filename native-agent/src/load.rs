//! Cluster input from disk: what `--cluster PATH` names (repeatable), read into one engine
//! [`Cluster`].
//!
//! A path is a file, read whatever its name, or a folder, read recursively for `*.yaml`, `*.yml`
//! and `*.json` in sorted order, so the same folder always builds the same cluster (a later object
//! with the same key replaces an earlier one). Every file goes through
//! [`switchyard_engine::input::parse`]; this module only does the IO and gathers what the parser
//! reports: every problem of every file, so a user can fix the input in one pass, and one warning
//! per skipped kind rather than one per object.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use switchyard_engine::cluster::Cluster;
use switchyard_engine::input::{self, Problem};

/// The file name endings read from a folder.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Folders deeper than this are not entered: it bounds symlink loops.
const MAX_DEPTH: usize = 32;

/// A cluster read from disk, with what was left out on the way.
#[derive(Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    /// One line per skipped kind, then one per object ignored the way kube-proxy ignores it.
    pub warnings: Vec<String>,
    /// The files read, in the order they were applied.
    pub files: Vec<PathBuf>,
}

/// Why the input could not be read: every problem found, in file order.
#[derive(Debug, thiserror::Error)]
#[error("the cluster input has {} problem(s)", .0.len())]
pub struct LoadError(pub Vec<LoadProblem>);

/// One problem with the cluster input.
#[derive(Debug, thiserror::Error)]
pub enum LoadProblem {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no *.yaml, *.yml or *.json files in this folder", .0.display())]
    Empty(PathBuf),
    /// A located problem inside a file (file, document, object, field).
    #[error(transparent)]
    Input(#[from] Problem),
}

/// Reads every path into one cluster, or returns every problem found, in the order of the paths.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut objects = Vec::new();
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    let mut notes = Vec::new();
    for path in paths {
        for file in self::files(std::slice::from_ref(path), &mut problems) {
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(source) => {
                    problems.push(LoadProblem::Io { path: file, source });
                    continue;
                }
            };
            match input::parse(&file.display().to_string(), &text) {
                Ok(parsed) => {
                    objects.extend(parsed.objects);
                    for (kind, n) in parsed.skipped_kinds {
                        *skipped.entry(kind).or_default() += n;
                    }
                    notes.extend(parsed.warnings);
                }
                Err(found) => problems.extend(found.into_iter().map(LoadProblem::Input)),
            }
            files.push(file);
        }
    }
    if !problems.is_empty() {
        return Err(LoadError(problems));
    }
    let mut warnings: Vec<String> = skipped.into_iter().map(|(kind, n)| skipped_line(&kind, n)).collect();
    warnings.extend(notes);
    Ok(Loaded { cluster: Cluster::from_objects(objects), warnings, files })
}

fn skipped_line(kind: &str, n: usize) -> String {
    let objects = if n == 1 { "object" } else { "objects" };
    format!(
        "skipped {n} {objects} of kind {kind}: Switchyard routes by Services, EndpointSlices, Nodes and ServiceCIDRs only"
    )
}

/// The files the paths name, each path's files sorted; a missing path or an empty folder is a
/// problem.
pub fn files(paths: &[PathBuf], problems: &mut Vec<LoadProblem>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for path in paths {
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                let mut found = Vec::new();
                walk(path, 0, &mut found, problems);
                if found.is_empty() {
                    problems.push(LoadProblem::Empty(path.clone()));
                }
                found.sort();
                out.extend(found);
            }
            Ok(_) => out.push(path.clone()),
            Err(source) => problems.push(LoadProblem::Io { path: path.clone(), source }),
        }
    }
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>, problems: &mut Vec<LoadProblem>) {
    if depth > MAX_DEPTH {
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(source) => {
            problems.push(LoadProblem::Io { path: dir.to_path_buf(), source });
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(source) => {
                problems.push(LoadProblem::Io { path: dir.to_path_buf(), source });
                continue;
            }
        };
        let path = entry.path();
        // Hidden entries (`.git`, editor swap files) are never cluster input.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, depth + 1, out, problems),
            Ok(_) if is_manifest(&path) => out.push(path),
            Ok(_) => {}
            Err(source) => problems.push(LoadProblem::Io { path, source }),
        }
    }
}

/// Whether a folder's file is read as cluster input, by its name.
pub(crate) fn is_manifest(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A folder under the system temp dir, removed on drop (the crate's tests share it).
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("sy-load-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }
        pub(crate) fn write(&self, rel: &str, text: &str) -> PathBuf {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, text).expect("write");
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.2\n";
    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n";

    /// A folder is read recursively, only manifest extensions, hidden entries left out.
    #[test]
    fn folder_is_read_recursively_in_order() {
        let d = TempDir::new("walk");
        d.write("b/node.yml", NODE);
        d.write("a/svc.yaml", SERVICE);
        d.write("notes.txt", "not yaml: [");
        d.write(".hidden/broken.yaml", "{{{");
        let loaded = load(std::slice::from_ref(&d.0)).expect("loads");
        let names: Vec<_> = loaded.files.iter().map(|f| f.strip_prefix(&d.0).expect("inside").to_path_buf()).collect();
        assert_eq!(names, vec![PathBuf::from("a/svc.yaml"), PathBuf::from("b/node.yml")]);
        assert!(loaded.cluster.nodes.contains_key("n1"));
        assert_eq!(loaded.cluster.services.len(), 1);
        assert!(loaded.warnings.is_empty());
    }

    /// Skipped kinds give one warning line per kind, however many objects and files.
    #[test]
    fn one_warning_per_skipped_kind() {
        let d = TempDir::new("skip");
        d.write("a.yaml", &format!("{POD}---\n{POD}"));
        d.write("b.yaml", &format!("{POD}---\n{NODE}"));
        let loaded = load(std::slice::from_ref(&d.0)).expect("loads");
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("3 objects of kind Pod"), "{}", loaded.warnings[0]);
    }

    /// A file named explicitly is read whatever its extension; problems of all files are kept.
    #[test]
    fn every_problem_is_reported() {
        let d = TempDir::new("bad");
        let a = d.write("a.txt", "kind: Service\nmetadata: [\n");
        let b = d.write("b.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: default\nspec:\n  clusterIP: 10.96.0.300\n  ports:\n  - port: 80\n");
        let missing = d.0.join("missing.yaml");
        let err = load(&[a, b, missing]).expect_err("problems");
        assert_eq!(err.0.len(), 3, "{err:?}");
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert!(lines[0].contains("a.txt: document 1"), "{}", lines[0]);
        assert!(lines[1].contains("b.yaml: document 1") && lines[1].contains("clusterIP"), "{}", lines[1]);
        assert!(lines[2].contains("missing.yaml: cannot read"), "{}", lines[2]);
    }

    /// An empty folder is a mistake worth saying, not an empty cluster.
    #[test]
    fn empty_folder_is_a_problem() {
        let d = TempDir::new("empty");
        d.write("readme.md", "nothing");
        let err = load(std::slice::from_ref(&d.0)).expect_err("empty");
        assert!(matches!(err.0.as_slice(), [LoadProblem::Empty(_)]), "{err:?}");
    }

    /// Several paths are applied in the order given.
    #[test]
    fn paths_are_applied_in_order() {
        let d = TempDir::new("order");
        let one = d.write("one.yaml", SERVICE);
        let two = d.write("two.yaml", &SERVICE.replace("10.96.0.10", "10.96.0.11"));
        let loaded = load(&[one, two]).expect("loads");
        let svc = loaded.cluster.services.values().next().expect("service");
        assert_eq!(svc.cluster_ips, vec!["10.96.0.11".parse::<std::net::IpAddr>().expect("ip")]);
    }
}
