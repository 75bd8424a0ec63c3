//! Watching a pool's files (`watch`): when they change, the pool rolls, as a reload of it would.
//!
//! Why: in development (PM2's `--watch`, nodemon) an app is restarted whenever its code is
//! saved. Those restart it at once, and a save that breaks it leaves nothing serving. Here a
//! change is a rollout: the new code starts beside the old, each old worker stops only once
//! its replacement is ready, and a replacement that never gets ready stops the rollout with
//! the old workers still serving.
//!
//! One inotify instance per pool, read on the runtime (no thread): a watch on every directory
//! below each watched directory (new ones are added as they appear), and for a watched file,
//! one on its directory that passes over its other entries (editors replace a file by
//! renaming a new one over it, which a watch on the file itself would not see). Changes are
//! gathered until none has come for [`QUIET`], so that a save of several files, or an
//! editor's write-then-rename, makes one rollout.
//!
//! Passed over: names starting with `.` (`.git`, editors' swap files), `node_modules`,
//! `__pycache__`, backups ending in `~`, and the pool's `watch_ignore` names.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long the files must stay unchanged before the changes count.
pub const QUIET: Duration = Duration::from_millis(300);

/// The most changed paths one report names.
const NAMED: usize = 8;

/// Directories watched at the most, per pool: a watch costs kernel memory, and a tree that
/// large (a `node_modules` not ignored) is better narrowed with `watch_ignore`.
const MAX_DIRS: usize = 8192;

/// What inotify reports of a directory's entries: created, written and closed, moved in or
/// out, deleted, and the directory itself gone.
fn flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::MOVED_TO
        | WatchFlags::MOVED_FROM
        | WatchFlags::DELETE
        | WatchFlags::DELETE_SELF
        | WatchFlags::ONLYDIR
}

/// One pool's watched files.
#[derive(Debug)]
pub struct Watcher {
    fd: AsyncFd<OwnedFd>,
    /// Each watch: its directory, and the one entry of it that counts (a watched file), if not
    /// every entry does.
    dirs: HashMap<i32, (PathBuf, Option<PathBuf>)>,
    ignore: Vec<String>,
}

impl Watcher {
    /// Watches `paths` (files, or directories with everything below them), passing over the
    /// names in `ignore` besides the usual ones. A path that cannot be watched (missing, not
    /// readable) is logged and left out.
    ///
    /// # Errors
    /// When no inotify instance can be made (the per-user limit).
    pub fn new(pool: &str, paths: &[PathBuf], ignore: &[String]) -> io::Result<Watcher> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        let mut watcher = Watcher {
            fd: crate::sys::register_fd(fd, Interest::READABLE)?,
            dirs: HashMap::new(),
            ignore: ignore.to_vec(),
        };
        for path in paths {
            let added = match std::fs::metadata(path) {
                Ok(metadata) if metadata.is_dir() => watcher.add_tree(path),
                Ok(_) => match path.parent() {
                    Some(dir) => watcher.add(dir, Some(path.clone())),
                    None => Ok(()),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = added {
                tracing::warn!(
                    event = "watch_failed",
                    pool,
                    path = %path.display(),
                    "pool {pool}: cannot watch {}: {error}; its changes will not roll the pool",
                    path.display()
                );
            }
        }
        Ok(watcher)
    }

    /// How many directories are watched.
    pub fn directories(&self) -> usize {
        self.dirs.len()
    }

    /// Waits for a change, then for [`QUIET`] without one; returns the paths changed (at most
    /// a few: enough to say why the pool rolls).
    ///
    /// # Errors
    /// When the inotify instance fails.
    pub async fn changes(&mut self) -> io::Result<Vec<PathBuf>> {
        let mut changed = Vec::new();
        while changed.is_empty() {
            self.read(&mut changed).await?;
        }
        loop {
            match tokio::time::timeout(QUIET, self.read(&mut changed)).await {
                Ok(result) => result?,
                Err(_quiet) => return Ok(named(changed)),
            }
        }
    }

    /// Reads what inotify has (waiting until it has something), adding what changed to
    /// `changed` and watches for new directories.
    async fn read(&mut self, changed: &mut Vec<PathBuf>) -> io::Result<()> {
        let mut ready = self.fd.readable().await?;
        let mut buffer = [MaybeUninit::<u8>::uninit(); 4096];
        let mut new_dirs = Vec::new();
        {
            let mut events = inotify::Reader::new(ready.get_inner(), &mut buffer);
            loop {
                let event = match events.next() {
                    Ok(event) => event,
                    Err(rustix::io::Errno::WOULDBLOCK) => break,
                    Err(error) => return Err(error.into()),
                };
                let kinds = event.events();
                if kinds.contains(ReadFlags::QUEUE_OVERFLOW) {
                    // Too many to tell which: something changed.
                    note(changed, PathBuf::from("(many files)"));
                    continue;
                }
                let Some((dir, only)) = self.dirs.get(&event.wd()) else {
                    continue;
                };
                if kinds.contains(ReadFlags::IGNORED) {
                    self.dirs.remove(&event.wd());
                    continue;
                }
                let path = match event.file_name() {
                    Some(name) => dir.join(OsStr::from_bytes(name.to_bytes())),
                    None => dir.clone(),
                };
                if only.as_ref().is_some_and(|only| *only != path) {
                    continue;
                }
                if path.file_name().is_some_and(|name| self.ignored(name)) {
                    continue;
                }
                if kinds.contains(ReadFlags::ISDIR)
                    && kinds.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO)
                {
                    new_dirs.push(path.clone());
                }
                note(changed, path);
            }
        }
        ready.clear_ready();
        drop(ready);
        for dir in new_dirs {
            // Files may have been created in it before its watch: they count as the directory.
            let _ = self.add_tree(&dir);
        }
        Ok(())
    }

    /// Watches `root` and every directory below it that is not passed over.
    fn add_tree(&mut self, root: &Path) -> io::Result<()> {
        self.add(root, None)?;
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
                if !is_dir || self.ignored(&entry.file_name()) {
                    continue;
                }
                let path = entry.path();
                if self.add(&path, None).is_ok() {
                    pending.push(path);
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, dir: &Path, only: Option<PathBuf>) -> io::Result<()> {
        if self.dirs.len() >= MAX_DIRS {
            return Err(io::Error::other(format!(
                "more than {MAX_DIRS} directories to watch: pass some over with watch_ignore"
            )));
        }
        let wd = inotify::add_watch(self.fd.get_ref(), dir, flags())?;
        match self.dirs.get_mut(&wd) {
            // Watched already (whole, or for another of its files): now every entry counts.
            Some((_, existing)) => *existing = None,
            None => {
                self.dirs.insert(wd, (dir.to_owned(), only));
            }
        }
        Ok(())
    }

    fn ignored(&self, name: &OsStr) -> bool {
        let bytes = name.as_bytes();
        bytes.starts_with(b".")
            || bytes.ends_with(b"~")
            || bytes == b"node_modules"
            || bytes == b"__pycache__"
            || self
                .ignore
                .iter()
                .any(|ignored| ignored.as_bytes() == bytes)
    }
}

/// What to name of the paths that changed: those still there (an editor's or `sed -i`'s
/// temporary files come and go within a save), or, when none is (only deletions), all of them.
fn named(changed: Vec<PathBuf>) -> Vec<PathBuf> {
    let there: Vec<PathBuf> = changed
        .iter()
        .filter(|path| path.exists())
        .cloned()
        .collect();
    if there.is_empty() { changed } else { there }
}

fn note(changed: &mut Vec<PathBuf>, path: PathBuf) {
    if changed.len() < NAMED && !changed.contains(&path) {
        changed.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The changes reported next, within a generous bound.
    async fn next(watcher: &mut Watcher) -> Vec<PathBuf> {
        tokio::time::timeout(Duration::from_secs(10), watcher.changes())
            .await
            .expect("a change within 10 s")
            .unwrap()
    }

    #[tokio::test]
    async fn a_change_below_a_watched_directory_is_reported_once_it_is_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("lib")).unwrap();
        let mut watcher = Watcher::new("web", std::slice::from_ref(&src), &[]).unwrap();
        assert_eq!(watcher.directories(), 2);
        std::fs::write(src.join("lib/a.js"), "1").unwrap();
        std::fs::write(src.join("b.js"), "2").unwrap();
        let changed = next(&mut watcher).await;
        assert_eq!(changed, [src.join("lib/a.js"), src.join("b.js")]);
    }

    #[tokio::test]
    async fn new_directories_are_watched_and_ignored_names_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let mut watcher =
            Watcher::new("web", std::slice::from_ref(&root), &["dist".to_owned()]).unwrap();
        for ignored in ["node_modules", ".git", "dist", "__pycache__"] {
            std::fs::create_dir(root.join(ignored)).unwrap();
            std::fs::write(root.join(ignored).join("x"), "x").unwrap();
        }
        std::fs::write(root.join("app.js~"), "backup").unwrap();
        std::fs::create_dir(root.join("routes")).unwrap();
        // Only what follows counts; what came before was passed over, or is the directory.
        let changed = next(&mut watcher).await;
        assert_eq!(changed, [root.join("routes")]);
        std::fs::write(root.join("routes/users.js"), "x").unwrap();
        assert_eq!(next(&mut watcher).await, [root.join("routes/users.js")]);
        assert_eq!(watcher.directories(), 2, "the root and routes");
    }

    #[tokio::test]
    async fn a_watched_file_replaced_by_a_rename_is_seen_and_its_neighbours_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app.js");
        std::fs::write(&app, "1").unwrap();
        let mut watcher = Watcher::new("web", std::slice::from_ref(&app), &[]).unwrap();
        std::fs::write(dir.path().join("other.js"), "x").unwrap();
        // As editors save: a new file renamed over the old one.
        std::fs::write(dir.path().join("app.js.new"), "2").unwrap();
        std::fs::rename(dir.path().join("app.js.new"), &app).unwrap();
        assert_eq!(next(&mut watcher).await, [app]);
    }

    #[tokio::test]
    async fn a_save_through_a_temporary_file_names_the_file_saved_and_a_deletion_itself() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::write(root.join("app.js"), "1").unwrap();
        let mut watcher = Watcher::new("web", std::slice::from_ref(&root), &[]).unwrap();
        // As `sed -i` saves: a temporary file, renamed over the file.
        std::fs::write(root.join("sedAb12Cd"), "2").unwrap();
        std::fs::rename(root.join("sedAb12Cd"), root.join("app.js")).unwrap();
        assert_eq!(next(&mut watcher).await, [root.join("app.js")]);
        std::fs::remove_file(root.join("app.js")).unwrap();
        assert_eq!(next(&mut watcher).await, [root.join("app.js")]);
    }

    #[tokio::test]
    async fn a_missing_path_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let watcher = Watcher::new("web", &[dir.path().join("nope")], &[]).unwrap();
        assert_eq!(watcher.directories(), 0);
    }
}
