//! Loads a plugin snapshot into this worker: `dlopen` with `RTLD_NOW`, the header checks, the
//! vtable's hooks copied out, the [`HostContext`] (with [`callbacks`](super::callbacks)' and
//! [`metrics_abi`](super::metrics_abi)'s functions) and the `on_worker_start` hook; at the end,
//! `on_worker_stop`. The per-request calls on the [`LoadedPlugin`] are
//! [`calls`](super::calls)'.
//!
//! It checks the exported header field by field (magic first, then ABI major and minor, struct
//! sizes, `plugin-api` version) before it touches the vtable, and refuses a mismatch with
//! expected vs. found. A library is never `dlclose`d: the worker exits instead, so plugin statics,
//! thread-locals and response buffers the host still holds stay valid for the life of the process.
//! It does not decide *which* file to load (the master does) and does no networking.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use plugin_api::ffi::{
    self, ErrorBuf, HostContext, PluginHeader, RawAsyncRequest, RawAsyncResponse, RawRequest,
    RawResponse, RawStr,
};

use super::callbacks::{CANCEL_VTABLE, plugin_log, plugin_panicked, plugin_restart_worker};

use crate::protocol::PluginInfo;

/// A plugin file that could not be loaded or started.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct LoadPluginError {
    pub path: PathBuf,
    #[source]
    pub kind: LoadError,
}

/// Why a plugin could not be loaded or started; messages say expected vs. found.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load shared library: {message}")]
    Open { message: String },
    #[error("not a plugin: no `host_plugin_entry_v1` symbol ({message})")]
    NoEntry { message: String },
    #[error("not a plugin: the entry point returned no header")]
    NullHeader,
    #[error("not a plugin: bad header magic {found:#018x} (expected {expected:#018x})")]
    Magic { expected: u64, found: u64 },
    #[error(
        "incompatible plugin ABI: expected major {expected}, found {found_major}.{found_minor}"
    )]
    AbiMajor {
        expected: u32,
        found_major: u32,
        found_minor: u32,
    },
    #[error(
        "plugin needs ABI {expected_major}.{found} but this host supports up to {expected_major}.{expected}"
    )]
    AbiMinor {
        expected_major: u32,
        expected: u32,
        found: u32,
    },
    #[error("plugin {what} is {found} bytes, expected at least {expected}")]
    Size {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("incompatible plugin-api version: expected {expected}, found {found}")]
    ApiVersion { expected: String, found: String },
    #[error("plugin header field `{field}` is not valid UTF-8")]
    Utf8 { field: &'static str },
    #[error("{name} {version}: on_worker_start failed: {reason}")]
    StartFailed {
        name: String,
        version: String,
        reason: String,
    },
}

/// The plugin's hooks, copied out of its vtable (whose size depends on its ABI minor).
pub(super) struct Hooks {
    on_worker_start:
        unsafe extern "C" fn(*const HostContext, *mut *mut c_void, *mut ErrorBuf) -> bool,
    pub(super) handle: unsafe extern "C" fn(*const c_void, *const RawRequest, *mut RawResponse),
    pub(super) free_response: unsafe extern "C" fn(*mut c_void),
    on_worker_stop: unsafe extern "C" fn(*mut c_void),
    /// `None` for an ABI 1.0 plugin: every call may block.
    pub(super) may_block: Option<unsafe extern "C" fn(*const c_void, RawStr, RawStr) -> bool>,
    /// ABI 1.3: `None` for older plugins (no async handlers, no drain signal).
    pub(super) async_hooks: Option<AsyncHooks>,
    /// ABI 1.6: whether the plugin reads each request's header-name codes.
    pub(super) reads_name_codes: bool,
    /// ABI 1.7: the gateway event handler; `None` for older plugins and those handling none.
    pub(super) on_gateway_event: Option<
        unsafe extern "C" fn(
            *const c_void,
            *const ffi::RawGatewayEvent,
        ) -> async_ffi::FfiFuture<ffi::RawGatewayOutcome>,
    >,
}

pub(super) struct AsyncHooks {
    pub(super) dispatch: unsafe extern "C" fn(*const c_void, RawStr, RawStr) -> u8,
    pub(super) serve: unsafe extern "C" fn(
        *const c_void,
        *const RawAsyncRequest,
    ) -> async_ffi::FfiFuture<RawAsyncResponse>,
    pub(super) on_drain: unsafe extern "C" fn(*const c_void),
}

/// A loaded, started plugin: its hooks and the per-worker state `on_worker_start` built.
pub struct LoadedPlugin {
    pub(super) hooks: Hooks,
    /// The plugin's per-worker state, live until [`LoadedPlugin::stop`] (which consumes `self`).
    pub(super) state: *mut c_void,
    pub info: PluginInfo,
    /// CLOCK_MONOTONIC when `dlopen` and the header checks were done (before `on_worker_start`).
    pub loaded_at_ns: u64,
}

// SAFETY: `state` is a `Box<P>` where `P: Plugin: Send + Sync` (enforced by `export_plugin!`),
// and the vtable functions are documented as callable from any thread at once.
unsafe impl Send for LoadedPlugin {}
// SAFETY: as above; `handle` takes `&self` and the plugin's `handle` takes `&P`.
unsafe impl Sync for LoadedPlugin {}

/// Two `plugin-api` versions are compatible when they agree on the first non-zero component
/// (semver): 1.2.x works with 1.5.y, 0.1.x with 0.1.y, but not 0.1.x with 0.2.y.
fn api_compatible(host: &str, plugin: &str) -> bool {
    let parse = |s: &str| -> Option<(u64, u64)> {
        let mut it = s.split(['.', '-', '+']);
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(host), parse(plugin)) {
        (Some((hm, hn)), Some((pm, pn))) => hm == pm && (hm != 0 || hn == pn),
        _ => false,
    }
}

fn api_requirement(host: &str) -> String {
    let mut it = host.split('.');
    match (it.next(), it.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}.x"),
        (Some(major), _) => format!("{major}.x"),
        _ => host.to_string(),
    }
}

/// Reads a header string; the plugin guarantees header strings are `'static`.
fn header_str(raw: RawStr, field: &'static str) -> Result<String, LoadError> {
    // SAFETY: header strings point to the plugin's `'static` data, and the library is never unloaded.
    let bytes = unsafe { raw.as_bytes() };
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| LoadError::Utf8 { field })
}

/// Where a worker is: passed to the plugin's `on_worker_start`.
pub struct Placement {
    pub slot: u32,
    pub generation: u64,
    pub sha256: String,
    /// The generation's `[plugin_config]` as JSON text, for `HostContext::config`.
    pub config: String,
    /// The config file's directory, for `HostContext::config_dir`.
    pub config_dir: String,
    /// Whether this is `host check`'s throwaway worker, for `HostContext::check`.
    pub check: bool,
    /// Whether the worker has gateway links, for `HostContext::gateway` (null without).
    pub gateway: bool,
}

/// Loads the plugin at `path`, checks it, and runs its `on_worker_start`.
pub fn load(path: &Path, at: &Placement) -> Result<LoadedPlugin, LoadPluginError> {
    load_checked(path, at).map_err(|kind| LoadPluginError {
        path: path.to_path_buf(),
        kind,
    })
}

fn load_checked(path: &Path, at: &Placement) -> Result<LoadedPlugin, LoadError> {
    // SAFETY: loading a library runs its initializers. The master hands us a private snapshot of
    // a file the operator configured as this host's plugin, and `RTLD_NOW` resolves every symbol
    // up front so a missing one fails here rather than mid-request. `RTLD_LOCAL` keeps its
    // symbols out of the global namespace.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        LoadError::Open {
            message: e.to_string(),
        }
    })?;
    // SAFETY: the symbol, if present, is the `export_plugin!` entry point whose type is `EntryFn`;
    // a library that exports the name with another type is outside the contract we document.
    let entry: ffi::EntryFn = unsafe { lib.get::<ffi::EntryFn>(ffi::ENTRY_SYMBOL) }
        .map(|s| *s)
        .map_err(|e| LoadError::NoEntry {
            message: e.to_string(),
        })?;
    // Never dlclose: the worker exits instead (see the module doc).
    std::mem::forget(lib);

    // SAFETY: `entry` takes no arguments and returns a pointer to a `'static` header.
    let header_ptr = unsafe { entry() };
    if header_ptr.is_null() {
        return Err(LoadError::NullHeader);
    }
    // SAFETY: non-null and `'static`; the first three fields (magic, ABI major, minor) sit at the
    // same offsets in every ABI version, so reading them is valid before we know the version.
    let (magic, abi_major, abi_minor) = unsafe {
        let h = header_ptr;
        (
            std::ptr::addr_of!((*h).magic).read(),
            std::ptr::addr_of!((*h).abi_major).read(),
            std::ptr::addr_of!((*h).abi_minor).read(),
        )
    };
    if magic != ffi::MAGIC {
        return Err(LoadError::Magic {
            expected: ffi::MAGIC,
            found: magic,
        });
    }
    if abi_major != ffi::ABI_MAJOR {
        return Err(LoadError::AbiMajor {
            expected: ffi::ABI_MAJOR,
            found_major: abi_major,
            found_minor: abi_minor,
        });
    }
    if abi_minor > ffi::ABI_MINOR {
        return Err(LoadError::AbiMinor {
            expected_major: ffi::ABI_MAJOR,
            expected: ffi::ABI_MINOR,
            found: abi_minor,
        });
    }
    // SAFETY: same major, so `header_size` is at its documented offset.
    let header_size = unsafe { std::ptr::addr_of!((*header_ptr).header_size).read() } as usize;
    if header_size < size_of::<PluginHeader>() {
        return Err(LoadError::Size {
            what: "header",
            expected: size_of::<PluginHeader>(),
            found: header_size,
        });
    }
    // SAFETY: the header is at least as large as ours, so every field we read exists.
    let header: &'static PluginHeader = unsafe { &*header_ptr };
    let vtable_size = header.vtable_size as usize;
    if vtable_size < ffi::VTABLE_1_0_SIZE || header.vtable.is_null() {
        return Err(LoadError::Size {
            what: "vtable",
            expected: ffi::VTABLE_1_0_SIZE,
            found: vtable_size,
        });
    }
    let api_version = header_str(header.api_version, "api_version")?;
    if !api_compatible(ffi::API_VERSION, &api_version) {
        return Err(LoadError::ApiVersion {
            expected: api_requirement(ffi::API_VERSION),
            found: api_version,
        });
    }
    let name = header_str(header.name, "name")?;
    let version = header_str(header.version, "version")?;
    let vt = header.vtable;
    // SAFETY: `vt` is non-null, `'static`, and at least the ABI 1.0 vtable's size (checked), so
    // the four 1.0 fields exist; `may_block` (1.1) and the 1.3 hooks are read only when
    // `vtable_size` covers them.
    let hooks = unsafe {
        Hooks {
            on_worker_start: std::ptr::addr_of!((*vt).on_worker_start).read(),
            handle: std::ptr::addr_of!((*vt).handle).read(),
            free_response: std::ptr::addr_of!((*vt).free_response).read(),
            on_worker_stop: std::ptr::addr_of!((*vt).on_worker_stop).read(),
            may_block: (vtable_size >= ffi::VTABLE_1_1_SIZE)
                .then(|| std::ptr::addr_of!((*vt).may_block).read()),
            async_hooks: (abi_minor >= 3 && vtable_size >= ffi::VTABLE_1_3_SIZE).then(|| {
                AsyncHooks {
                    dispatch: std::ptr::addr_of!((*vt).dispatch).read(),
                    serve: std::ptr::addr_of!((*vt).serve).read(),
                    on_drain: std::ptr::addr_of!((*vt).on_drain).read(),
                }
            }),
            reads_name_codes: abi_minor >= 6,
            on_gateway_event: (abi_minor >= 7 && vtable_size >= ffi::VTABLE_1_7_SIZE)
                .then(|| std::ptr::addr_of!((*vt).on_gateway_event).read())
                .flatten(),
        }
    };

    let loaded_at_ns = super::clock::monotonic_ns();
    let ctx = HostContext {
        size: size_of::<HostContext>() as u32,
        slot: at.slot,
        generation: at.generation,
        pid: std::process::id(),
        max_level: crate::logging::max_level_code(),
        log: plugin_log,
        restart_worker: plugin_restart_worker,
        // A view of `at.config`, which outlives the `on_worker_start` call (the plugin copies it).
        config: RawStr::new(at.config.as_bytes()),
        cancel: &CANCEL_VTABLE,
        panicked: plugin_panicked,
        // A view of `at.config_dir`, which outlives the call too.
        config_dir: RawStr::new(at.config_dir.as_bytes()),
        check: at.check,
        metrics: &super::metrics_abi::METRICS_VTABLE,
        header_names: ffi::head::name_views().as_ptr(),
        header_names_len: ffi::head::name_views().len(),
        gateway: match at.gateway {
            true => &super::gateway_abi::GATEWAY_VTABLE,
            false => std::ptr::null(),
        },
    };
    let mut err_storage = vec![0u8; 4096];
    let mut err = ErrorBuf {
        ptr: err_storage.as_mut_ptr(),
        cap: err_storage.len(),
        len: 0,
    };
    let mut state: *mut c_void = std::ptr::null_mut();
    // SAFETY: `ctx`, `state` and `err` are valid for the call; the shim catches panics.
    let ok = unsafe { (hooks.on_worker_start)(&ctx, &mut state, &mut err) };
    if !ok {
        let reason =
            String::from_utf8_lossy(&err_storage[..err.len.min(err_storage.len())]).into_owned();
        return Err(LoadError::StartFailed {
            name,
            version,
            reason,
        });
    }
    Ok(LoadedPlugin {
        hooks,
        state,
        info: PluginInfo {
            name,
            version,
            api_version,
            sha256: at.sha256.clone(),
        },
        loaded_at_ns,
    })
}

impl LoadedPlugin {
    /// Runs the plugin's `on_worker_stop` and frees its state. Call only once no `handle` runs.
    pub fn stop(self) {
        // SAFETY: `state` came from `on_worker_start` and, as `self` is consumed, no other call
        // can use it afterwards; the shim catches panics.
        unsafe { (self.hooks.on_worker_stop)(self.state) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_api_compatibility_follows_semver() {
        assert!(api_compatible("0.1.0", "0.1.7"));
        assert!(!api_compatible("0.1.0", "0.2.0"));
        assert!(api_compatible("1.2.0", "1.9.1"));
        assert!(!api_compatible("1.2.0", "2.0.0"));
        assert!(!api_compatible("1.2.0", "garbage"));
        assert_eq!(api_requirement("0.1.3"), "0.1.x");
        assert_eq!(api_requirement("2.4.0"), "2.x");
    }
}
