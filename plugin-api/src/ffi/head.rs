//! The head of a request or a response across the ABI: the HTTP version's code, a header map's
//! borrowed [`RawHeader`] views, and views copied back into a `HeaderMap`.
//!
//! ABI 1.6, the header-name codes: the host gives the plugin its table of [`NAMES`] once
//! ([`HostContext::header_names`](super::HostContext::header_names)), and each request's
//! `name_codes` then say, header by header, which of them it carries (0: none, parse the name),
//! so the plugin takes a name it already holds instead of parsing and validating it again. A
//! code is only ever an index into the table the host sent, never into this crate's own, so
//! host and plugin built with different `plugin-api` versions agree on it. The host finds a
//! standard name's code without hashing it (the number `http` already holds for it); a name
//! outside `http`'s standard ones takes a map lookup.
//!
//! The views are borrowed: valid while the map they were made from is, which the caller keeps
//! alive for the call. Copying views back ([`read_headers`]) copies every value into one buffer.

use std::sync::{LazyLock, OnceLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Version};
use smallvec::SmallVec;

use super::{RawHeader, RawStr};

/// The code of an HTTP version in [`RawRequest::version`](super::RawRequest::version).
pub fn version_code(v: Version) -> u32 {
    match v {
        Version::HTTP_09 => 9,
        Version::HTTP_10 => 10,
        Version::HTTP_2 => 20,
        Version::HTTP_3 => 30,
        _ => 11,
    }
}

/// The HTTP version of a code (an unknown one is HTTP/1.1).
pub fn version_of(code: u32) -> Version {
    match code {
        9 => Version::HTTP_09,
        10 => Version::HTTP_10,
        20 => Version::HTTP_2,
        30 => Version::HTTP_3,
        _ => Version::HTTP_11,
    }
}

/// Borrowed views of `map`'s fields, in its order (inline for up to `A`'s length).
pub fn views<A: smallvec::Array<Item = RawHeader>>(map: &HeaderMap) -> SmallVec<A> {
    map.iter()
        .map(|(n, v)| RawHeader {
            name: RawStr::new(n.as_str().as_bytes()),
            value: RawStr::new(v.as_bytes()),
        })
        .collect()
}

/// The `len` views at `ptr` (none when `len` is 0 or `ptr` is null).
///
/// # Safety
/// Otherwise `ptr` must point to `len` initialized views valid for `'a`.
pub unsafe fn fields<'a>(ptr: *const RawHeader, len: usize) -> &'a [RawHeader] {
    if len == 0 || ptr.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// The header names the host codes (code `i + 1` is `NAMES[i]`): the fields a browser, a proxy
/// or an API client sends most. Appending changes nothing for the other side (a plugin holds
/// the table its host sent); at most 255.
pub const NAMES: &[&str] = &[
    "host",
    "user-agent",
    "accept",
    "accept-language",
    "accept-encoding",
    "accept-charset",
    "connection",
    "cookie",
    "referer",
    "origin",
    "authorization",
    "cache-control",
    "pragma",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "te",
    "trailer",
    "expect",
    "upgrade",
    "upgrade-insecure-requests",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "range",
    "date",
    "dnt",
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
    "x-requested-with",
    "traceparent",
    "tracestate",
    "baggage",
    "priority",
    "sec-fetch-dest",
    "sec-fetch-mode",
    "sec-fetch-site",
    "sec-fetch-user",
    "sec-ch-ua",
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "access-control-request-method",
    "access-control-request-headers",
];

/// [`NAMES`] as views, for [`HostContext::header_names`](super::HostContext::header_names).
pub fn name_views() -> &'static [RawStr] {
    const VIEWS: [RawStr; NAMES.len()] = {
        let mut views = [RawStr::EMPTY; NAMES.len()];
        let mut i = 0;
        while i < NAMES.len() {
            views[i] = RawStr::new(NAMES[i].as_bytes());
            i += 1;
        }
        views
    };
    &VIEWS
}

/// The host's side: each name's code, found with the map's own hash of a parsed name.
static CODES: LazyLock<HeaderMap<u8>> = LazyLock::new(|| {
    let mut codes = HeaderMap::with_capacity(NAMES.len());
    for (i, name) in NAMES.iter().enumerate() {
        codes.insert(HeaderName::from_static(name), (i + 1) as u8);
    }
    codes
});

/// The host's fast side: the code of each standard name, indexed by the number `http` knows it
/// by (what [`standard_index`] reads), built from [`NAMES`] and checked: `None` when that number
/// is not what it is expected to be, and every name takes the map's lookup.
static STANDARD_CODES: LazyLock<Option<[u8; 256]>> = LazyLock::new(|| {
    let mut codes = [0u8; 256];
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(index) = standard_index(&HeaderName::from_static(name)) {
            if codes[index] != 0 {
                return None; // two names, one number: not the shape expected
            }
            codes[index] = (i + 1) as u8;
        }
    }
    // Every standard name of the table must have been found as one.
    let found = codes.iter().filter(|&&c| c != 0).count();
    let standard = ["host", "user-agent", "accept", "cookie", "referer"];
    let all_found = standard
        .iter()
        .all(|n| standard_index(&HeaderName::from_static(n)).is_some_and(|i| codes[i] != 0));
    (all_found && found >= standard.len()).then_some(codes)
});

/// The number `http` knows a standard name by, read from its `Hash` (which writes the name's
/// kind, then that number, and nothing else, for a standard name; more for any other), without
/// hashing anything. `None` for a name that is not standard, or a `Hash` of another shape.
fn standard_index(name: &HeaderName) -> Option<usize> {
    use std::hash::{Hash, Hasher};
    /// Keeps the first writes of a `Hash`, and how many bytes it wrote.
    #[derive(Default)]
    struct Writes {
        words: [u64; 2],
        count: usize,
        bytes: usize,
    }
    impl Hasher for Writes {
        fn write(&mut self, bytes: &[u8]) {
            if bytes.len() == 8 && self.count < 2 {
                self.words[self.count] = u64::from_ne_bytes(bytes.try_into().unwrap_or_default());
            }
            self.count += 1;
            self.bytes += bytes.len();
        }
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut writes = Writes::default();
    name.hash(&mut writes);
    let [kind, index] = writes.words;
    (writes.count == 2 && writes.bytes == 16 && kind == 0 && index < 256).then_some(index as usize)
}

/// The code of `name` (0: not in [`NAMES`]).
pub fn code_of(name: &HeaderName) -> u8 {
    if let (Some(codes), Some(index)) = (STANDARD_CODES.as_ref(), standard_index(name)) {
        return codes[index];
    }
    CODES.get(name).copied().unwrap_or(0)
}

/// One code per field of `map`, in its order (a name with several values repeats its code).
pub fn codes<C: smallvec::Array<Item = u8>>(map: &HeaderMap) -> SmallVec<C> {
    map.iter().map(|(n, _)| code_of(n)).collect()
}

/// The plugin's side: the names of the host's table, parsed once (`None`: one this plugin's
/// `http` refuses, parsed again from its view each time).
static HOST_NAMES: OnceLock<Vec<Option<HeaderName>>> = OnceLock::new();

/// Takes the host's table of coded names (ABI 1.6), copying it.
///
/// # Safety
/// `table` must point to `len` views valid for the call (or be null with `len` 0).
pub(crate) unsafe fn install_host_names(table: *const RawStr, len: usize) {
    let views: &[RawStr] = if len == 0 || table.is_null() {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(table, len) }
    };
    // SAFETY: the caller's contract.
    let _ = HOST_NAMES.set(unsafe { parse_names(views) });
}

/// The names of a table of views (`None` for one `http` refuses).
///
/// # Safety
/// Every view must be valid for the call.
unsafe fn parse_names(views: &[RawStr]) -> Vec<Option<HeaderName>> {
    views
        .iter()
        .map(|view| {
            // SAFETY: the caller's contract; parsed (copied) here.
            let bytes = unsafe { view.as_bytes() };
            // One of this crate's own names is taken as a `'static` (cloned without counting).
            match NAMES.iter().find(|n| n.as_bytes() == bytes) {
                Some(name) => Some(HeaderName::from_static(name)),
                None => HeaderName::from_bytes(bytes).ok(),
            }
        })
        .collect()
}

/// The host's table of coded names, if it sent one (it then sends codes with each request).
pub(crate) fn host_names() -> Option<&'static [Option<HeaderName>]> {
    HOST_NAMES.get().map(Vec::as_slice)
}

/// A request's header-name codes and the table they index.
#[derive(Clone, Copy)]
pub struct Coded<'a> {
    /// One per field.
    pub codes: &'a [u8],
    /// Code `c` names `names[c - 1]`.
    pub names: &'a [Option<HeaderName>],
}

impl Coded<'_> {
    /// The name field `i` is coded with, if any.
    fn name(&self, i: usize) -> Option<HeaderName> {
        let code = usize::from(*self.codes.get(i)?);
        self.names.get(code.checked_sub(1)?)?.clone()
    }
}

/// Copies header views into a map: names from their codes when `coded` (else parsed),
/// and every value, with `lead` in front, into one buffer, so the map holds one allocation
/// however many fields it has. `Trusted` values are taken as they are (what the host's HTTP
/// parser accepted); `Checked` ones are checked, and a field whose name or value is refused goes
/// to `refused` (which may skip it, or fail the whole copy). Returns `lead`'s copy and the map.
///
/// # Safety
/// Every view in `fields` must be valid for the call, and with [`Values::Trusted`] every value
/// valid `HeaderValue` bytes. A missing code, or one past the end of the table, is parsed.
pub unsafe fn read_headers<E>(
    fields: &[RawHeader],
    coded: Option<Coded<'_>>,
    lead: &[u8],
    values: Values,
    mut refused: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(Bytes, HeaderMap), E> {
    // One buffer costs two allocations (it and its shared count): for fewer copies than three,
    // a copy each is cheaper.
    let one_buffer = fields.len() + usize::from(!lead.is_empty()) > 2;
    let total = lead.len() + fields.iter().map(|h| h.value.len).sum::<usize>();
    let mut buf = Vec::with_capacity(if one_buffer { total } else { 0 });
    if one_buffer {
        buf.extend_from_slice(lead);
        for h in fields {
            // SAFETY: valid for the call (the caller's contract); copied here.
            buf.extend_from_slice(unsafe { h.value.as_bytes() });
        }
    }
    let buf = Bytes::from(buf);
    let mut map = HeaderMap::with_capacity(fields.len());
    let mut at = lead.len();
    for (i, h) in fields.iter().enumerate() {
        let value = if one_buffer {
            at += h.value.len;
            buf.slice(at - h.value.len..at)
        } else {
            // SAFETY: valid for the call (the caller's contract); copied here.
            Bytes::copy_from_slice(unsafe { h.value.as_bytes() })
        };
        let name = match coded.and_then(|c| c.name(i)) {
            Some(name) => name,
            None => {
                // SAFETY: valid for the call (the caller's contract); parsed (copied) here.
                let bytes = unsafe { h.name.as_bytes() };
                match HeaderName::from_bytes(bytes) {
                    Ok(name) => name,
                    Err(_) => {
                        refused(bytes)?;
                        continue;
                    }
                }
            }
        };
        let value = match values {
            // SAFETY: `Trusted` is the caller's word that these are valid `HeaderValue` bytes.
            Values::Trusted => unsafe { HeaderValue::from_maybe_shared_unchecked(value) },
            Values::Checked => match HeaderValue::from_maybe_shared(value) {
                Ok(value) => value,
                Err(_) => {
                    refused(name.as_str().as_bytes())?;
                    continue;
                }
            },
        };
        map.append(name, value);
    }
    let lead = match one_buffer {
        true => buf.slice(..lead.len()),
        false => Bytes::copy_from_slice(lead),
    };
    Ok((lead, map))
}

/// How [`read_headers`] takes the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    /// As they are: values an HTTP parser already accepted (the host's request).
    Trusted,
    /// Checked, a refused one reported (what a plugin returns).
    Checked,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &'static str, value: &'static str) -> RawHeader {
        RawHeader {
            name: RawStr::new(name.as_bytes()),
            value: RawStr::new(value.as_bytes()),
        }
    }

    #[test]
    fn version_codes_round_trip() {
        for v in [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ] {
            assert_eq!(version_of(version_code(v)), v);
        }
        assert_eq!(version_of(42), Version::HTTP_11);
    }

    #[test]
    fn coded_names_read_back_as_the_parsed_ones_would() {
        let mut map = HeaderMap::new();
        map.append("host", HeaderValue::from_static("example.com"));
        map.append("sec-fetch-mode", HeaderValue::from_static("navigate"));
        map.append("x-custom", HeaderValue::from_static("1"));
        map.append("cookie", HeaderValue::from_static("a=1"));
        map.append("cookie", HeaderValue::from_static("b=2"));
        let views = views::<[RawHeader; 8]>(&map);
        let codes = codes::<[u8; 8]>(&map);
        assert_eq!(codes.len(), 5);
        assert_eq!(codes[2], 0, "x-custom is not in the table");
        assert!(codes.iter().enumerate().all(|(i, &c)| i == 2 || c > 0));
        // SAFETY: the host's own table, valid here.
        let names = unsafe { parse_names(name_views()) };
        let coded = Coded {
            codes: &codes,
            names: &names,
        };
        for coded in [Some(coded), None] {
            // SAFETY: views of `map`, alive; its values are valid.
            let (lead, read) =
                unsafe { read_headers(&views, coded, b"/path", Values::Trusted, |_| Err(())) }
                    .unwrap();
            assert_eq!(lead, "/path");
            assert_eq!(read, map);
        }
        // A table shorter than the codes (another host's): the rest are parsed.
        let short = Coded {
            codes: &codes,
            names: &names[..1],
        };
        // SAFETY: as above.
        let (_, read) =
            unsafe { read_headers(&views, Some(short), b"", Values::Trusted, |_| Err(())) }
                .unwrap();
        assert_eq!(read, map);
    }

    #[test]
    fn checked_fields_that_are_refused_are_reported_and_the_rest_kept() {
        let fields = [
            field("content-type", "text/plain"),
            field("bad name", "x"),
            field("x-ok", "fine"),
            field("x-bad-value", "line\nbreak"),
        ];
        let mut refused = Vec::new();
        // SAFETY: views of `'static` strings.
        let (_, map) = unsafe {
            read_headers(&fields, None, b"", Values::Checked, |name| {
                refused.push(String::from_utf8_lossy(name).into_owned());
                Ok::<(), ()>(())
            })
        }
        .unwrap();
        assert_eq!(refused, ["bad name", "x-bad-value"]);
        assert_eq!(map.len(), 2);
        assert_eq!(map["x-ok"], "fine");
        // SAFETY: as above.
        let failed = unsafe { read_headers(&fields, None, b"", Values::Checked, |_| Err(())) };
        assert!(failed.is_err());
    }

    #[test]
    fn the_table_fits_a_code_and_every_name_is_valid_and_listed_once() {
        assert!(NAMES.len() < 256);
        for (i, name) in NAMES.iter().enumerate() {
            assert_eq!(
                code_of(&HeaderName::from_static(name)),
                (i + 1) as u8,
                "{name}"
            );
        }
        assert_eq!(code_of(&HeaderName::from_static("x-not-listed")), 0);
        assert_eq!(
            code_of(&HeaderName::from_static("age")),
            0,
            "standard, not listed"
        );
        assert!(
            STANDARD_CODES.is_some(),
            "http's standard names are read without hashing"
        );
    }
}
