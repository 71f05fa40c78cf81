//! Dev mode: turns file changes into reload requests.
//!
//! Without a build step it watches the plugin file's *directory* (cargo removes and re-links the
//! file, editors and `cp` rewrite it: a watch on the file itself would not survive), keeps only
//! events that name the plugin file, and after `watch_debounce` of quiet sends one
//! [`Event::PluginChanged`]. With `build`, it watches `watch_paths` instead, runs the build
//! command after each quiet period, shows its output, and sends `PluginChanged` only when the
//! build succeeded; each build's outcome goes to the supervisor too, for `status`
//! ([`Event::Built`]). The build runs in `build_dir` (see [`super::build`]), awaited on this task,
//! never on the master's loop. A change made while a build runs cancels it (its whole process
//! group is killed) and, after `watch_debounce` of quiet, a new build starts: only a build that
//! ran from start to end with no newer change is reported or rolled out, never a stale one.
//!
//! It decides nothing about reloading: the supervisor compares the file's content hash with the
//! serving generation (and the last refused build) and skips what would change nothing.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::build::Outcome;
use super::supervisor::Event;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path} (key `{key}`)")]
    Watch {
        path: PathBuf,
        key: &'static str,
        #[source]
        source: notify::Error,
    },
}

/// What decides whether a file event matters.
enum Filter {
    /// Plugin-file mode: the event names this file.
    File(std::ffi::OsString),
    /// Build mode: any file under the roots, except build output (`target/`), hidden files
    /// (editor swap files, `.git`) and the state dir.
    Sources {
        roots: Vec<PathBuf>,
        ignore: PathBuf,
    },
}

impl Filter {
    fn matches(&self, event: &notify::Event) -> bool {
        if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
            return false;
        }
        event.paths.iter().any(|p| match self {
            Filter::File(name) => p.file_name() == Some(name.as_os_str()),
            Filter::Sources { roots, ignore } => {
                // Only what lies below a watched root counts: the root's own path may be hidden.
                let below = roots.iter().find_map(|r| p.strip_prefix(r).ok());
                below.is_some_and(|rel| {
                    !p.starts_with(ignore)
                        && !rel.components().any(|c| match c {
                            Component::Normal(s) => {
                                s == "target" || s.to_string_lossy().starts_with('.')
                            }
                            _ => false,
                        })
                })
            }
        })
    }
}

/// Starts watching as `cfg` says; the watch lives as long as the master's runtime.
pub fn spawn(cfg: &Config, events: mpsc::UnboundedSender<Event>) -> Result<(), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel::<notify::Event>();
    let filter = match &cfg.build {
        None => Filter::File(cfg.plugin.file_name().unwrap_or_default().to_os_string()),
        Some(_) => Filter::Sources {
            roots: cfg.watch_paths.clone(),
            ignore: cfg.state_dir.clone(),
        },
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if filter.matches(&event) => {
                let _ = tx.send(event);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        })
        .map_err(|source| WatchError::Watch {
            path: cfg.plugin.clone(),
            key: "watch",
            source,
        })?;
    match &cfg.build {
        None => {
            let dir = cfg.plugin.parent().unwrap_or(Path::new("/")).to_path_buf();
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Watch {
                    path: dir.clone(),
                    key: "plugin",
                    source,
                })?;
            tracing::info!(dir = %dir.display(), file = %cfg.plugin.display(), "watching the plugin file");
        }
        Some(build) => {
            for path in &cfg.watch_paths {
                watcher
                    .watch(path, RecursiveMode::Recursive)
                    .map_err(|source| WatchError::Watch {
                        path: path.clone(),
                        key: "watch_paths",
                        source,
                    })?;
            }
            tracing::info!(paths = ?cfg.watch_paths, build = %build, "watching sources; building on change");
        }
    }
    let build = cfg.build.clone();
    tokio::spawn(run(
        watcher,
        rx,
        cfg.watch_debounce,
        build,
        cfg.build_dir.clone(),
        events,
    ));
    Ok(())
}

async fn run(
    _watcher: notify::RecommendedWatcher,
    mut rx: mpsc::UnboundedReceiver<notify::Event>,
    debounce: Duration,
    build: Option<String>,
    cwd: PathBuf,
    events: mpsc::UnboundedSender<Event>,
) {
    while rx.recv().await.is_some() {
        // Until a build ends with no newer change behind it.
        loop {
            if !quiet_for(&mut rx, debounce).await {
                return;
            }
            let Some(command) = &build else {
                break;
            };
            // A change during the build cancels it: its output would be stale.
            let report = match super::build::run(command, &cwd, rx.recv()).await {
                Outcome::Done(report) => report,
                Outcome::Cancelled => continue,
            };
            // A change that came just as the build ended makes it stale too: build again, and
            // roll out (or report) only what the newest sources make.
            if !rx.is_empty() {
                tracing::info!(
                    command = %command,
                    "the sources changed as the build ended; building anew"
                );
                continue;
            }
            let ok = report.ok;
            // For `status`: a failed build shows there until one succeeds.
            if events.send(Event::Built(report)).is_err() {
                return;
            }
            if !ok {
                break;
            }
            if events.send(Event::PluginChanged).is_err() {
                return;
            }
            break;
        }
        if build.is_none() && events.send(Event::PluginChanged).is_err() {
            return;
        }
    }
}

/// Waits until nothing has happened for `debounce`; `false` when the watch is gone.
async fn quiet_for(rx: &mut mpsc::UnboundedReceiver<notify::Event>, debounce: Duration) -> bool {
    loop {
        match tokio::time::timeout(debounce, rx.recv()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str) -> notify::Event {
        notify::Event::new(EventKind::Modify(notify::event::ModifyKind::Any))
            .add_path(PathBuf::from(path))
    }

    #[test]
    fn source_filter_looks_only_below_its_roots() {
        let f = Filter::Sources {
            roots: vec!["/tmp/.hidden-root/src".into()],
            ignore: "/srv/.host".into(),
        };
        assert!(f.matches(&event("/tmp/.hidden-root/src/lib.rs")));
        assert!(!f.matches(&event("/tmp/.hidden-root/src/.lib.rs.swp")));
        assert!(!f.matches(&event("/tmp/.hidden-root/src/target/debug/x")));
        assert!(!f.matches(&event("/elsewhere/lib.rs")));
    }

    #[test]
    fn file_filter_matches_the_plugin_name_only() {
        let f = Filter::File("libp.so".into());
        assert!(f.matches(&event("/t/debug/libp.so")));
        assert!(!f.matches(&event("/t/debug/libq.so")));
        let access = notify::Event::new(EventKind::Access(notify::event::AccessKind::Any))
            .add_path("/t/debug/libp.so".into());
        assert!(!f.matches(&access));
    }
}
