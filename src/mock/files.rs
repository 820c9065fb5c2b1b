//! Files and audio: `POST /files/upload`, `GET /files/{file_id}/preview`, `POST
//! /audio-to-text`.
//!
//! Invariant: a multipart body is read as a stream: a file part's bytes are counted as they pass
//! and dropped (only a file of at most [`KEEP_MAX`] is kept, for its preview), so an upload of
//! any size costs the mock one chunk of memory; past the upload limit the answer is Dify's 413
//! at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::json::Obj;
use super::record::UploadRecord;
use super::reply::{self, Refusal, Reply};
use super::{lock, Answer, Call, MockDify, State};

/// Dify's default upload limit for documents (`UPLOAD_FILE_SIZE_LIMIT`, 15 MB).
pub const DEFAULT_UPLOAD_LIMIT: u64 = 15 * 1024 * 1024;

/// Files up to this size are kept whole, so their preview is their bytes; larger ones preview
/// as filler of their size.
const KEEP_MAX: usize = 64 * 1024;

/// The longest text field (`user`) read.
const FIELD_MAX: usize = 4096;

/// The `user` Dify files an upload under when the form has none.
const DEFAULT_USER: &str = "DEFAULT-USER";

/// Files kept for previews, and upload records kept; the oldest go first.
const FILES_MAX: usize = 1024;

/// Files received and stored.
pub(super) struct Files {
    /// Bytes a file part may have.
    limit: AtomicU64,
    /// Stored files by id, and their ids in the order they came.
    stored: Mutex<(HashMap<String, Stored>, VecDeque<String>)>,
    uploads: Mutex<VecDeque<UploadRecord>>,
}

impl Default for Files {
    fn default() -> Files {
        Files {
            limit: AtomicU64::new(DEFAULT_UPLOAD_LIMIT),
            stored: Mutex::default(),
            uploads: Mutex::default(),
        }
    }
}

impl Files {
    fn record(&self, upload: UploadRecord) {
        let mut uploads = lock(&self.uploads);
        if uploads.len() == FILES_MAX {
            uploads.pop_front();
        }
        uploads.push_back(upload);
    }
}

/// An uploaded file.
struct Stored {
    name: String,
    mime_type: String,
    size: u64,
    /// Its bytes, when small enough to keep.
    content: Option<Bytes>,
}

impl MockDify {
    /// File parts larger than `bytes` are refused with Dify's 413 (default
    /// [`DEFAULT_UPLOAD_LIMIT`]).
    pub fn set_upload_limit(&self, bytes: u64) {
        self.state.files.limit.store(bytes, Ordering::SeqCst);
    }

    /// The files received (uploads and audio), oldest first.
    pub fn uploads(&self) -> Vec<UploadRecord> {
        lock(&self.state.files.uploads).iter().cloned().collect()
    }
}

/// The file part of a multipart body, counted.
struct Part {
    name: String,
    mime_type: String,
    size: u64,
    content: Option<Bytes>,
}

/// What a multipart body held.
struct Scanned {
    user: Option<String>,
    file: Option<Part>,
}

/// Why a multipart body was refused.
enum ScanError {
    NotMultipart,
    TooLarge,
    TooManyFiles,
    Malformed,
}

/// Reads a multipart body through, counting the `file` part and keeping the `user` field.
async fn scan(limit: u64, headers: &HeaderMap, body: Incoming) -> Result<Scanned, ScanError> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ScanError::NotMultipart)?;
    let boundary = multer::parse_boundary(ct).map_err(|_| ScanError::NotMultipart)?;
    let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut out = Scanned {
        user: None,
        file: None,
    };
    while let Some(mut field) = form.next_field().await.map_err(|_| ScanError::Malformed)? {
        match field.name() {
            Some("file") => {
                if out.file.is_some() {
                    return Err(ScanError::TooManyFiles);
                }
                let name = field.file_name().unwrap_or_default().to_owned();
                let mime_type = field
                    .content_type()
                    .map_or_else(|| "application/octet-stream".to_owned(), |m| m.to_string());
                let mut size = 0u64;
                let mut kept = Some(BytesMut::new());
                while let Some(chunk) = field.chunk().await.map_err(|_| ScanError::Malformed)? {
                    size += chunk.len() as u64;
                    if size > limit {
                        return Err(ScanError::TooLarge);
                    }
                    if size > KEEP_MAX as u64 {
                        kept = None;
                    } else if let Some(k) = &mut kept {
                        k.extend_from_slice(&chunk);
                    }
                }
                out.file = Some(Part {
                    name,
                    mime_type,
                    size,
                    content: kept.map(BytesMut::freeze),
                });
            }
            Some("user") => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|_| ScanError::Malformed)? {
                    if text.len() + chunk.len() > FIELD_MAX {
                        return Err(ScanError::Malformed);
                    }
                    text.extend_from_slice(&chunk);
                }
                out.user = Some(String::from_utf8(text).map_err(|_| ScanError::Malformed)?);
            }
            _ => {
                while field
                    .chunk()
                    .await
                    .map_err(|_| ScanError::Malformed)?
                    .is_some()
                {}
            }
        }
    }
    Ok(out)
}

fn malformed() -> Refusal {
    reply::invalid_param("The multipart body could not be read.")
}

fn too_many_files() -> Refusal {
    reply::error(
        StatusCode::BAD_REQUEST,
        "too_many_files",
        "Only one file is allowed.",
    )
}

/// `POST /files/upload`: 201 with the stored file's description.
pub(super) async fn upload(st: &State, path: &str, call: Call) -> Answer {
    let no_file = || {
        reply::error(
            StatusCode::BAD_REQUEST,
            "no_file_uploaded",
            "Please upload your file.",
        )
    };
    let limit = st.files.limit.load(Ordering::SeqCst);
    let scanned = scan(limit, &call.headers, call.body)
        .await
        .map_err(|e| match e {
            ScanError::NotMultipart => no_file(),
            ScanError::TooLarge => reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "file_too_large",
                format!("File size exceeded. {limit} bytes at most."),
            ),
            ScanError::TooManyFiles => too_many_files(),
            ScanError::Malformed => malformed(),
        })?;
    let file = scanned.file.ok_or_else(no_file)?;
    if file.name.is_empty() {
        return Err(reply::error(
            StatusCode::BAD_REQUEST,
            "filename_not_exists_error",
            "The specified filename does not exist.",
        ));
    }
    let created_by = st
        .users
        .meet(scanned.user.as_deref().unwrap_or(DEFAULT_USER));
    let id = uuid::Uuid::new_v4().to_string();
    let extension = file
        .name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let body = Obj::new()
        .str("id", &id)
        .str("name", &file.name)
        .int("size", file.size)
        .str("extension", &extension)
        .str("mime_type", &file.mime_type)
        .str("created_by", &created_by)
        .int("created_at", super::now_epoch())
        .done();
    st.files.record(UploadRecord {
        path: path.to_owned(),
        user: scanned.user,
        name: file.name.clone(),
        mime_type: file.mime_type.clone(),
        size: file.size,
        file_id: Some(id.clone()),
    });
    let mut stored = lock(&st.files.stored);
    if stored.1.len() == FILES_MAX {
        if let Some(old) = stored.1.pop_front() {
            stored.0.remove(&old);
        }
    }
    stored.1.push_back(id.clone());
    stored.0.insert(
        id,
        Stored {
            name: file.name,
            mime_type: file.mime_type,
            size: file.size,
            content: file.content,
        },
    );
    drop(stored);
    Ok(reply::reply_response(Reply::json(
        StatusCode::CREATED,
        body,
    )))
}

/// `GET /files/{file_id}/preview`: the file's bytes (`?as_attachment=true`: as a download).
pub(super) fn preview(st: &State, file_id: &str, call: &Call) -> Answer {
    let stored = lock(&st.files.stored);
    let file = stored
        .0
        .get(file_id)
        .ok_or_else(|| reply::error(StatusCode::NOT_FOUND, "file_not_found", "File not found."))?;
    let body = match &file.content {
        Some(b) => reply::full(b.clone()),
        None => filler(file.size),
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&file.mime_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert(CONTENT_LENGTH, HeaderValue::from(file.size));
    if call.param("as_attachment").as_deref() == Some("true") {
        let v = format!(
            "attachment; filename*=UTF-8''{}",
            percent_encode(&file.name)
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

/// `size` bytes of filler, produced as they are sent.
fn filler(size: u64) -> super::Body {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let whole = size / CHUNK as u64;
    let rest = (size % CHUNK as u64) as usize;
    let chunks = (0..whole)
        .map({
            let chunk = chunk.clone();
            move |_| chunk.clone()
        })
        .chain((rest > 0).then(|| chunk.slice(..rest)));
    StreamBody::new(futures_util::stream::iter(
        chunks.map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
    ))
    .boxed()
}

/// RFC 5987 encoding of a file name.
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `POST /audio-to-text`: the audio counted, and a transcript.
pub(super) async fn audio_to_text(st: &State, path: &str, call: Call) -> Answer {
    let no_audio = || {
        reply::error(
            StatusCode::BAD_REQUEST,
            "no_audio_uploaded",
            "Please upload your audio.",
        )
    };
    let limit = st.files.limit.load(Ordering::SeqCst);
    let scanned = scan(limit, &call.headers, call.body)
        .await
        .map_err(|e| match e {
            ScanError::NotMultipart => no_audio(),
            ScanError::TooLarge => reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "audio_too_large",
                format!("Audio size exceeded. {limit} bytes at most."),
            ),
            ScanError::TooManyFiles => too_many_files(),
            ScanError::Malformed => malformed(),
        })?;
    let file = scanned.file.ok_or_else(no_audio)?;
    if let Some(u) = &scanned.user {
        st.users.meet(u);
    }
    st.files.record(UploadRecord {
        path: path.to_owned(),
        user: scanned.user,
        name: file.name,
        mime_type: file.mime_type,
        size: file.size,
        file_id: None,
    });
    Ok(reply::ok("{\"text\": \"hello from the mock\"}"))
}
