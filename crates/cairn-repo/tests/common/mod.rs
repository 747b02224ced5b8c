//! What the repository tests share: repositories in temporary folders, distinct blocks, and
//! restore points stored and read back through the real write and read paths.
#![allow(dead_code)]

use cairn_repo::crypto::Compressor;
use cairn_repo::pack::{BlobEntry, BlobKind, SealedFrame};
use cairn_repo::{DiskImage, PointStats, Repository, RestorePoint, Session};
use cairn_storage::{Backend, LocalBackend};
use std::path::Path;
use std::sync::Arc;

pub const BS: usize = 65536;

pub fn local(dir: &Path) -> Arc<dyn Backend> {
    Arc::new(LocalBackend::new(dir))
}

pub fn pw(p: &str) -> impl FnOnce() -> Option<String> + '_ {
    move || Some(p.to_string())
}

/// Distinct, incompressible blocks: block `i` of `seed` differs from every other block of
/// every seed (xorshift64 seeded by both).
pub fn blocks(seed: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut x = ((seed as u64) << 32 | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut out = Vec::with_capacity(BS);
            while out.len() < BS {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.extend_from_slice(&x.to_le_bytes());
            }
            out
        })
        .collect()
}

/// Stores `data` as a one-disk restore point through a session; returns its ID.
pub fn store_point(repo: &Arc<Repository>, name: &str, data: &[Vec<u8>]) -> cairn_repo::Result<cairn_repo::PointId> {
    let mut s = Session::new(repo.clone());
    let mut c = Compressor::new(1);
    let claims = s.claims();
    let mut ids = Vec::new();
    for b in data {
        let id = repo.crypto().block_id(b);
        if claims.claim(&id) {
            let blob = BlobEntry { kind: BlobKind::Data, id, raw_offset: 0, len: b.len() as u32 };
            s.add_frame(SealedFrame::build(repo.crypto(), &mut c, b, vec![blob]))?;
        }
        ids.push(id);
    }
    let page = s.store_map_page(&ids)?;
    let mut point = RestorePoint {
        version: 1,
        name: name.into(),
        time: cairn_repo::now_rfc3339(),
        hostname: "test".into(),
        source: "test".into(),
        parent: None,
        disks: vec![DiskImage {
            name: "disk0".into(),
            size: (data.len() * BS) as u64,
            block_size: BS as u32,
            source: "test".into(),
            map: vec![page.to_hex()],
            stats: Default::default(),
            role: None,
            path: None,
        }],
        metadata: serde_json::Value::Null,
        stats: PointStats::default(),
        locked_until: None,
    };
    s.commit(&mut point)
}

/// Reads every block of a point back through the repository.
pub fn read_point(repo: &Repository, id: &cairn_repo::PointId) -> cairn_repo::Result<Vec<Vec<u8>>> {
    let p = repo.load_point(id)?;
    let page = repo.read_map_page(&p.disks[0], 0)?;
    page.iter().map(|b| repo.read_blob(b, "test")).collect()
}
