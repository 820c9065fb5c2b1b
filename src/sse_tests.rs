use super::*;
use proptest::prelude::*;

const RUN: &str = "5ad4cb98-f0c7-4085-b384-88c403be6290";
const TASK: &str = "d6c3a7e1-2b0f-4c64-9a53-6f1a2b3c4d5e";

/// A streaming run as Dify writes it: JSON frames, a bare ping, a multi-line data frame.
fn dify_stream() -> String {
    let run_data = format!(
        r#"{{"id": "{RUN}", "workflow_id": "wf", "status": "succeeded", "outputs": {{"text": "h\u00e9llo\n"}}, "error": null, "elapsed_time": 1.25, "total_tokens": 42, "total_steps": 3, "created_at": 1700000000, "finished_at": 1700000002}}"#
    );
    [
        format!(r#"data: {{"event": "workflow_started", "task_id": "{TASK}", "workflow_run_id": "{RUN}", "data": {{"id": "{RUN}", "workflow_id": "wf", "created_at": 1700000000}}}}"#),
        String::new(),
        format!(r#"data: {{"event": "node_started", "task_id": "{TASK}", "workflow_run_id": "{RUN}", "data": {{"node_id": "n1"}}}}"#),
        String::new(),
        "event: ping".into(),
        String::new(),
        ": a comment".into(),
        format!(r#"data:{{"event": "text_chunk", "task_id": "{TASK}","#),
        r#"data: "data": {"text": "hi\n\ndata: no"}}"#.into(),
        String::new(),
        String::new(),
        format!(r#"data: {{"event": "workflow_finished", "task_id": "{TASK}", "workflow_run_id": "{RUN}", "data": {run_data}}}"#),
        String::new(),
        String::new(),
    ]
    .join("\n")
}

fn started() -> Data {
    Data::Dify(DifyEvent::WorkflowStarted {
        task_id: TASK.into(),
        workflow_run_id: RUN.into(),
    })
}

fn other(name: &str) -> Data {
    Data::Dify(DifyEvent::Other { name: name.into() })
}

fn feed_all(chunks: &[&[u8]], cap: usize) -> Vec<Event> {
    let mut observer = Observer::new(cap);
    chunks.iter().flat_map(|c| observer.feed(c)).collect()
}

fn whole(stream: &str) -> Vec<Event> {
    feed_all(&[stream.as_bytes()], 1 << 20)
}

fn data_only(events: &[Event]) -> Vec<Data> {
    events.iter().map(|e| e.data.clone()).collect()
}

#[test]
fn a_dify_stream_yields_one_summary_per_event() {
    let events = whole(&dify_stream());
    assert_eq!(events.len(), 5);
    assert_eq!(
        events[0],
        Event {
            field: None,
            data: started()
        }
    );
    assert_eq!(events[1].data, other("node_started"));
    assert_eq!(
        events[2],
        Event {
            field: Some("ping".into()),
            data: Data::Empty
        }
    );
    assert_eq!(events[2].name(), Some("ping"));
    assert_eq!(events[3].data, other("text_chunk"));
    let Data::Dify(DifyEvent::WorkflowFinished(finished)) = &events[4].data else {
        panic!("not finished: {:?}", events[4]);
    };
    assert_eq!(events[4].name(), Some("workflow_finished"));
    assert_eq!(&*finished.workflow_run_id, RUN);
    assert_eq!(finished.task_id.as_deref(), Some(TASK));
    assert_eq!(finished.status.as_deref(), Some("succeeded"));
    assert_eq!(
        (
            finished.total_tokens,
            finished.total_steps,
            finished.elapsed_time
        ),
        (Some(42), Some(3), Some(1.25))
    );
    let frame = dify_stream();
    let line = frame
        .lines()
        .find(|l| l.contains("workflow_finished"))
        .unwrap();
    assert_eq!(
        finished.raw(),
        line.strip_prefix("data: ").unwrap().as_bytes()
    );
    let run = finished.run_data().unwrap();
    assert!(run.starts_with(b"{\"id\"") && run.ends_with(b"1700000002}"));
    assert!(line.contains(std::str::from_utf8(&run).unwrap()));
}

#[test]
fn every_line_ending_frames_the_same_events() {
    let lf = dify_stream();
    let want = whole(&lf);
    assert_eq!(whole(&lf.replace('\n', "\r\n")), want);
    assert_eq!(whole(&lf.replace('\n', "\r")), want);
}

#[test]
fn every_split_point_gives_the_same_events() {
    let stream = dify_stream().replace('\n', "\r\n");
    let b = stream.as_bytes();
    let want = whole(&stream);
    for cut in 0..=b.len() {
        assert_eq!(
            feed_all(&[&b[..cut], &b[cut..]], 1 << 20),
            want,
            "cut at {cut}"
        );
    }
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    assert_eq!(feed_all(&bytes, 1 << 20), want);
}

#[test]
fn fields_follow_the_sse_rules() {
    // The last `event:` wins, one space after the colon is dropped, `data` alone is an empty
    // data line, unknown fields and `id`/`retry` are ignored, a comment-only frame is nothing.
    let stream = "event: a\nevent:  b\nid: 7\nretry: 10\nfoo: bar\ndata\ndata:{\"event\":\"x\"}\n\n: only a comment\n\nid: 8\n\n";
    let events = whole(stream);
    // The two data lines join with LF, so the data is `\n{"event":"x"}`: still JSON.
    assert_eq!(
        events,
        vec![Event {
            field: Some(" b".into()),
            data: other("x")
        }]
    );
    let events = whole("event\ndata: {\"event\":\"y\"}\ndataa: z\n\n");
    assert_eq!(
        events,
        vec![Event {
            field: Some("".into()),
            data: other("y")
        }]
    );
}

#[test]
fn data_that_is_not_a_named_json_object_is_opaque() {
    for data in [
        "[DONE]",
        "hello",
        "{\"no_event\":1}",
        "{\"event\":5}",
        "{\"event\":\"workflow_finished\"",
        "{\"event\":\"error\",\"status\":",
        "",
    ] {
        let events = whole(&format!("data: {data}\n\n"));
        assert_eq!(data_only(&events), vec![Data::Opaque], "{data}");
    }
}

#[test]
fn an_event_not_acted_on_is_read_only_up_to_its_name() {
    // Most of a stream (text chunks, nodes): named by its first member, the rest not read,
    // so not checked either; wherever the name comes, reading stops there.
    for data in [
        "{\"event\":\"text_chunk\",\"data\":{\"text\":\"Caf\\u00e9\"}}",
        "{\"event\":\"text_chunk\",\"data\":{\"text\":",
        "{\"task_id\":\"t\",\"event\":\"text_chunk\",\"data\":[}",
    ] {
        let events = whole(&format!("data: {data}\n\n"));
        assert_eq!(data_only(&events), vec![other("text_chunk")], "{data}");
    }
    // The events the gateway acts on are read whole: one whose data is cut is opaque.
    let events = whole(
        "data: {\"event\":\"workflow_started\",\"task_id\":\"t\",\"workflow_run_id\":\"r\"\n\n",
    );
    assert_eq!(data_only(&events), vec![Data::Opaque]);
}

#[test]
fn started_and_finished_without_their_ids_are_other_events() {
    let stream = "data: {\"event\":\"workflow_started\",\"task_id\":\"t\"}\n\ndata: {\"event\":\"workflow_finished\",\"task_id\":\"t\",\"data\":{}}\n\n";
    assert_eq!(
        data_only(&whole(stream)),
        vec![other("workflow_started"), other("workflow_finished")]
    );
}

#[test]
fn finished_fields_of_the_wrong_type_are_absent() {
    let stream = "data: {\"event\":\"workflow_finished\",\"workflow_run_id\":\"r\",\"data\":{\"status\":1,\"total_tokens\":\"x\",\"elapsed_time\":null}}\n\n";
    let events = whole(stream);
    let Data::Dify(DifyEvent::WorkflowFinished(f)) = &events[0].data else {
        panic!("{events:?}");
    };
    assert_eq!(
        (&f.status, f.total_tokens, f.elapsed_time),
        (&None, None, None)
    );
    assert_eq!(f.task_id, None);
    let none = whole("data: {\"event\":\"workflow_finished\",\"workflow_run_id\":\"r\"}\n\n");
    let Data::Dify(DifyEvent::WorkflowFinished(f)) = &none[0].data else {
        panic!("{none:?}");
    };
    assert_eq!(f.run_data(), None);
}

#[test]
fn an_oversized_event_is_skipped_but_named_and_the_next_one_read() {
    let big = "x".repeat(10_000);
    let stream = format!(
        "data: {{\"event\": \"workflow_finished\", \"workflow_run_id\": \"{RUN}\", \"data\": {{\"outputs\": \"{big}\"}}}}\n\n\
         data: {{\"event\": \"text_chunk\"}}\n\n"
    );
    let mut observer = Observer::new(1000);
    let mut events = Vec::new();
    for chunk in stream.as_bytes().chunks(7) {
        events.extend(observer.feed(chunk));
        assert!(
            observer.data.capacity() <= 2 * HEAD_BYTES,
            "{}",
            observer.data.capacity()
        );
    }
    assert_eq!(
        data_only(&events),
        vec![
            Data::Oversized {
                name: Some("workflow_finished".into()),
                workflow_run_id: Some(RUN.into())
            },
            other("text_chunk"),
        ]
    );
    assert_eq!(events[0].name(), Some("workflow_finished"));
    // A huge `event:` field counts against the cap too.
    let stream = format!("event: {big}\ndata: {{\"event\":\"a\"}}\n\n");
    let events = feed_all(&[stream.as_bytes()], 1000);
    assert_eq!(events[0].field.as_deref().map(str::len), Some(HEAD_BYTES));
    assert!(matches!(events[0].data, Data::Oversized { .. }));
}

#[test]
fn a_bom_at_the_start_is_skipped_even_split() {
    let stream = format!("\u{feff}{}", dify_stream());
    let b = stream.as_bytes();
    let want = whole(&dify_stream());
    assert_eq!(feed_all(&[b], 1 << 20), want);
    assert_eq!(feed_all(&[&b[..1], &b[1..2], &b[2..]], 1 << 20), want);
    // Not a BOM: the bytes are part of the first field name, which is then unknown.
    let events = feed_all(
        &[
            b"\xEF\xBB",
            b"data: {\"event\":\"a\"}\n\ndata: {\"event\":\"b\"}\n\n",
        ],
        1 << 20,
    );
    assert_eq!(data_only(&events), vec![other("b")]);
}

#[test]
fn an_unfinished_event_yields_nothing() {
    assert!(whole("data: {\"event\":\"a\"}\n").is_empty());
    assert!(whole("data: {\"event\":\"a\"}").is_empty());
}

#[test]
fn heartbeats_only_fit_between_events() {
    let mut observer = Observer::new(1 << 20);
    assert!(observer.is_between_events());
    for (chunk, between) in [
        (&b"data: {\"event\":"[..], false),
        (b"\"a\"}\n", false),
        (b"\n", true),
        (b"event: ping\r", false),
        (b"\r", true),
        (b":", false),
        (b" c\n", true),
        (b"id: 1\n", true),
        (b"x", false),
    ] {
        observer.feed(chunk);
        assert_eq!(observer.is_between_events(), between, "after {chunk:?}");
    }
    // The heartbeat itself is a comment and a blank line: no event, still between events.
    observer.feed(b"\n");
    assert!(observer.feed(&heartbeat()).is_empty());
    assert!(observer.is_between_events());
    assert_eq!(HEARTBEAT, b": ping\n\n");
    let mut fresh = Observer::new(16);
    fresh.feed(b"\xEF\xBB");
    assert!(!fresh.is_between_events());
}

proptest! {
    /// Any chunking of a Dify stream, in any line-ending style, yields the same events.
    #[test]
    fn chunking_never_changes_the_events(
        ending in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let stream = dify_stream().replace('\n', ending);
        let b = stream.as_bytes();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(b.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([b.len()]) {
            chunks.push(&b[from..cut]);
            from = cut;
        }
        prop_assert_eq!(feed_all(&chunks, 1 << 20), whole(&dify_stream()));
    }
}
