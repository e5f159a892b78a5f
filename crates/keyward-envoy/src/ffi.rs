//! The Envoy dynamic-module ABI (v0.2.0, Envoy 1.40), by hand: the hooks
//! Envoy calls, and the few callbacks into Envoy this module uses. The only
//! `unsafe` in the crate lives here; each block says why it is sound.
//!
//! Declared callbacks must exist in the Envoy that loads the module (the
//! library is linked with `-z now`), and an ABI mismatch only warns, so a
//! wrong signature would crash Envoy instead of failing to load: every
//! callback declared here is exercised by keyward's tests/envoy_module.rs
//! in a real Envoy 1.40. Signatures are copied from Envoy's
//! `source/extensions/dynamic_modules/abi/abi.h` (frozen since v0.1.0).
//!
//! Every hook catches panics: a panic crossing into C++ would abort Envoy.
//! A request whose hook panicked is answered 500 (fail closed).
#![allow(unsafe_code)]

use std::borrow::Cow;
use std::ffi::{c_char, c_void};
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use keyward_core::reply::Reply;

use crate::copy::{Shared, Verdict};
use crate::filter;

mod unused_hooks;

// ---- ABI types --------------------------------------------------------

/// A buffer Envoy owns (`envoy_dynamic_module_type_envoy_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    /// What Envoy fills in (and leaves so when there is nothing).
    const EMPTY: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// A buffer the module owns (`envoy_dynamic_module_type_module_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    const NULL: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// A header the module owns (`envoy_dynamic_module_type_module_http_header`).
#[repr(C)]
struct ModuleHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_attribute_id::SourceAddress`.
const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;
/// Header, body and trailer statuses: Continue.
const CONTINUE: u32 = 0;
/// Request headers status: StopIteration (after a local reply).
const STOP_ITERATION: u32 = 1;
/// Request headers status: StopAllIterationAndBuffer (a request paused for
/// credits: neither its headers nor its body go on until it is decided).
const STOP_ALL_ITERATION_AND_BUFFER: u32 = 3;
/// The one event a paused request's scheduler carries.
const RESUME_EVENT: u64 = 1;
/// Times a request is paused for credits at most (the credits one loan
/// brings can be spent by requests deciding alongside before it decides
/// again).
const MAX_PAUSES: u32 = 2;

/// The ABI this module was written against; Envoy 1.40 reports v0.2.0.
static ABI_VERSION: &[u8] = b"v0.2.0\0";

unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: *mut c_void,
        status_code: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy_ptr: *mut c_void,
    ) -> *mut c_void;

    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);

    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );

    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter_envoy_ptr: *mut c_void);
}

// ---- Safe wrappers around the callbacks -------------------------------

/// The stream a hook was called for, valid for that hook's duration.
struct Stream(*mut c_void);

impl Stream {
    /// Every value of a request header, joined with `,` (as Envoy's
    /// ext_authz joins them); `None` if absent or not UTF-8. Borrowed from
    /// Envoy (one value, the usual case) until a header is set.
    fn request_header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut count = 0usize;
        let first = self.header_value(name, 0, &mut count)?;
        if count <= 1 {
            return Some(Cow::Borrowed(first));
        }
        let mut joined = first.to_owned();
        for index in 1..count {
            joined.push(',');
            joined.push_str(self.header_value(name, index, &mut 0)?);
        }
        Some(Cow::Owned(joined))
    }

    fn header_value(&self, name: &str, index: usize, count: &mut usize) -> Option<&str> {
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: `self.0` is the filter pointer Envoy passed to the
        // running hook (valid until the hook returns); `name` outlives the
        // call; `result` and `count` are live locals Envoy writes to.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.0,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                &raw mut result,
                index,
                std::ptr::from_mut(count),
            )
        };
        if !found {
            return None;
        }
        // SAFETY: Envoy owns the bytes and keeps them until the hook ends
        // or a header is set. The borrow is tied to `self`, which lives
        // only inside the hook, and `request_headers` drops every borrow
        // before it sets a header.
        let bytes = unsafe { envoy_bytes(result) };
        std::str::from_utf8(bytes).ok()
    }

    fn set_header(&self, kind: u32, name: &str, value: Option<&str>) {
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: as in `header_value`; Envoy copies both buffers, and a
        // NULL value removes the header.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// The downstream address (`ip:port`, or `[v6]:port`), as an address.
    fn client(&self) -> Option<IpAddr> {
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: as in `header_value`.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                ATTRIBUTE_SOURCE_ADDRESS,
                &raw mut result,
            )
        };
        if !found {
            return None;
        }
        // SAFETY: as in `header_value`.
        let text = std::str::from_utf8(unsafe { envoy_bytes(result) }).ok()?;
        filter::client_address(text)
    }

    fn send(&self, reply: &Reply, details: &str) {
        let mut headers: Vec<ModuleHeader> = std::iter::once(("content-type", "application/json"))
            .chain(reply.headers.iter().map(|(k, v)| (*k, v.as_str())))
            .map(|(key, value)| ModuleHeader {
                key_ptr: key.as_ptr().cast(),
                key_length: key.len(),
                value_ptr: value.as_ptr().cast(),
                value_length: value.len(),
            })
            .collect();
        // SAFETY: as in `header_value`; every buffer (headers, body,
        // details) lives until the call returns and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(reply.status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(reply.body.as_bytes()),
                ModuleBuffer::of(details.as_bytes()),
            );
        }
    }
}

/// The bytes of an Envoy buffer (`{NULL, 0}` is empty).
///
/// # Safety
/// `buffer` must point at `length` readable bytes that stay valid for the
/// returned borrow, or be NULL.
unsafe fn envoy_bytes<'a>(buffer: EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast(), buffer.length) }
}

/// A paused request's way back to its worker: Envoy's scheduler for its
/// filter. Committed from the credit keeper's thread (Envoy posts the
/// event to the worker's dispatcher, and drops it if the stream is gone
/// by then); deleted when the last holder (the filter, or the keeper)
/// lets go.
struct Resume {
    scheduler: *mut c_void,
    /// The filter is alive: committing is allowed. Cleared (under the
    /// lock) when the filter is destroyed on its worker, so no commit
    /// reaches a worker's dispatcher after its streams are gone (at
    /// Envoy's shutdown, the dispatcher with them).
    alive: std::sync::Mutex<bool>,
}

// SAFETY: Envoy's filter scheduler may be committed from any thread while
// its worker's dispatcher lives (it posts there and holds the filter only
// weakly): `alive` ensures commits stop when the filter is destroyed, which
// is before its dispatcher goes. Deleting the scheduler touches nothing of
// the worker's; `Resume` is its only owner and deletes it once.
unsafe impl Send for Resume {}
// SAFETY: as above; commits are serialised with the filter's end by `alive`.
unsafe impl Sync for Resume {}

impl Resume {
    /// A scheduler for the stream a hook was called for.
    fn of(stream: &Stream) -> Option<Self> {
        // SAFETY: `stream.0` is the filter pointer of the running hook.
        let scheduler =
            unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(stream.0) };
        (!scheduler.is_null()).then(|| Self {
            scheduler,
            alive: std::sync::Mutex::new(true),
        })
    }

    /// The filter is being destroyed: no commit from now on.
    fn end(&self) {
        *self
            .alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }
}

impl crate::credits::Wake for Resume {
    fn wake(&self) {
        let alive = self
            .alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *alive {
            // SAFETY: the scheduler is live until `drop` (this holder keeps
            // it), and its filter (so its dispatcher) is alive while the
            // lock is held.
            unsafe {
                envoy_dynamic_module_callback_http_filter_scheduler_commit(
                    self.scheduler,
                    RESUME_EVENT,
                );
            }
        }
    }
}

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: made by `scheduler_new`, deleted here once.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.scheduler) };
    }
}

// ---- Module objects ---------------------------------------------------

/// One stream's state: the response headers an allow owes the client, and
/// a request paused for credits.
struct Filter {
    shared: Arc<Shared>,
    response_headers: Vec<(&'static str, String)>,
    paused: Option<Paused>,
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Some(paused) = &self.paused {
            paused.resume.end();
        }
    }
}

/// A request paused until its key's credit lease is topped up: what it is
/// decided from again.
struct Paused {
    method: String,
    path: String,
    authorization: String,
    pauses: u32,
    resume: Arc<Resume>,
}

/// Runs a hook body; a panic is caught (Envoy would abort) and `fallback`
/// is returned instead.
fn guarded<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        crate::sync::log("a hook panicked; the request is refused");
        fallback
    })
}

// ---- Hooks ------------------------------------------------------------

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guarded(std::ptr::null(), || {
        keyward_core::clock::start_clock();
        ABI_VERSION.as_ptr().cast()
    })
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy_ptr: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        // SAFETY: Envoy passes the config bytes for this call's duration;
        // they are parsed (copied) before it returns.
        let config = unsafe { envoy_bytes(config) };
        match filter::new_config(config) {
            Ok(shared) => Arc::into_raw(shared).cast(),
            Err(problem) => {
                crate::sync::log(&format!("configuration refused: {problem}"));
                std::ptr::null()
            }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guarded((), || {
        if config.is_null() {
            return;
        }
        // SAFETY: `config` came from `Arc::into_raw` in `config_new`, and
        // Envoy destroys each config once, after its last filter.
        let shared = unsafe { Arc::from_raw(config.cast::<Shared>()) };
        shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        // SAFETY: `config` is live (Envoy destroys it after its filters);
        // the count is raised before a second `Arc` is made from it.
        let shared = unsafe {
            Arc::increment_strong_count(config.cast::<Shared>());
            Arc::from_raw(config.cast::<Shared>())
        };
        let filter = Box::new(Filter {
            shared,
            response_headers: Vec::new(),
            paused: None,
        });
        Box::into_raw(filter).cast_const().cast()
    })
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let stream = Stream(filter_envoy_ptr);
    let decided = catch_unwind(AssertUnwindSafe(|| {
        // `filter_new` failed (it panicked): refuse, never pass.
        if filter_module_ptr.is_null() {
            stream.send(&internal_error(), "keyward_internal");
            return STOP_ITERATION;
        }
        // SAFETY: the pointer is the `Filter` made in `filter_new` (not
        // NULL, checked above), used on this worker only, until
        // `filter_destroy`.
        let filter = unsafe { &mut *filter_module_ptr.cast::<Filter>().cast_mut() };
        request_headers(&stream, filter)
    }));
    decided.unwrap_or_else(|_| {
        crate::sync::log("a hook panicked; the request is refused");
        stream.send(&internal_error(), "keyward_internal");
        STOP_ITERATION
    })
}

/// The reply when the module cannot decide at all: refused, 503.
fn internal_error() -> Reply {
    keyward_core::reply::unavailable("keyward failed to decide; retry later", "internal")
}

fn request_headers(stream: &Stream, filter: &mut Filter) -> u32 {
    let method = stream.request_header(":method").unwrap_or_default();
    let path = stream.request_header(":path").unwrap_or_default();
    let authorization = stream.request_header("authorization").unwrap_or_default();
    let verdict = filter
        .shared
        .verdict(&method, &path, &authorization, stream.client(), true);
    // The header borrows end here: headers are set after.
    let request = (
        method.into_owned(),
        path.into_owned(),
        authorization.into_owned(),
    );
    act(stream, filter, verdict, request, 0)
}

/// Carries a verdict out: headers set and the request passed on (after a
/// pause, resumed), a local reply, or the request paused for credits.
fn act(
    stream: &Stream,
    filter: &mut Filter,
    verdict: Verdict,
    (method, path, authorization): (String, String, String),
    pauses: u32,
) -> u32 {
    match verdict {
        Verdict::Allow { request, response } => {
            for (name, value) in &request {
                stream.set_header(REQUEST_HEADER, name, Some(value));
            }
            stream.set_header(REQUEST_HEADER, "authorization", None);
            filter.response_headers = response;
            CONTINUE
        }
        Verdict::Deny(reply) => {
            let details = filter::details(&reply);
            stream.send(&reply, &details);
            STOP_ITERATION
        }
        Verdict::Await(key) => {
            let resume = match filter.paused.take() {
                Some(before) => Some(before.resume),
                None => Resume::of(stream).map(Arc::new),
            };
            let waiting = resume.and_then(|resume| {
                let waiter = crate::credits::Waiter {
                    key,
                    wake: Arc::clone(&resume) as Arc<dyn crate::credits::Wake>,
                };
                filter.shared.waiters.try_send(waiter).ok().map(|()| resume)
            });
            let Some(resume) = waiting else {
                let reply = keyward_core::reply::unavailable(
                    "too many requests are waiting for credits; retry later",
                    "credits_waiting",
                );
                stream.send(&reply, &filter::details(&reply));
                return STOP_ITERATION;
            };
            filter.paused = Some(Paused {
                method,
                path,
                authorization,
                pauses: pauses + 1,
                resume,
            });
            STOP_ALL_ITERATION_AND_BUFFER
        }
    }
}

/// A paused request's loan came back (or its wait ended): decided again,
/// then passed on, answered, or paused once more.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    _event_id: u64,
) {
    let stream = Stream(filter_envoy_ptr);
    let decided = catch_unwind(AssertUnwindSafe(|| {
        if filter_module_ptr.is_null() {
            return;
        }
        // SAFETY: as in `request_headers`.
        let filter = unsafe { &mut *filter_module_ptr.cast::<Filter>().cast_mut() };
        let Some(paused) = filter.paused.as_ref() else {
            return;
        };
        let verdict = filter.shared.verdict(
            &paused.method,
            &paused.path,
            &paused.authorization,
            stream.client(),
            paused.pauses < MAX_PAUSES,
        );
        let times = paused.pauses;
        let request = (
            paused.method.clone(),
            paused.path.clone(),
            paused.authorization.clone(),
        );
        if !matches!(verdict, Verdict::Await(_)) {
            filter.paused = None;
        }
        if act(&stream, filter, verdict, request, times) == CONTINUE {
            // SAFETY: the filter pointer of the running hook.
            unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(stream.0) };
        }
    }));
    if decided.is_err() {
        crate::sync::log("a hook panicked; the request is refused");
        stream.send(&internal_error(), "keyward_internal");
    }
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guarded(CONTINUE, || {
        if filter_module_ptr.is_null() {
            return CONTINUE;
        }
        // SAFETY: as in `request_headers`.
        let filter = unsafe { &mut *filter_module_ptr.cast::<Filter>().cast_mut() };
        let stream = Stream(filter_envoy_ptr);
        for (name, value) in std::mem::take(&mut filter.response_headers) {
            stream.set_header(RESPONSE_HEADER, name, Some(&value));
        }
        CONTINUE
    })
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module_ptr: *const c_void) {
    guarded((), || {
        if filter_module_ptr.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in `filter_new` (not NULL,
        // checked above); Envoy destroys each filter once.
        drop(unsafe { Box::from_raw(filter_module_ptr.cast::<Filter>().cast_mut()) });
    });
}
