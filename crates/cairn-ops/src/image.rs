//! Disk images (files, block devices, NBD exports) in and out of the repository: a backup of
//! one image as one restore point, and the restore of a point's disk into an image.

use crate::error::{ErrorKind, OpError, OpResult};
use anyhow::{anyhow, Context};
use cairn_engine::backup::{backup, BackupOptions, DiskInput};
use cairn_engine::ranges::parse_changed_ranges;
use cairn_engine::restore::{restore_disk, RestoreOptions, RestoreReport};
use cairn_engine::source::{open_path, ImageFormat};
use cairn_engine::Progress;
use cairn_repo::PointId;
use cairn_repo::{Repository, RestorePoint};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Requests about images that cannot be carried out as given.
#[derive(Debug, thiserror::Error)]
pub enum ImageRefusal {
    /// Changed ranges need an earlier point of the same name to apply to.
    #[error("there is no earlier restore point named {0:?} to apply changed ranges to; the first backup must read everything")]
    NoParentForChanges(String),
    /// The point has several disks and none was named, or not one of them.
    #[error("{0}")]
    WhichDisk(String),
}

/// What a backup of an image reads.
#[derive(Clone, Debug)]
pub enum Changes {
    /// Everything (deduplicated against the repository).
    All,
    /// Only the ranges a file lists (`OFFSET LENGTH` per line, or JSON), over the newest point
    /// of the same name.
    RangesFile(PathBuf),
    /// Only what a dirty bitmap of the NBD export lists, over the newest point of the same name.
    DirtyBitmap(String),
}

#[derive(Clone, Debug)]
pub struct BackupImageRequest {
    /// An image file, a block device or an NBD URI.
    pub source: String,
    /// The image format when the file's own is not to be guessed.
    pub format: Option<ImageFormat>,
    pub changes: Changes,
    /// The restore point's name, and the disk's name in it.
    pub name: String,
    pub disk: String,
    pub compression_level: i32,
    pub workers: usize,
    /// How long to wait for the repository's lock.
    pub lock_wait: Duration,
}

/// Backs up one image as one restore point; returns its ID and the point.
pub fn backup_image(
    repo: &Arc<Repository>,
    req: &BackupImageRequest,
    progress: &dyn Progress,
) -> OpResult<(PointId, RestorePoint)> {
    // Temporaries of backups killed more than a day ago.
    let _ = repo.backend().remove_stale_temporaries(Duration::from_secs(24 * 3600));
    let _lock = repo.lock(false, "backup", req.lock_wait)?;
    repo.load_index()?;
    for (name, problem) in repo.damaged_index_files() {
        progress.note(&format!(
            "warning: index file {} is damaged ({problem}); its blocks will be stored again",
            &name[..8.min(name.len())]
        ));
    }
    let bitmap = match &req.changes {
        Changes::DirtyBitmap(b) => Some(b.as_str()),
        _ => None,
    };
    let mut source = open_path(&req.source, req.format, bitmap)?;
    let changed = match &req.changes {
        Changes::All => None,
        Changes::RangesFile(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read changed-ranges file {}", f.display()))?;
            let r = parse_changed_ranges(&text)?;
            if let Some(last) = r.last() {
                if last.end() > source.size() {
                    let e = anyhow!(
                        "changed range {}+{} lies beyond the end of the image ({} bytes)",
                        last.offset,
                        last.length,
                        source.size()
                    );
                    return Err(OpError::new(ErrorKind::InvalidRequest, e));
                }
            }
            Some(r)
        }
        Changes::DirtyBitmap(b) => Some(source.dirty_ranges(b)?),
    };
    let parent = if changed.is_some() {
        match repo.select_point(&req.name) {
            Ok(p) => Some(p),
            Err(cairn_repo::Error::NoSuchPoint(_)) => {
                return Err(OpError::new(ErrorKind::InvalidRequest, ImageRefusal::NoParentForChanges(req.name.clone())))
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let opts = BackupOptions {
        name: req.name.clone(),
        compression_level: req.compression_level,
        workers: req.workers,
        parent,
        ..Default::default()
    };
    let mut disk = DiskInput::new(&req.disk, source);
    disk.changed = changed;
    Ok(backup(repo, vec![disk], &opts, progress)?)
}

pub struct RestoreImageRequest {
    /// `NAME[@POINT]`.
    pub point: String,
    /// The disk of the point; may be left out when it has one.
    pub disk: Option<String>,
    /// The image file to create, or a block device to write into.
    pub to: PathBuf,
    pub options: RestoreOptions,
    pub lock_wait: Duration,
}

/// A restored image and where it came from.
pub struct RestoredImage {
    pub id: PointId,
    pub point: RestorePoint,
    pub report: RestoreReport,
}

/// Restores a point's disk into an image (hash-checked; sparse, or zeroed on a device), under
/// the repository's shared lock.
pub fn restore_image(repo: &Repository, req: &RestoreImageRequest, progress: &dyn Progress) -> OpResult<RestoredImage> {
    let _lock = repo.lock(false, "restore", req.lock_wait)?;
    repo.load_index()?;
    let (id, point) = repo.select_point(&req.point)?;
    let disk = point
        .disk(req.disk.as_deref())
        .map_err(|m| OpError::new(ErrorKind::InvalidRequest, ImageRefusal::WhichDisk(m)))?;
    let report = restore_disk(repo, &id, &point, disk, &req.to, &req.options, progress)?;
    Ok(RestoredImage { id, point, report })
}
