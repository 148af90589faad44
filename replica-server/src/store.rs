//! The replicas this server hosts: one `<id>.img` per replica in the storage
//! directory, its data followed by its label (see `wire::label`), which holds the
//! replica's identity, the highest owner generation that opened it and the
//! membership its owner last recorded.
//!
//! Replicas of ublkd 0.1 (`<id>.img` of the volume's size plus `<id>.meta`) are
//! adopted once, when first used: the image is extended by the label area, a label
//! is written from the meta (identity not yet bound to a volume uuid: the next
//! owner's OPEN binds it), and the meta is renamed to `<id>.meta.v1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use replication::local::{Create, LocalBacking};
use serde::Deserialize;
use wire::control::{Capacity, DeleteReply, DeleteRequest, LabelUpdate, OpenReply, OpenRequest};
use wire::frame::Status;
use wire::label::{AreaRead, Label, LABEL_AREA, MAX_MEMBERS};
use wire::names::valid_name;
use wire::{Generation, OwnerId, SessionId, VolumeTag, VolumeUuid};

/// A refusal: the status to answer, its `aux`, and a message for the owner's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: Status,
    pub aux: u64,
    pub message: String,
}

fn refused(status: Status, message: impl Into<String>) -> Refused {
    Refused {
        status,
        aux: 0,
        message: message.into(),
    }
}

fn io_refused(message: impl Into<String>) -> Refused {
    Refused {
        status: Status::IoError,
        aux: libc::EIO as u64,
        message: message.into(),
    }
}

/// Whether an owner at `generation`/`owner` may claim a replica whose label is
/// `label` (protocol section 8): a generation above the label's, or the same
/// activation again; `Ok(true)` for the latter. FENCED with `refusal` otherwise.
fn claim(
    label: &Label,
    generation: Generation,
    owner: OwnerId,
    refusal: impl FnOnce() -> String,
) -> Result<bool, Refused> {
    let same_owner = generation == label.generation && owner == label.owner;
    if generation < label.generation || (generation == label.generation && !same_owner) {
        return Err(Refused {
            status: Status::Fenced,
            aux: label.generation.0,
            message: refusal(),
        });
    }
    Ok(same_owner)
}

/// One hosted replica, shared by every connection that uses it.
pub struct Hosted {
    pub backing: Arc<LocalBacking>,
    /// The label as on disk; changed only under this lock, written before it is
    /// released.
    label: Mutex<Label>,
    /// Mirrors `label.generation` for the per-frame fence check.
    generation: AtomicU64,
    /// The session of the latest accepted OPEN: a reconnecting owner supersedes its
    /// old connection, whose late frames must not land after it.
    session: AtomicU64,
    /// Fenced requests hold it shared from their generation check to their
    /// completion; an OPEN that changes the generation or session holds it
    /// exclusively.
    pub fence: tokio::sync::RwLock<()>,
    pub volume_tag: VolumeTag,
    pub size: u64,
    cheap_zeroing: bool,
    /// Set (under the fence) by a DELETE: an OPEN that found this replica before it
    /// went must not hand out a session to an unlinked file.
    deleted: std::sync::atomic::AtomicBool,
}

impl Hosted {
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::SeqCst))
    }

    pub fn current_session(&self) -> SessionId {
        SessionId(self.session.load(Ordering::SeqCst))
    }

    pub fn label(&self) -> Label {
        self.label.lock().unwrap().clone()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// NOT_FOUND once a DELETE removed it (checked under the fence, which the
    /// DELETE held when it marked it).
    fn not_deleted(&self, id: &str) -> Result<(), Refused> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(refused(
                Status::NotFound,
                format!("replica {id} was deleted"),
            ));
        }
        Ok(())
    }

    /// SET_LABEL (the caller checked the session and holds the fence shared).
    pub fn set_label(&self, update: &LabelUpdate) -> Result<(), Refused> {
        if update.membership.members.len() > MAX_MEMBERS {
            return Err(refused(Status::Invalid, "too many members"));
        }
        let mut label = self.label.lock().unwrap();
        let mut next = label.clone();
        next.membership = update.membership.clone();
        next.outdated = update.outdated;
        self.backing
            .write_label(&next)
            .map_err(|e| io_refused(e.to_string()))?;
        *label = next;
        Ok(())
    }
}

/// What an accepted OPEN gives the connection.
pub struct Opened {
    pub hosted: Arc<Hosted>,
    pub session: SessionId,
    pub reply: OpenReply,
}

pub struct Store {
    dir: PathBuf,
    hosted: Mutex<HashMap<String, Arc<Hosted>>>,
    /// Held from an OPEN's lookup to its create: two OPENs creating one id must
    /// not both build `<id>.img.new` (the loser's session would end on an
    /// unlinked file, and every write it took would be gone at the next restart).
    creating: Mutex<()>,
}

/// What `<id>.meta` held in ublkd 0.1.
#[derive(Deserialize)]
struct MetaV1 {
    volume: String,
    size: u64,
    block_size: u32,
    generation: u64,
    owner: u64,
    #[serde(default)]
    stale: bool,
}

impl Store {
    pub fn new(dir: PathBuf) -> std::io::Result<Store> {
        std::fs::create_dir_all(&dir)?;
        Ok(Store {
            dir,
            hosted: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    fn meta_v1(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.meta"))
    }

    /// Space of the storage directory.
    pub fn capacity(&self) -> Capacity {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs fills the struct we pass.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Capacity {
                total_bytes: 0,
                free_bytes: 0,
            };
        }
        Capacity {
            total_bytes: st.f_blocks * st.f_frsize,
            free_bytes: st.f_bavail * st.f_frsize,
        }
    }

    /// The hosted replica `id`, opening it from disk if needed; `None` if the
    /// server has no such replica.
    pub fn load(&self, id: &str) -> Result<Option<Arc<Hosted>>, Refused> {
        if !valid_name(id) {
            return Err(refused(
                Status::Invalid,
                format!("invalid replica id {id:?}"),
            ));
        }
        let mut map = self.hosted.lock().unwrap();
        if let Some(h) = map.get(id) {
            return Ok(Some(h.clone()));
        }
        let img = self.image(id);
        let legacy = self.meta_v1(id);
        let (backing, label) = if legacy.exists() {
            self.adopt_v1(id, &img, &legacy)?
        } else {
            let len = match std::fs::metadata(&img) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_refused(format!("{}: {e}", img.display()))),
            };
            if len < LABEL_AREA {
                return Err(io_refused(format!(
                    "{}: {len} bytes is too short to hold a label",
                    img.display()
                )));
            }
            // A layered image is longer than its data and label: its trailer says.
            let size = snapshot::flat::volume_size_of(&img)
                .map_err(|e| io_refused(format!("{}: {e}", img.display())))?;
            let backing = LocalBacking::open(&img, size, Create::Never)
                .map_err(|e| io_refused(e.to_string()))?;
            match backing
                .read_label()
                .map_err(|e| io_refused(e.to_string()))?
            {
                AreaRead::Label { label, .. } if label.size == size => (backing, label),
                AreaRead::Label { label, .. } => {
                    return Err(io_refused(format!(
                        "{}: label says {} bytes, the image holds {}",
                        img.display(),
                        label.size,
                        size
                    )))
                }
                AreaRead::NoLabel => {
                    return Err(io_refused(format!(
                        "{}: no label (not a replica made by ublkd?)",
                        img.display()
                    )))
                }
            }
        };
        let h = Arc::new(Self::hosted(backing, label));
        map.insert(id.to_string(), h.clone());
        Ok(Some(h))
    }

    fn hosted(backing: LocalBacking, label: Label) -> Hosted {
        Hosted {
            cheap_zeroing: backing.cheap_zeroing(),
            backing: Arc::new(backing),
            generation: AtomicU64::new(label.generation.0),
            session: AtomicU64::new(0),
            fence: tokio::sync::RwLock::new(()),
            volume_tag: VolumeTag::of(&label.volume),
            size: label.size,
            label: Mutex::new(label),
            deleted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn adopt_v1(
        &self,
        id: &str,
        img: &Path,
        meta: &Path,
    ) -> Result<(LocalBacking, Label), Refused> {
        let bytes =
            std::fs::read(meta).map_err(|e| io_refused(format!("{}: {e}", meta.display())))?;
        let m: MetaV1 = serde_json::from_slice(&bytes).map_err(|e| {
            io_refused(format!("{}: corrupt replica metadata: {e}", meta.display()))
        })?;
        let backing = LocalBacking::open(img, m.size, Create::Never)
            .map_err(|e| io_refused(e.to_string()))?;
        let label = match backing
            .read_label()
            .map_err(|e| io_refused(e.to_string()))?
        {
            // A label already written: an adoption interrupted before the rename.
            AreaRead::Label { label, .. } => label,
            AreaRead::NoLabel => {
                let mut l = Label::new(
                    &m.volume,
                    VolumeUuid::default(),
                    wire::ReplicaUuid::random(),
                    m.size,
                    m.block_size,
                )
                .checked()
                .map_err(|e| io_refused(format!("{}: {e}", meta.display())))?;
                l.generation = Generation(m.generation);
                l.owner = OwnerId(m.owner);
                l.outdated = m.stale;
                backing
                    .write_label(&l)
                    .map_err(|e| io_refused(e.to_string()))?;
                l
            }
        };
        let mut kept = meta.as_os_str().to_owned();
        kept.push(".v1");
        std::fs::rename(meta, &kept).map_err(|e| io_refused(format!("{}: {e}", meta.display())))?;
        tracing::info!(replica = id, volume = %label.volume, "adopted a replica of ublkd 0.1 (label written, meta kept as .meta.v1)");
        Ok((backing, label))
    }

    /// Create replica `id` for `req`: the image gets its label under a temporary
    /// name and is renamed into place, so an `<id>.img` always has one.
    fn create(&self, req: &OpenRequest, uuid: wire::ReplicaUuid) -> Result<Arc<Hosted>, Refused> {
        let img = self.image(&req.replica);
        let tmp = self.dir.join(format!("{}.img.new", req.replica));
        let _ = std::fs::remove_file(&tmp);
        let backing = LocalBacking::open(&tmp, req.size, Create::IfMissing)
            .map_err(|e| io_refused(e.to_string()))?;
        let label = Label::new(&req.volume, req.volume_uuid, uuid, req.size, req.block_size);
        backing
            .write_label(&label)
            .map_err(|e| io_refused(e.to_string()))?;
        std::fs::rename(&tmp, &img)
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(|e| io_refused(format!("{}: {e}", img.display())))?;
        tracing::info!(replica = %req.replica, volume = %req.volume, size = req.size, %uuid, "replica created");
        let h = Arc::new(Self::hosted(backing, label));
        self.hosted
            .lock()
            .unwrap()
            .insert(req.replica.clone(), h.clone());
        Ok(h)
    }

    /// OPEN: find or create the replica, check its identity, raise its generation.
    pub async fn open(&self, req: &OpenRequest) -> Result<Opened, Refused> {
        if !valid_name(&req.replica) || !valid_name(&req.volume) {
            return Err(refused(
                Status::Invalid,
                format!(
                    "invalid replica id {:?} or volume name {:?}",
                    req.replica, req.volume
                ),
            ));
        }
        if req.generation == Generation(0) {
            return Err(refused(
                Status::Invalid,
                "generation 0 is reserved (a fresh replica holds it)",
            ));
        }
        if req.generation >= Generation::LIMIT {
            return Err(refused(
                Status::Invalid,
                format!(
                    "generation {} is past any real history (limit {}): no owner could open the replica after it",
                    req.generation.0,
                    Generation::LIMIT.0
                ),
            ));
        }
        if req.volume_uuid.is_nil() {
            return Err(refused(Status::Invalid, "nil volume uuid"));
        }
        if !matches!(req.block_size, 512 | 4096)
            || req.size == 0
            || !req.size.is_multiple_of(req.block_size as u64)
        {
            return Err(refused(
                Status::Invalid,
                format!(
                    "bad geometry: size {} block size {}",
                    req.size, req.block_size
                ),
            ));
        }
        let (hosted, created) = {
            let _one = self.creating.lock().unwrap();
            match self.load(&req.replica)? {
                Some(h) => (h, false),
                None => match req.create {
                    Some(uuid) => (self.create(req, uuid)?, true),
                    None => {
                        return Err(refused(
                            Status::NotFound,
                            format!(
                                "no replica {} on this server (and OPEN did not ask to create it)",
                                req.replica
                            ),
                        ))
                    }
                },
            }
        };
        {
            let l = hosted.label.lock().unwrap();
            if l.volume != req.volume
                || (!l.volume_uuid.is_nil() && l.volume_uuid != req.volume_uuid)
            {
                return Err(refused(
                    Status::Conflict,
                    format!(
                        "replica {} belongs to volume {:?} ({}), not {:?} ({})",
                        req.replica, l.volume, l.volume_uuid, req.volume, req.volume_uuid
                    ),
                ));
            }
            if l.size != req.size || l.block_size != req.block_size {
                return Err(refused(
                    Status::Conflict,
                    format!(
                        "replica {} is {} bytes / {} B blocks, the volume wants {} / {}",
                        req.replica, l.size, l.block_size, req.size, req.block_size
                    ),
                ));
            }
        }
        // Wait for requests admitted under the old generation or session, then
        // raise it durably.
        let _excl = hosted.fence.write().await;
        hosted.not_deleted(&req.replica)?;
        let mut label = hosted.label.lock().unwrap();
        let same_owner = claim(&label, req.generation, req.owner, || {
            format!(
                "generation {} is not above the replica's {}",
                req.generation.0, label.generation.0
            )
        })?;
        let (previous_generation, previous_owner) = (label.generation, label.owner);
        if !same_owner || label.volume_uuid.is_nil() {
            let mut next = label.clone();
            next.generation = req.generation;
            next.owner = req.owner;
            next.volume_uuid = req.volume_uuid;
            hosted
                .backing
                .write_label(&next)
                .map_err(|e| io_refused(e.to_string()))?;
            *label = next;
            hosted
                .generation
                .store(label.generation.0, Ordering::SeqCst);
            tracing::info!(replica = %req.replica, volume = %req.volume, generation = label.generation.0,
                "replica opened by a new owner generation");
        } else {
            tracing::info!(replica = %req.replica, volume = %req.volume, generation = label.generation.0,
                "replica reopened by its owner (same generation: a reconnect)");
        }
        let session = SessionId(wire::random::u64());
        hosted.session.store(session.0, Ordering::SeqCst);
        let reply = OpenReply {
            session,
            label: label.clone(),
            created,
            previous_generation,
            previous_owner,
            cheap_zeroing: hosted.cheap_zeroing,
            instance: None,
        };
        drop(label);
        Ok(Opened {
            hosted: hosted.clone(),
            session,
            reply,
        })
    }

    /// DELETE: remove a replica its owner retired. The label must name the
    /// request's volume and replica uuids (so a replica created since under the
    /// same id is never the one removed) and the request's generation and owner
    /// must be allowed to OPEN it (a fenced-out owner deletes nothing).
    pub async fn delete(&self, req: &DeleteRequest) -> Result<DeleteReply, Refused> {
        let hosted = self.load(&req.replica)?.ok_or_else(|| {
            refused(
                Status::NotFound,
                format!("no replica {} on this server", req.replica),
            )
        })?;
        // In-flight requests of any session finish first; later ones get NOT_OPEN.
        let _excl = hosted.fence.write().await;
        let label = hosted.label.lock().unwrap().clone();
        hosted.not_deleted(&req.replica)?;
        if label.volume_uuid != req.volume_uuid || label.replica_uuid != req.replica_uuid {
            return Err(refused(
                Status::Conflict,
                format!(
                    "replica {} is {} of volume {:?} ({}), not the {} of {} the request names: not deleted",
                    req.replica,
                    label.replica_uuid,
                    label.volume,
                    label.volume_uuid,
                    req.replica_uuid,
                    req.volume_uuid
                ),
            ));
        }
        claim(&label, req.generation, req.owner, || {
            format!(
                "generation {} may not delete replica {} (its generation is {})",
                req.generation.0, req.replica, label.generation.0
            )
        })?;
        let img = self.image(&req.replica);
        let freed_bytes = std::fs::metadata(&img)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        // A session still attached gets NOT_OPEN from now on: the replica is gone,
        // which is not a newer owner (FENCED would stop its owner's whole volume).
        hosted.deleted.store(true, Ordering::SeqCst);
        {
            let mut map = self.hosted.lock().unwrap();
            if map
                .get(&req.replica)
                .is_some_and(|h| Arc::ptr_eq(h, &hosted))
            {
                map.remove(&req.replica);
            }
        }
        std::fs::remove_file(&img)
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(|e| io_refused(format!("{}: {e}", img.display())))?;
        let mut v1 = self.meta_v1(&req.replica).into_os_string();
        v1.push(".v1");
        let _ = std::fs::remove_file(v1);
        tracing::info!(replica = %req.replica, volume = %label.volume, uuid = %label.replica_uuid,
            freed_bytes, "replica deleted (retired by its owner)");
        Ok(DeleteReply { freed_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::ReplicaUuid;

    fn req(id: &str, volume: &str, vu: VolumeUuid, generation: u64, create: bool) -> OpenRequest {
        OpenRequest {
            replica: id.into(),
            volume: volume.into(),
            volume_uuid: vu,
            size: 1 << 20,
            block_size: 4096,
            generation: Generation(generation),
            owner: OwnerId(7),
            create: create.then(ReplicaUuid::random),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn create_open_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let vu = VolumeUuid::random();
        let rt = rt();
        let store = Store::new(dir.path().to_path_buf()).unwrap();
        let e = rt
            .block_on(store.open(&req("r", "v", vu, 1, false)))
            .err()
            .unwrap();
        assert_eq!(e.status, Status::NotFound, "never created without asking");
        let o = rt
            .block_on(store.open(&req("r", "v", vu, 1, true)))
            .ok()
            .unwrap();
        assert!(o.reply.created);
        assert_eq!(o.reply.label.generation, Generation(1));
        // Another volume (by name or uuid) is refused, never overwritten.
        let e = rt
            .block_on(store.open(&req("r", "w", vu, 2, true)))
            .err()
            .unwrap();
        assert_eq!(e.status, Status::Conflict);
        let e = rt
            .block_on(store.open(&req("r", "v", VolumeUuid::random(), 2, true)))
            .err()
            .unwrap();
        assert_eq!(e.status, Status::Conflict);
        // A lower generation is fenced.
        let e = rt
            .block_on(store.open(&req("r", "v", vu, 0, false)))
            .err()
            .unwrap();
        assert_eq!(e.status, Status::Invalid);
        let mut r = req("r", "v", vu, 1, false);
        r.owner = OwnerId(8);
        let e = rt.block_on(store.open(&r)).err().unwrap();
        assert_eq!((e.status, e.aux), (Status::Fenced, 1));
        // After a restart of the server, the label is read back from the image.
        drop(o);
        drop(store);
        let store = Store::new(dir.path().to_path_buf()).unwrap();
        let o = rt
            .block_on(store.open(&req("r", "v", vu, 5, false)))
            .ok()
            .unwrap();
        assert!(!o.reply.created);
        assert_eq!(o.reply.previous_generation, Generation(1));
        assert_eq!(
            store.load("r").unwrap().unwrap().label().generation,
            Generation(5)
        );
    }

    /// (S) OPENs creating one replica id at once all end on the same replica,
    /// the one whose image is in place: none on an unlinked file whose writes a
    /// restart would lose.
    #[test]
    fn concurrent_creates_of_one_id_share_one_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new(dir.path().to_path_buf()).unwrap());
        let vu = VolumeUuid::random();
        for round in 0..20 {
            let id = format!("r{round}");
            let start = Arc::new(std::sync::Barrier::new(4));
            let opened: Vec<Arc<Hosted>> = (0..4)
                .map(|_| {
                    let (store, start, id) = (store.clone(), start.clone(), id.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let r = req(&id, "v", vu, 1, true);
                        match rt().block_on(store.open(&r)) {
                            Ok(o) => o.hosted,
                            Err(e) => panic!("{id}: {e:?}"),
                        }
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            for h in &opened[1..] {
                assert!(Arc::ptr_eq(h, &opened[0]), "{id}: two replicas created");
            }
            assert!(!dir.path().join(format!("{id}.img.new")).exists());
        }
    }

    /// (T) An OPEN at a generation no history reaches is refused: accepted, it
    /// would leave a replica no later owner could open.
    #[test]
    fn a_generation_past_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf()).unwrap();
        let vu = VolumeUuid::random();
        for g in [u64::MAX, 1 << 63] {
            let e = rt()
                .block_on(store.open(&req("r", "v", vu, g, true)))
                .err()
                .unwrap();
            assert_eq!(e.status, Status::Invalid, "generation {g}");
        }
        assert!(rt()
            .block_on(store.open(&req("r", "v", vu, (1 << 63) - 1, true)))
            .is_ok());
    }

    #[test]
    fn a_v1_replica_is_adopted_once() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("old.img");
        std::fs::write(&img, vec![0xab; 1 << 20]).unwrap();
        std::fs::write(
            dir.path().join("old.meta"),
            r#"{"version":1,"replica":"old","volume":"v","size":1048576,"block_size":4096,"generation":4,"owner":9,"stale":true}"#,
        )
        .unwrap();
        let store = Store::new(dir.path().to_path_buf()).unwrap();
        let h = store.load("old").unwrap().unwrap();
        let l = h.label();
        assert_eq!(
            (l.generation, l.owner, l.outdated),
            (Generation(4), OwnerId(9), true)
        );
        assert!(l.volume_uuid.is_nil());
        assert!(!dir.path().join("old.meta").exists() && dir.path().join("old.meta.v1").exists());
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            (1 << 20) + LABEL_AREA
        );
        // The data is untouched; the first OPEN binds the volume uuid.
        let data = std::fs::read(&img).unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 0xab));
        let vu = VolumeUuid::random();
        let o = rt()
            .block_on(store.open(&req("old", "v", vu, 5, false)))
            .ok()
            .unwrap();
        assert_eq!(o.reply.label.volume_uuid, vu);
    }
}
