//! Watching a Dify `text/event-stream` as it passes through the gateway.
//!
//! Invariant: the observer only reads. The caller forwards each upstream chunk untouched and
//! feeds the same bytes here; events are framed per the SSE spec (CRLF, LF or CR line ends,
//! comments, `event:` and multi-line `data:` fields, whatever the chunk boundaries), and an
//! event's fields are buffered only up to the cap given at construction: a larger event is
//! reported as oversized, with what its first bytes said, so memory per stream stays bounded
//! whatever the upstream sends.

use std::ops::Range;

use bytes::Bytes;
use serde::de::{DeserializeOwned, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The comment line the gateway sends while the upstream is silent; clients ignore it. Send it
/// only when [`Observer::is_between_events`] says so.
pub const HEARTBEAT: &[u8] = b": ping\n\n";

/// How much of an oversized event's fields is kept, to read its name and run id.
const HEAD_BYTES: usize = 4096;

/// A data buffer grown past this is released after its event rather than kept for the next.
const RETAIN_BYTES: usize = 64 * 1024;

/// The UTF-8 byte order mark, which the SSE spec skips at the start of a stream.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// [`HEARTBEAT`] as a body chunk.
pub fn heartbeat() -> Bytes {
    Bytes::from_static(HEARTBEAT)
}

/// One dispatched event, summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The frame's `event:` field, if it had one (Dify's keep-alive is a bare `event: ping`).
    pub field: Option<Box<str>>,
    /// What the frame's data said.
    pub data: Data,
}

/// What an event's `data:` lines held.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// No `data:` line.
    Empty,
    /// Not a JSON object with a string `"event"` (or not valid JSON at all). An event not acted
    /// on is read only up to its name: what follows the name is not checked.
    Opaque,
    /// More than the cap: skipped, with what the first bytes named (Dify writes `event`,
    /// `task_id` and `workflow_run_id` before the large `data`).
    Oversized {
        name: Option<Box<str>>,
        workflow_run_id: Option<Box<str>>,
    },
    /// A Dify event.
    Dify(DifyEvent),
}

/// A Dify event, by its JSON `"event"` name.
#[derive(Debug, Clone, PartialEq)]
pub enum DifyEvent {
    /// `workflow_started`: the ids a stop (`task_id`) and a run-detail read need.
    WorkflowStarted {
        task_id: Box<str>,
        workflow_run_id: Box<str>,
    },
    /// `workflow_finished`.
    WorkflowFinished(Box<WorkflowFinished>),
    /// `error`: Dify's failure reported in-stream (with HTTP 200), its data as received
    /// (`{"event":"error","status":…,"code":…,"message":…}`).
    Error { raw: Bytes },
    /// Any other event (`node_started`, `text_chunk`, `error`, …), or a started or finished
    /// event lacking its `workflow_run_id` (or `task_id`).
    Other { name: Box<str> },
}

/// A `workflow_finished` event: its run's outcome and the event's data as received.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowFinished {
    /// The finished run.
    pub workflow_run_id: Box<str>,
    /// The streaming task that ran it.
    pub task_id: Option<Box<str>>,
    /// `data.status` (`succeeded`, `failed`, `stopped`, `partial-succeeded`, …); absent when
    /// missing or not a string. Members of the wrong type read as absent, like this one.
    pub status: Option<Box<str>>,
    /// `data.total_tokens`.
    pub total_tokens: Option<u64>,
    /// `data.total_steps`.
    pub total_steps: Option<u64>,
    /// `data.elapsed_time`, in seconds.
    pub elapsed_time: Option<f64>,
    /// The event's whole data (the JSON object), as received.
    raw: Bytes,
    /// Where the run object (`data`) lies in `raw`.
    run: Option<Range<usize>>,
}

impl WorkflowFinished {
    /// The event's whole data, as received.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The run object (the event's `data`, shaped like a blocking run's `data`), as received.
    pub fn run_data(&self) -> Option<Bytes> {
        self.run.clone().map(|r| self.raw.slice(r))
    }
}

impl Event {
    /// The event's name: the JSON `"event"` if there is one, else the `event:` field.
    pub fn name(&self) -> Option<&str> {
        match &self.data {
            Data::Dify(DifyEvent::WorkflowStarted { .. }) => Some("workflow_started"),
            Data::Dify(DifyEvent::WorkflowFinished(_)) => Some("workflow_finished"),
            Data::Dify(DifyEvent::Other { name }) => Some(name.as_ref()),
            Data::Oversized {
                name: Some(name), ..
            } => Some(name.as_ref()),
            _ => self.field.as_deref(),
        }
    }
}

/// The incremental parser of one stream.
pub struct Observer {
    /// Most bytes of `data` plus `event` buffered for one event.
    cap: usize,
    /// Leading BOM bytes matched so far; 3 once past the stream's start.
    bom: usize,
    /// The last byte was a CR, so an LF next ends nothing more.
    after_cr: bool,
    /// Where in the current line the parser is.
    line: Line,
    /// The field name read so far (only `data` and `event` matter; longer names are skipped).
    name: [u8; 5],
    /// Bytes of the field name; 6 once it is longer than any name that matters.
    name_len: usize,
    /// The next value byte, if a space, is dropped (the one space after the colon).
    value_start: bool,
    /// The current event's data lines, joined with LF.
    data: Vec<u8>,
    /// The current event's `event:` field.
    event: Vec<u8>,
    /// Whether the current event has had a `data` line, and an `event` line.
    has_data: bool,
    has_event: bool,
    /// The current event outgrew `cap`: only its head is kept.
    oversized: bool,
}

/// Shows where the parser is, never the stream's bytes.
impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("cap", &self.cap)
            .field("line", &self.line)
            .field("buffered", &(self.data.len() + self.event.len()))
            .field("oversized", &self.oversized)
            .finish_non_exhaustive()
    }
}

/// Where in a line the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start: an end of line here dispatches the event.
    Start,
    /// In a field name.
    Name,
    /// In the value of a field that is kept.
    Value(Field),
    /// In a comment or the value of a field that is not kept.
    Skip,
}

/// The fields whose values are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
}

impl Observer {
    /// An observer that buffers at most `max_event_bytes` of one event's fields (and, of an
    /// event past that, the first 4 KiB of its `data` and `event` to name it).
    pub fn new(max_event_bytes: usize) -> Observer {
        Observer {
            cap: max_event_bytes,
            bom: 0,
            after_cr: false,
            line: Line::Start,
            name: [0; 5],
            name_len: 0,
            value_start: false,
            data: Vec::new(),
            event: Vec::new(),
            has_data: false,
            has_event: false,
            oversized: false,
        }
    }

    /// Reads the next chunk of the stream; returns the events it completed, in order.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        while self.bom < BOM.len() {
            match chunk.split_first() {
                None => return out,
                Some((&b, rest)) if b == BOM[self.bom] => {
                    self.bom += 1;
                    chunk = rest;
                }
                Some(_) => {
                    let seen = std::mem::replace(&mut self.bom, BOM.len());
                    self.scan(&BOM[..seen], &mut out);
                }
            }
        }
        self.scan(chunk, &mut out);
        out
    }

    /// Whether bytes inserted now (a [`HEARTBEAT`]) fall between two events: no line and no
    /// event is in progress, so the client's framing of the upstream's events is unchanged.
    pub fn is_between_events(&self) -> bool {
        self.line == Line::Start
            && !self.has_data
            && !self.has_event
            && (self.bom == 0 || self.bom == BOM.len())
    }

    fn scan(&mut self, mut chunk: &[u8], out: &mut Vec<Event>) {
        while let Some((&b, rest)) = chunk.split_first() {
            let after_cr = std::mem::take(&mut self.after_cr);
            if b == b'\r' || b == b'\n' {
                chunk = rest;
                // The LF of a CRLF ends nothing more.
                if !(after_cr && b == b'\n') {
                    self.after_cr = b == b'\r';
                    self.end_line(out);
                }
                continue;
            }
            match self.line {
                Line::Start | Line::Name => {
                    chunk = rest;
                    match b {
                        b':' if self.line == Line::Start => self.line = Line::Skip,
                        b':' => self.begin_value(),
                        _ => {
                            if let Some(slot) = self.name.get_mut(self.name_len) {
                                *slot = b;
                            }
                            self.name_len = (self.name_len + 1).min(self.name.len() + 1);
                            self.line = Line::Name;
                        }
                    }
                }
                Line::Value(_) | Line::Skip => {
                    if std::mem::take(&mut self.value_start) && b == b' ' {
                        chunk = rest;
                        continue;
                    }
                    let end = memchr::memchr2(b'\r', b'\n', chunk).unwrap_or(chunk.len());
                    if let Line::Value(field) = self.line {
                        self.take(field, &chunk[..end]);
                    }
                    chunk = &chunk[end..];
                }
            }
        }
    }

    /// A line ended: at its start that dispatches the event; a name alone is its field with
    /// an empty value.
    fn end_line(&mut self, out: &mut Vec<Event>) {
        match self.line {
            Line::Start => out.extend(self.dispatch()),
            Line::Name => self.begin_value(),
            Line::Value(_) | Line::Skip => {}
        }
        self.line = Line::Start;
    }

    /// The field name is complete: start its value.
    fn begin_value(&mut self) {
        // A name longer than the buffer reads as empty: it is neither `data` nor `event`.
        let name = self.name.get(..self.name_len).unwrap_or(&[]);
        self.line = match name {
            b"data" => {
                if std::mem::replace(&mut self.has_data, true) {
                    self.take(Field::Data, b"\n");
                }
                Line::Value(Field::Data)
            }
            b"event" => {
                self.has_event = true;
                self.event.clear();
                Line::Value(Field::Event)
            }
            _ => Line::Skip,
        };
        self.name_len = 0;
        self.value_start = true;
    }

    /// Buffers value bytes, within the cap; past it, keeps only the event's head.
    fn take(&mut self, field: Field, bytes: &[u8]) {
        if !self.oversized && self.data.len() + self.event.len() + bytes.len() > self.cap {
            self.oversized = true;
            self.data.truncate(HEAD_BYTES);
            self.event.truncate(HEAD_BYTES);
        }
        let buf = match field {
            Field::Data => &mut self.data,
            Field::Event => &mut self.event,
        };
        let room = match self.oversized {
            true => HEAD_BYTES.saturating_sub(buf.len()),
            false => bytes.len(),
        };
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Ends the current event: its summary if it had a `data` or `event` field.
    fn dispatch(&mut self) -> Option<Event> {
        let event = (self.has_data || self.has_event).then(|| Event {
            field: self
                .has_event
                .then(|| String::from_utf8_lossy(&self.event).into()),
            data: match (self.has_data, self.oversized) {
                (false, _) => Data::Empty,
                (true, true) => oversized(&self.data),
                (true, false) => read(&self.data),
            },
        });
        for buf in [&mut self.data, &mut self.event] {
            buf.clear();
            if buf.capacity() > RETAIN_BYTES {
                *buf = Vec::new();
            }
        }
        (self.has_data, self.has_event, self.oversized) = (false, false, false);
        event
    }
}

/// The events the gateway acts on (a run's start and end, Dify's in-stream error): only for
/// these is an event's whole data read and checked. Any other event (text chunks, nodes — most
/// of a stream) is read only up to its name, which Dify writes first.
const ACTED_ON: [&str; 3] = ["workflow_started", "workflow_finished", "error"];

/// The top-level members of an event's data that matter, as they appear in it.
#[derive(Default)]
struct Top<'a> {
    event: Option<&'a RawValue>,
    /// The `event` name of an event not [`ACTED_ON`], when reading stopped at it.
    other: Option<Box<str>>,
    task_id: Option<&'a RawValue>,
    workflow_run_id: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
}

/// The members of a top-level object, by name.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    Event,
    TaskId,
    WorkflowRunId,
    Data,
    #[serde(other)]
    Other,
}

/// Fills a [`Top`] member by member, so a truncated object still yields its first members;
/// with `.1`, stops at an `event` name not [`ACTED_ON`] (an error that only ends the reading).
struct TopVisitor<'t, 'a>(&'t mut Top<'a>, bool);

impl<'de> Visitor<'de> for TopVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Event if self.1 => {
                    let raw = map.next_value()?;
                    self.0.event = Some(raw);
                    match value::<Box<str>>(Some(raw)) {
                        Some(name) if !ACTED_ON.contains(&&*name) => {
                            self.0.other = Some(name);
                            return Err(serde::de::Error::custom("read up to its name"));
                        }
                        _ => continue,
                    }
                }
                Key::Event => &mut self.0.event,
                Key::TaskId => &mut self.0.task_id,
                Key::WorkflowRunId => &mut self.0.workflow_run_id,
                Key::Data => &mut self.0.data,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(())
    }
}

/// Reads `data`'s top-level members; `true` if it is one complete, valid JSON object. With
/// `up_to_name`, an event not [`ACTED_ON`] is read only up to its name (`Top::other`).
fn members(data: &[u8], up_to_name: bool) -> (Top<'_>, bool) {
    let mut top = Top::default();
    let mut de = serde_json::Deserializer::from_slice(data);
    let valid = de.deserialize_map(TopVisitor(&mut top, up_to_name)).is_ok() && de.end().is_ok();
    (top, valid)
}

/// A member's value as `T`, if it is one.
fn value<T: DeserializeOwned>(raw: Option<&RawValue>) -> Option<T> {
    serde_json::from_str(raw?.get()).ok()
}

/// What an oversized event's head names.
fn oversized(head: &[u8]) -> Data {
    let (top, _) = members(head, false);
    Data::Oversized {
        name: value(top.event),
        workflow_run_id: value(top.workflow_run_id),
    }
}

/// The run object of a `workflow_finished` event, its members as they appear.
#[derive(Deserialize, Default)]
struct Run<'a> {
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    total_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    total_steps: Option<&'a RawValue>,
    #[serde(borrow)]
    elapsed_time: Option<&'a RawValue>,
}

/// Summarises a complete event's data.
fn read(data: &[u8]) -> Data {
    let (top, valid) = members(data, true);
    if let Some(name) = top.other {
        return Data::Dify(DifyEvent::Other { name });
    }
    let Some(name) = value::<Box<str>>(top.event).filter(|_| valid) else {
        return Data::Opaque;
    };
    // The ids are read only for the events that carry them to someone (most are text chunks).
    let ids = || {
        (
            value::<Box<str>>(top.task_id),
            value::<Box<str>>(top.workflow_run_id),
        )
    };
    let event = match &*name {
        "workflow_started" => match ids() {
            (Some(task_id), Some(workflow_run_id)) => DifyEvent::WorkflowStarted {
                task_id,
                workflow_run_id,
            },
            _ => DifyEvent::Other { name },
        },
        "workflow_finished" => {
            let (task_id, Some(workflow_run_id)) = ids() else {
                return Data::Dify(DifyEvent::Other { name });
            };
            let run: Run = top
                .data
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .unwrap_or_default();
            // The run object borrows from `data`, so its address gives its place.
            let span = top.data.map(|raw| {
                let at = raw.get().as_ptr() as usize - data.as_ptr() as usize;
                at..at + raw.get().len()
            });
            DifyEvent::WorkflowFinished(Box::new(WorkflowFinished {
                workflow_run_id,
                task_id,
                status: value(run.status),
                total_tokens: value(run.total_tokens),
                total_steps: value(run.total_steps),
                elapsed_time: value(run.elapsed_time),
                raw: Bytes::copy_from_slice(data),
                run: span,
            }))
        }
        "error" => DifyEvent::Error {
            raw: Bytes::copy_from_slice(data),
        },
        _ => DifyEvent::Other { name },
    };
    Data::Dify(event)
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
