//! Files and audio: streamed uploads, the size limit, previews, transcripts.

use bytes::Bytes;
use dify_gateway::mock::UploadRecord;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::{bytes_body, mock, within, Http, ReqBody};

const BOUNDARY: &str = "----mock-boundary-7MA4YWxkTrZu0gW";
const MIB: u64 = 1024 * 1024;

/// A multipart body made as it is sent: `fields` first, then a file of `size` bytes of `fill`,
/// then `after`.
fn multipart(
    fields: &[(&str, &str)],
    file: (&str, &str, u64, u8),
    after: &[(&str, &str)],
) -> ReqBody {
    let text = |fs: &[(&str, &str)]| {
        fs.iter()
            .map(|(k, v)| {
                format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
            })
            .collect::<String>()
    };
    let (name, mime, size, fill) = file;
    let head = format!(
        "{}--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: {mime}\r\n\r\n",
        text(fields)
    );
    let tail = format!("\r\n{}--{BOUNDARY}--\r\n", text(after));
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![fill; CHUNK as usize]);
    let body = (0..size.div_ceil(CHUNK))
        .map(move |i| chunk.slice(..(size - i * CHUNK).min(CHUNK) as usize));
    let all = std::iter::once(Bytes::from(head))
        .chain(body)
        .chain(std::iter::once(Bytes::from(tail)));
    StreamBody::new(futures_util::stream::iter(
        all.map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
    ))
    .boxed()
}

async fn upload(http: &Http, path: &str, body: ReqBody) -> super::Got {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    http.call(Method::POST, path, &[("content-type", &ct)], body)
        .await
}

#[tokio::test]
async fn an_upload_is_streamed_through_and_counted_not_held() {
    let (up, http) = mock().await;
    up.set_upload_limit(32 * MIB);
    let size = 20 * MIB;
    let got = upload(
        &http,
        "/v1/files/upload",
        multipart(
            &[],
            ("Report 2024.PDF", "application/pdf", size, b'a'),
            &[("user", "alice")],
        ),
    )
    .await;
    assert_eq!(got.status, StatusCode::CREATED, "{}", got.text());
    assert!(got.text().starts_with(r#"{"id": ""#));
    let v = got.json();
    assert_eq!(v["name"], "Report 2024.PDF");
    assert_eq!(v["size"], size);
    assert_eq!(v["extension"], "pdf");
    assert_eq!(v["mime_type"], "application/pdf");
    assert!(v["created_at"].is_u64());
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        up.uploads(),
        [UploadRecord {
            path: "/v1/files/upload".into(),
            user: Some("alice".into()),
            name: "Report 2024.PDF".into(),
            mime_type: "application/pdf".into(),
            size,
            file_id: Some(id.into()),
        }]
    );
    // The uploader is an end user Dify can describe.
    let user = http
        .get(&format!(
            "/v1/end-users/{}",
            v["created_by"].as_str().unwrap()
        ))
        .await;
    assert_eq!(user.json()["session_id"], "alice");
    // The mock kept none of it: its preview is filler of the same size, not the bytes sent.
    let resp = http
        .send(
            Method::GET,
            &format!("/v1/files/{id}/preview"),
            &[],
            bytes_body(Bytes::new()),
        )
        .await;
    assert_eq!(resp.headers()["content-type"], "application/pdf");
    assert_eq!(resp.headers()["content-length"], size.to_string().as_str());
    let mut body = resp.into_body();
    let mut seen = 0u64;
    while let Some(frame) = within(body.frame()).await {
        let data = frame.unwrap().into_data().unwrap_or_default();
        assert!(!data.contains(&b'a'));
        seen += data.len() as u64;
    }
    assert_eq!(seen, size);
}

#[tokio::test]
async fn a_small_file_previews_as_itself() {
    let (_up, http) = mock().await;
    let got = upload(
        &http,
        "/v1/files/upload",
        multipart(&[("user", "bob")], ("note.txt", "text/plain", 5, b'z'), &[]),
    )
    .await;
    let id = got.json()["id"].as_str().unwrap().to_owned();
    let preview = http.get(&format!("/v1/files/{id}/preview")).await;
    assert_eq!(preview.body, "zzzzz");
    assert_eq!(preview.header("content-disposition"), None);
    let download = http
        .get(&format!("/v1/files/{id}/preview?as_attachment=true"))
        .await;
    assert_eq!(
        download.header("content-disposition"),
        Some("attachment; filename*=UTF-8''note.txt")
    );
    let missing = http.get("/v1/files/nope/preview").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["code"], "file_not_found");
}

#[tokio::test]
async fn uploads_past_the_limit_or_without_a_file_are_refused() {
    let (up, http) = mock().await;
    up.set_upload_limit(100 * 1024);
    let big = upload(
        &http,
        "/v1/files/upload",
        multipart(
            &[("user", "a")],
            ("big.bin", "application/octet-stream", 300 * 1024, b'b'),
            &[],
        ),
    )
    .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.json()["code"], "file_too_large");
    assert_eq!(big.json()["status"], 413);
    let json = http.post_json("/v1/files/upload", "{}").await;
    assert_eq!(json.status, StatusCode::BAD_REQUEST);
    assert_eq!(json.json()["code"], "no_file_uploaded");
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let no_file = http
        .call(
            Method::POST,
            "/v1/files/upload",
            &[("content-type", &ct)],
            bytes_body(format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\na\r\n--{BOUNDARY}--\r\n"
            )),
        )
        .await;
    assert_eq!(no_file.json()["code"], "no_file_uploaded");
    assert!(up.uploads().is_empty());
}

#[tokio::test]
async fn audio_is_transcribed_and_text_spoken() {
    let (up, http) = mock().await;
    let got = upload(
        &http,
        "/v1/audio-to-text",
        multipart(
            &[("user", "carol")],
            ("hello.mp3", "audio/mpeg", 4096, 1),
            &[],
        ),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.json()["text"].is_string());
    assert_eq!(up.uploads()[0].path, "/v1/audio-to-text");
    assert_eq!(up.uploads()[0].size, 4096);
    let speech = http
        .post_json("/v1/text-to-audio", r#"{"text": "hello", "user": "carol"}"#)
        .await;
    assert_eq!(speech.status, StatusCode::OK);
    assert_eq!(speech.header("content-type"), Some("audio/mpeg"));
    assert_eq!(&speech.body[..2], [0xFF, 0xFB]);
    let no_user = http
        .post_json("/v1/text-to-audio", r#"{"text": "hello"}"#)
        .await;
    assert_eq!(no_user.json()["code"], "invalid_param");
}
