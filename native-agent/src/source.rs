//! The manifests-folder source: a folder of Kubernetes objects (the same input as `--cluster`)
//! read again whenever it changes, so a node can be driven without an API server.
//!
//! Files are listed by [`crate::load::files`] and parsed by the engine's parser, file by file, so
//! that a file caught half-written by an editor (or simply wrong) keeps the objects it last held
//! and the error is reported: the cluster never holds half a file.
//!
//! Two ways in. [`ManifestSource::reload_paths`] re-reads only the files the watcher named: the
//! source keeps the objects each file contributed and which files hold each object, so a changed
//! file patches the cluster in place and yields one [`Delta`] per object that changed (a folder of
//! 10,000 Services is mostly unchanged between two events, and whole-cluster work per event is
//! what made one endpoint change cost 140 ms there). [`ManifestSource::reload`] re-reads the whole
//! folder, rebuilds the cluster from scratch and compares it whole ([`diff`]): the safe path for
//! startup, a watcher that lost events, and the periodic rescan that repairs anything the
//! incremental path could have missed. A file whose text is the same as at its last good parse is
//! not parsed again on either path.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use switchyard_engine::cluster::{Cluster, Delta, ObjectRef};
use switchyard_engine::input::{self, Object};

use crate::load;
use crate::sync::Changes;

/// What one reload found.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    /// Whether the cluster differs from the previous reload.
    pub changed: bool,
    pub changes: Changes,
    /// The objects that changed, when only the named files were read; `None` after a full
    /// re-read, which replaced the cluster whole.
    pub deltas: Option<Vec<Delta>>,
    /// One line per problem (file, document, object, field) of the folder as it is now. A file
    /// with a problem keeps the objects of its last good version.
    pub errors: Vec<String>,
    /// The loader's advice (skipped kinds, ignored objects) about the files read this time.
    pub warnings: Vec<String>,
}

/// An object's identity across files: `None` is the proxy configuration, which has no name.
type Key = Option<ObjectRef>;

/// What the source knows of one file.
#[derive(Debug, Default)]
struct FileRecord {
    /// A hash of the text its objects were parsed from (`None`: it never parsed).
    hash: Option<u64>,
    /// The objects of its last good version; within a file a later object with the same key wins.
    objects: BTreeMap<Key, Object>,
    /// What is wrong with it now.
    errors: Vec<String>,
}

/// A folder's last good state, file by file.
#[derive(Debug)]
pub struct ManifestSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileRecord>,
    /// The files that hold each object: the last in sorted order wins, as `load` applies them.
    owners: BTreeMap<Key, BTreeSet<PathBuf>>,
    /// Problems listing the folder, as of the last full re-read.
    listing: Vec<String>,
    cluster: Cluster,
    /// Files read so far (tests count them).
    reads: u64,
}

/// What one file holds now, after reading it again.
enum Refresh {
    /// New objects (parsed from a new text).
    Objects(BTreeMap<Key, Object>),
    /// Its objects stay (same text, or a text that cannot be used).
    Keep,
    /// It is gone: its objects go.
    Gone,
}

impl ManifestSource {
    /// A source for `root` that has read nothing yet (its cluster is empty).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestSource {
            root: root.into(),
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
            listing: Vec::new(),
            cluster: Cluster::default(),
            reads: 0,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster as of the last reload.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Files read since the source was made.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Reads the whole folder again and compares the new cluster with the old one whole.
    pub fn reload(&mut self) -> Reload {
        let mut problems = Vec::new();
        let listed = load::files(std::slice::from_ref(&self.root), &mut problems);
        let mut out = Reload::default();
        // An empty folder is an empty cluster here (the agent waits for manifests).
        self.listing =
            problems.iter().filter(|p| !matches!(p, load::LoadProblem::Empty(_))).map(ToString::to_string).collect();
        let listed: BTreeSet<PathBuf> = listed.into_iter().collect();
        self.files.retain(|path, _| listed.contains(path));
        for path in listed {
            match self.refresh(&path, &mut out.warnings) {
                Refresh::Objects(objects) => self.files.entry(path).or_default().objects = objects,
                Refresh::Keep => {}
                Refresh::Gone => {
                    self.files.remove(&path);
                }
            }
        }
        self.owners.clear();
        for (path, f) in &self.files {
            for k in f.objects.keys() {
                self.owners.entry(k.clone()).or_default().insert(path.clone());
            }
        }
        // Files in sorted order, as `load` applies them: a later object with the same key wins.
        let cluster = Cluster::from_objects(self.files.values().flat_map(|f| f.objects.values().cloned()));
        out.changes = diff(&self.cluster, &cluster);
        out.changed = cluster != self.cluster;
        self.cluster = cluster;
        out.errors = self.errors();
        out
    }

    /// Reads again only `paths` (what the watcher reported: files written, created, removed or
    /// renamed) and patches the cluster with what changed. A path that is a folder, or outside
    /// the root as given, falls back to a full [`ManifestSource::reload`].
    pub fn reload_paths(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Reload {
        let mut out = Reload::default();
        let mut touched: BTreeSet<Key> = BTreeSet::new();
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        // A folder created, removed or renamed names only itself, not the files inside.
        let folder = |p: &PathBuf| {
            p.strip_prefix(&self.root).map_or(true, |rel| rel.as_os_str().is_empty())
                || p.is_dir()
                || self.holds_files_under(p)
        };
        if paths.iter().any(folder) {
            return self.reload();
        }
        for path in paths {
            let hidden = path
                .strip_prefix(&self.root)
                .is_ok_and(|rel| rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')));
            if hidden || !load::is_manifest(&path) {
                continue;
            }
            let (objects, gone) = match self.refresh(&path, &mut out.warnings) {
                Refresh::Keep => continue,
                Refresh::Objects(objects) => (objects, false),
                Refresh::Gone => (BTreeMap::new(), true),
            };
            let old = self.files.get(&path).map(|f| &f.objects);
            for k in old.into_iter().flat_map(BTreeMap::keys).filter(|k| !objects.contains_key(*k)) {
                if let Some(o) = self.owners.get_mut(k) {
                    o.remove(&path);
                    if o.is_empty() {
                        self.owners.remove(k);
                    }
                }
                touched.insert(k.clone());
            }
            for (k, o) in &objects {
                if old.and_then(|old| old.get(k)) != Some(o) {
                    touched.insert(k.clone());
                }
                self.owners.entry(k.clone()).or_default().insert(path.clone());
            }
            if gone {
                self.files.remove(&path);
            } else {
                self.files.entry(path).or_default().objects = objects;
            }
        }
        let mut deltas = Vec::with_capacity(touched.len());
        for k in touched {
            let after = self
                .owners
                .get(&k)
                .and_then(|files| files.last())
                .and_then(|path| self.files.get(path))
                .and_then(|f| f.objects.get(&k))
                .filter(|o| !matches!(o, Object::ProxyConfig(c) if *c == Default::default()))
                .cloned();
            let before = self.cluster.get(k.as_ref());
            if before != after {
                let d = Delta { before, after };
                self.cluster.patch(d.clone());
                deltas.push(d);
            }
        }
        out.changes = changes_of(&deltas);
        out.changed = !deltas.is_empty();
        out.deltas = Some(deltas);
        out.errors = self.errors();
        out
    }

    /// Whether a known file lies under `path` (then `path` is, or was, a folder).
    fn holds_files_under(&self, path: &Path) -> bool {
        self.files
            .range::<Path, _>((Bound::Excluded(path), Bound::Unbounded))
            .next()
            .is_some_and(|(p, _)| p.starts_with(path))
    }

    /// Every problem of the folder as it is now, in file order.
    fn errors(&self) -> Vec<String> {
        let files = self.files.values().flat_map(|f| f.errors.iter().cloned());
        self.listing.iter().cloned().chain(files).collect()
    }

    /// Reads one file again and says what it holds now; records its hash and its errors.
    fn refresh(&mut self, path: &Path, warnings: &mut Vec<String>) -> Refresh {
        self.reads += 1;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Refresh::Gone,
            Err(e) => {
                self.files.entry(path.to_path_buf()).or_default().errors =
                    vec![format!("{}: cannot read: {e}", path.display())];
                return Refresh::Keep;
            }
        };
        let record = self.files.entry(path.to_path_buf()).or_default();
        // A file that was just truncated (an editor or `>` about to write it) reads empty.
        // Taking that as "no objects" would remove its services for a moment, and a
        // half-written file right after would then keep the empty state. Delete the file to
        // remove its objects.
        if text.trim().is_empty() && !record.objects.is_empty() {
            warnings
                .push(format!("{}: empty; keeping its last objects (delete the file to remove them)", path.display()));
            record.errors.clear();
            return Refresh::Keep;
        }
        let hash = text_hash(&text);
        if record.hash == Some(hash) {
            // Unchanged since its last good parse (its warnings were given then).
            record.errors.clear();
            return Refresh::Keep;
        }
        match input::parse(&path.display().to_string(), &text) {
            Ok(p) => {
                for (kind, n) in p.skipped_kinds {
                    warnings.push(format!("{}: skipped {n} object(s) of kind {kind}", path.display()));
                }
                warnings.extend(p.warnings);
                record.hash = Some(hash);
                record.errors.clear();
                Refresh::Objects(p.objects.into_iter().map(|o| (o.reference(), o)).collect())
            }
            Err(found) => {
                record.errors = found.iter().map(ToString::to_string).collect();
                Refresh::Keep
            }
        }
    }
}

/// A hash of a file's text, to tell an unchanged file without parsing it.
fn text_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Which services a set of object changes touches, as [`diff`] would say for the two clusters:
/// a Service by its object, a slice by the services it belonged to before and after, and all of
/// them for a Node, a ServiceCIDR or the proxy configuration.
pub fn changes_of(deltas: &[Delta]) -> Changes {
    let mut c = Changes::default();
    for o in deltas.iter().flat_map(|d| d.before.iter().chain(&d.after)) {
        match o {
            Object::Service(s) => {
                c.services.insert(s.key.clone());
            }
            Object::EndpointSlice(s) => {
                c.endpoints
                    .insert(switchyard_engine::model::ObjectKey::new(s.key.namespace.clone(), s.service.clone()));
            }
            Object::Endpoints { key, .. } => {
                c.endpoints.insert(key.clone());
            }
            Object::Node(_) | Object::ServiceCidr(_) | Object::ProxyConfig(_) => c.all = true,
        }
    }
    c
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

    /// One changed file of many is the only file read, and the change names exactly its objects:
    /// one slice's delta, that service's endpoints, the cluster a full re-read builds.
    #[test]
    fn one_changed_file_is_the_only_read() {
        let d = TempDir::new("one");
        d.write("node.yaml", NODE);
        let file = |i: u32, ep: u8| {
            let name = format!("svc{i}");
            format!("{}---\n{}", service(&name, &format!("10.96.0.{i}")), slice(&name, &format!("10.244.0.{ep}")))
        };
        for i in 0..40 {
            d.write(&format!("svc{i:02}.yaml"), &file(i, 5));
        }
        let mut s = ManifestSource::new(&d.0);
        assert!(s.reload().errors.is_empty());
        assert_eq!(s.reads(), 41);
        let path = d.write("svc07.yaml", &file(7, 6));
        let r = s.reload_paths([path]);
        assert_eq!(s.reads(), 42, "only the file named was read");
        assert_eq!(r.changes, Changes { endpoints: [key("svc7")].into(), ..Changes::default() });
        let deltas = r.deltas.expect("an incremental reload");
        let refs: Vec<_> = deltas.iter().map(Delta::reference).collect();
        assert_eq!(refs, [Some(ObjectRef::EndpointSlice(key("svc7-abc")))]);
        let mut full = ManifestSource::new(&d.0);
        full.reload();
        assert_eq!(s.cluster(), full.cluster());
        // A removed file takes its objects; an unknown path or a hidden file reads nothing.
        std::fs::remove_file(d.0.join("svc08.yaml")).expect("rm");
        let r = s.reload_paths([d.0.join("svc08.yaml"), d.0.join("notes.txt"), d.0.join(".svc09.yaml.swp")]);
        assert_eq!(r.changes, Changes { services: [key("svc8")].into(), endpoints: [key("svc8")].into(), all: false });
        assert_eq!(s.reads(), 43);
        assert!(!s.cluster().services.contains_key(&key("svc8")));
    }

    /// A folder created or removed names only itself: the whole folder is read again.
    #[test]
    fn a_folder_event_reads_everything() {
        let d = TempDir::new("sub");
        d.write("a.yaml", &service("a", "10.96.0.1"));
        let mut s = ManifestSource::new(&d.0);
        s.reload();
        d.write("sub/b.yaml", &service("b", "10.96.0.2"));
        let r = s.reload_paths([d.0.join("sub")]);
        assert!(r.deltas.is_none() && r.changed);
        assert_eq!(r.changes.services, [key("b")].into());
        std::fs::remove_dir_all(d.0.join("sub")).expect("rm");
        let r = s.reload_paths([d.0.join("sub")]);
        assert_eq!(r.changes.services, [key("b")].into());
        assert_eq!(s.cluster().services.len(), 1);
    }

    /// Invariant: after any sequence of writes (good, broken, emptied) and removals, the cluster
    /// kept by re-reading only the files touched equals the one a full re-read of every file
    /// keeps, its deltas publish what comparing the two clusters would, and the services they
    /// name cover the clusters' diff.
    #[test]
    fn incremental_equals_full_reread() {
        let d = TempDir::new("prop");
        // A tiny generator: a seeded xorshift, so a failure replays.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let names = ["a", "b", "c", "d"];
        let files = ["00.yaml", "10.yaml", "sub/20.yaml", "30.yml"];
        let mut inc = ManifestSource::new(&d.0);
        let mut full = ManifestSource::new(&d.0);
        inc.reload();
        full.reload();
        for step in 0..400 {
            let f = files[next(files.len() as u64) as usize];
            let path = d.0.join(f);
            match next(10) {
                0 => {
                    let _ = std::fs::remove_file(&path);
                }
                1 => {
                    d.write(f, "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namesp");
                }
                2 => {
                    d.write(f, "");
                }
                3 => {
                    d.write(f, NODE);
                }
                _ => {
                    // Services and slices that several files define, so the last file must win.
                    let mut text = String::new();
                    for _ in 0..=next(3) {
                        let n = names[next(names.len() as u64) as usize];
                        let ip = format!("10.96.0.{}", next(4) + 1);
                        let ep = format!("10.244.0.{}", next(4) + 1);
                        text += &format!("{}---\n{}---\n", service(n, &ip), slice(n, &ep));
                    }
                    d.write(f, &text);
                }
            }
            let before = inc.cluster().clone();
            // Watchers name unchanged files too (a touch, a second event for the same write).
            let also = d.0.join(files[next(files.len() as u64) as usize]);
            let r = inc.reload_paths([path, also]);
            let want = full.reload();
            assert_eq!(inc.cluster(), full.cluster(), "step {step}: {f}");
            assert_eq!(r.changed, want.changed, "step {step}");
            assert_eq!(r.errors, want.errors, "step {step}");
            let deltas = r.deltas.expect("a file, not a folder");
            assert_eq!(
                crate::stream::delta_events(&deltas),
                crate::stream::cluster_events(&before, inc.cluster(), false),
                "step {step}"
            );
            let mut patched = before.clone();
            deltas.into_iter().for_each(|d| patched.patch(d));
            assert_eq!(&patched, inc.cluster(), "step {step}: the deltas rebuild the cluster");
            assert_eq!(r.changes.services, want.changes.services, "step {step}");
            assert_eq!(r.changes.all, want.changes.all, "step {step}");
            assert!(r.changes.endpoints.is_superset(&want.changes.endpoints), "step {step}");
        }
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
