//! The manifests-folder source: a folder of Kubernetes objects (the same input as `--cluster`)
//! read again whenever it changes, so a node can be driven without an API server.
//!
//! Files are listed by [`crate::load::files`] and parsed by the engine's parser, file by file, so
//! that a file caught half-written by an editor (or simply wrong) keeps the objects it last held
//! and the error is reported: the cluster never holds half a file. A file whose text is the same
//! as at its last good parse is not parsed again: under churn only the files that changed cost a
//! parse (a folder of 10,000 Services is mostly unchanged between two reloads). [`diff`] says
//! which services changed between two clusters, which is what partial syncs need.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use switchyard_engine::cluster::Cluster;
use switchyard_engine::input::{self, Object};

use crate::load;
use crate::sync::Changes;

/// What one reload found.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    /// Whether the cluster differs from the previous reload.
    pub changed: bool,
    pub changes: Changes,
    /// One line per problem (file, document, object, field). A file with a problem keeps the
    /// objects of its last good version.
    pub errors: Vec<String>,
    /// The loader's advice (skipped kinds, ignored objects).
    pub warnings: Vec<String>,
}

/// A folder's last good state, file by file.
#[derive(Debug)]
pub struct ManifestSource {
    root: PathBuf,
    /// The objects of each file's last good version.
    files: BTreeMap<PathBuf, Vec<Object>>,
    /// A hash of the text each file's last good version was parsed from.
    parsed: BTreeMap<PathBuf, u64>,
    cluster: Cluster,
}

impl ManifestSource {
    /// A source for `root` that has read nothing yet (its cluster is empty).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestSource {
            root: root.into(),
            files: BTreeMap::new(),
            parsed: BTreeMap::new(),
            cluster: Cluster::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster as of the last reload.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Reads the folder again.
    pub fn reload(&mut self) -> Reload {
        let mut problems = Vec::new();
        let listed = load::files(std::slice::from_ref(&self.root), &mut problems);
        let mut out = Reload::default();
        for p in problems {
            // An empty folder is an empty cluster here (the agent waits for manifests).
            if !matches!(p, load::LoadProblem::Empty(_)) {
                out.errors.push(p.to_string());
            }
        }
        let mut files = BTreeMap::new();
        let mut parsed = BTreeMap::new();
        for path in listed {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    out.errors.push(format!("{}: cannot read: {e}", path.display()));
                    self.keep(&path, &mut files);
                    continue;
                }
            };
            // A file that was just truncated (an editor or `>` about to write it) reads empty.
            // Taking that as "no objects" would remove its services for a moment, and a
            // half-written file right after would then keep the empty state. Delete the file to
            // remove its objects.
            if text.trim().is_empty() && self.files.get(&path).is_some_and(|o| !o.is_empty()) {
                out.warnings.push(format!(
                    "{}: empty; keeping its last objects (delete the file to remove them)",
                    path.display()
                ));
                self.keep(&path, &mut files);
                continue;
            }
            let hash = text_hash(&text);
            if self.parsed.get(&path) == Some(&hash) && self.files.contains_key(&path) {
                // Unchanged since its last good parse (its warnings were given then).
                self.keep(&path, &mut files);
                parsed.insert(path, hash);
                continue;
            }
            match input::parse(&path.display().to_string(), &text) {
                Ok(p) => {
                    for (kind, n) in p.skipped_kinds {
                        out.warnings.push(format!("{}: skipped {n} object(s) of kind {kind}", path.display()));
                    }
                    out.warnings.extend(p.warnings);
                    parsed.insert(path.clone(), hash);
                    files.insert(path, p.objects);
                }
                Err(found) => {
                    out.errors.extend(found.iter().map(ToString::to_string));
                    self.keep(&path, &mut files);
                    if let Some(h) = self.parsed.get(&path) {
                        parsed.insert(path, *h);
                    }
                }
            }
        }
        self.files = files;
        self.parsed = parsed;
        // Files in sorted order, as `load` applies them: a later object with the same key wins.
        let cluster = Cluster::from_objects(self.files.values().flatten().cloned());
        out.changes = diff(&self.cluster, &cluster);
        out.changed = cluster != self.cluster;
        self.cluster = cluster;
        out
    }

    /// Carries a file's last good objects over (nothing, if it never parsed).
    fn keep(&self, path: &Path, files: &mut BTreeMap<PathBuf, Vec<Object>>) {
        if let Some(objects) = self.files.get(path) {
            files.insert(path.to_path_buf(), objects.clone());
        }
    }
}

/// A hash of a file's text, to tell an unchanged file without parsing it.
fn text_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Which services differ between two clusters: by their Service object, by their endpoints, or
/// all of them when something every service depends on changed (Nodes: local endpoints,
/// topology zones and node addresses; the proxy configuration; ServiceCIDRs).
pub fn diff(old: &Cluster, new: &Cluster) -> Changes {
    let mut c = Changes {
        all: old.nodes != new.nodes || old.service_cidrs != new.service_cidrs || old.config != new.config,
        ..Changes::default()
    };
    for k in old.services.keys().chain(new.services.keys()) {
        if old.services.get(k) != new.services.get(k) {
            c.services.insert(k.clone());
        }
    }
    let (a, b) = (old.slices_by_service(), new.slices_by_service());
    for k in a.keys().chain(b.keys()) {
        if a.get(k) != b.get(k) {
            c.endpoints.insert(k.clone());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::model::ObjectKey;

    use crate::load::tests::TempDir;

    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.2\n";

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: 80\n"
        )
    }

    fn slice(service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n"
        )
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new("default", name)
    }

    /// Editing one endpoint names that service's endpoints, nothing else.
    #[test]
    fn endpoint_edit_is_one_service() {
        let d = TempDir::new("ep");
        d.write("node.yaml", NODE);
        d.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web", "10.244.0.5")));
        d.write("api.yaml", &service("api", "10.96.0.11"));
        let mut s = ManifestSource::new(&d.0);
        let first = s.reload();
        assert!(first.changed && first.errors.is_empty(), "{:?}", first.errors);
        assert!(first.changes.all, "the first read brings the node");
        d.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web", "10.244.0.6")));
        let r = s.reload();
        assert!(r.changed);
        assert_eq!(r.changes, Changes { endpoints: [key("web")].into(), ..Changes::default() });
        let again = s.reload();
        assert!(!again.changed && again.changes.is_empty());
    }

    /// A half-written file keeps its last good objects and is reported; other files still count.
    #[test]
    fn emptied_file_keeps_its_objects() {
        let dir = TempDir::new("emptied");
        dir.write("a.yaml", &service("a", "10.96.0.1"));
        let mut src = ManifestSource::new(dir.0.clone());
        src.reload();
        assert_eq!(src.cluster().services.len(), 1);
        dir.write("a.yaml", "");
        let r = src.reload();
        assert_eq!(src.cluster().services.len(), 1, "a truncated file is a file being written");
        assert!(!r.changed);
        std::fs::remove_file(dir.0.join("a.yaml")).expect("remove");
        src.reload();
        assert!(src.cluster().services.is_empty(), "deleting the file removes its objects");
    }

    #[test]
    fn invalid_file_keeps_last_good_state() {
        let d = TempDir::new("bad");
        d.write("node.yaml", NODE);
        d.write("web.yaml", &service("web", "10.96.0.10"));
        let mut s = ManifestSource::new(&d.0);
        s.reload();
        d.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namesp");
        d.write("api.yaml", &service("api", "10.96.0.11"));
        let r = s.reload();
        assert!(!r.errors.is_empty());
        assert!(r.errors[0].contains("web.yaml"), "{:?}", r.errors);
        assert!(s.cluster().services.contains_key(&key("web")), "web kept");
        assert_eq!(r.changes, Changes { services: [key("api")].into(), ..Changes::default() });
        // Deleting the file removes its objects.
        std::fs::remove_file(d.0.join("web.yaml")).expect("rm");
        let r = s.reload();
        assert!(r.errors.is_empty());
        assert_eq!(r.changes.services, [key("web")].into());
        assert!(!s.cluster().services.contains_key(&key("web")));
    }

    /// A file put back to its last good text after a broken write is that version again (from
    /// the cache of parsed files), with no error left; a new text is parsed again.
    #[test]
    fn unchanged_text_is_not_parsed_again() {
        let d = TempDir::new("cache");
        d.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web", "10.244.0.5")));
        let mut s = ManifestSource::new(&d.0);
        s.reload();
        let before = s.cluster().clone();
        d.write("web.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namesp");
        assert!(!s.reload().errors.is_empty());
        d.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web", "10.244.0.5")));
        let r = s.reload();
        assert!(r.errors.is_empty() && !r.changed, "{:?}", r.errors);
        assert_eq!(*s.cluster(), before);
        d.write("web.yaml", &format!("{}---\n{}", service("web", "10.96.0.10"), slice("web", "10.244.0.6")));
        let r = s.reload();
        assert_eq!(r.changes, Changes { endpoints: [key("web")].into(), ..Changes::default() });
    }

    /// Services removed and added both count; a Node change touches everything.
    #[test]
    fn diff_of_clusters() {
        let a = switchyard_engine::demo::cluster();
        let mut b = a.clone();
        let first = b.services.keys().next().cloned().expect("a service");
        b.services.remove(&first);
        let c = diff(&a, &b);
        assert!(c.services.contains(&first) && !c.all);
        b.nodes.clear();
        assert!(diff(&a, &b).all);
        assert!(diff(&a, &a).is_empty());
    }
}
