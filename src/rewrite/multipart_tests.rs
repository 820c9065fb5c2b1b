use super::*;
use proptest::prelude::*;

const BOUNDARY: &str = "XyZ123";
const CT: &str = "multipart/form-data; boundary=XyZ123";

fn prefix() -> UserPrefix {
    UserPrefix::new("team-a:").unwrap()
}

/// Runs `body` through a rewriter cut at the given (sorted) offsets; the first error of
/// `push` or `finish` wins.
fn run_split(body: &[u8], cuts: &[usize], cap: usize) -> Result<Vec<u8>, MultipartError> {
    let mut rw = Rewriter::new(CT, &prefix(), cap).unwrap();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        for piece in rw.push(Bytes::copy_from_slice(&body[from..cut]))? {
            out.extend_from_slice(&piece);
        }
        from = cut;
    }
    rw.finish()?;
    Ok(out)
}

fn whole(body: &[u8]) -> Result<Vec<u8>, MultipartError> {
    run_split(body, &[], DEFAULT_HEADER_CAP)
}

/// The result of `body` fed whole, checked to be the same fed one byte at a time.
fn rewrite(body: &[u8]) -> Result<Vec<u8>, MultipartError> {
    let bytewise: Vec<usize> = (1..body.len()).collect();
    let out = whole(body);
    assert_eq!(out, run_split(body, &bytewise, DEFAULT_HEADER_CAP));
    out
}

/// A form with CRLF line ends: each part is its header lines and content.
fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, content) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn field(name: &str) -> String {
    format!("Content-Disposition: form-data; name=\"{name}\"")
}

#[test]
fn prefixes_the_user_field_only() {
    let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain";
    let body = form(&[
        (file, b"user=bob\r\nhello"),
        (&field("user"), b"alice"),
        (&field("inputs"), b"{\"user\":\"x\"}"),
    ]);
    let want = form(&[
        (file, b"user=bob\r\nhello"),
        (&field("user"), b"team-a:alice"),
        (&field("inputs"), b"{\"user\":\"x\"}"),
    ]);
    assert_eq!(rewrite(&body).unwrap(), want);
}

#[test]
fn every_split_point_gives_the_same_output() {
    let body = form(&[(&field("x"), b"\r\n-\r\n--XyZ12"), (&field("user"), b"")]);
    let want = whole(&body).unwrap();
    for cut in 0..=body.len() {
        assert_eq!(
            run_split(&body, &[cut], DEFAULT_HEADER_CAP).unwrap(),
            want,
            "cut at {cut}"
        );
    }
}

#[test]
fn dispositions_the_upstream_reads_as_user_are_prefixed() {
    for headers in [
        "Content-Disposition: form-data; name=user",
        "content-DISPOSITION :FORM-DATA;NAME=\"user\"",
        "Content-Disposition: form-data ;  name=\"user\" ; foo=bar;",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: attachment; name=user",
    ] {
        let body = form(&[(headers, b"bob")]);
        let want = form(&[(headers, b"team-a:bob")]);
        assert_eq!(rewrite(&body).unwrap(), want, "{headers}");
    }
}

#[test]
fn other_parts_pass_unchanged() {
    for headers in [
        "Content-Disposition: form-data; name=\"user\"; filename=\"u.txt\"",
        "Content-Disposition: form-data; name=\"user\"; filename=\"\"",
        "Content-Disposition: form-data; name=\"user\"; FILENAME*=utf-8''%C3%A9",
        "Content-Disposition: form-data; name=\"user\"; filename=\"C:\\dir\\é.txt\"",
        "Content-Disposition: form-data; name=\"users\"",
        "Content-Disposition: form-data; name=\"User\"",
        "Content-Disposition: form-data; name=\"user \"",
        "Content-Disposition: form-data",
        "X-User: user\r\nContent-Disposition: form-data; name=x",
    ] {
        let body = form(&[(headers, b"bob")]);
        assert_eq!(rewrite(&body).unwrap(), body, "{headers}");
    }
}

#[test]
fn preamble_padding_and_epilogue_pass_through() {
    let body = b"preamble\r\n--XyZ123 \t\r\nContent-Disposition: form-data; name=user\r\n\r\nbob\r\n--XyZ123--  \r\nepilogue --XyZ123\n";
    let want = b"preamble\r\n--XyZ123 \t\r\nContent-Disposition: form-data; name=user\r\n\r\nteam-a:bob\r\n--XyZ123--  \r\nepilogue --XyZ123\n";
    assert_eq!(rewrite(body).unwrap(), want);
    let empty = b"--XyZ123--";
    assert_eq!(rewrite(empty).unwrap(), empty);
}

#[test]
fn boundary_text_not_after_a_line_end_is_content() {
    let body = form(&[
        (&field("a"), b"--XyZ123\r\nx--XyZ123--"),
        (&field("user"), b"--XyZ123"),
    ]);
    let want = form(&[
        (&field("a"), b"--XyZ123\r\nx--XyZ123--"),
        (&field("user"), b"team-a:--XyZ123"),
    ]);
    assert_eq!(rewrite(&body).unwrap(), want);
}

#[test]
fn bodies_the_upstream_could_read_differently_are_refused() {
    use MultipartError::{PartHeaders, StrayBoundary};
    let part = |headers: &str| form(&[(headers, b"bob")]);
    let cases: Vec<(Vec<u8>, MultipartError)> = vec![
        (form(&[(&field("a"), b"x\n--XyZ123\r\n")]), StrayBoundary),
        (form(&[(&field("a"), b"x\r--XyZ123\r\n")]), StrayBoundary),
        (form(&[(&field("a"), b"x\r\n--XyZ123x")]), StrayBoundary),
        (form(&[(&field("a"), b"x\r\n--XyZ123 \n")]), StrayBoundary),
        (form(&[(&field("a"), b"x\r\n--XyZ123-\r\n")]), StrayBoundary),
        (
            [b"pre--XyZ123\r\n".as_slice(), &part(&field("user"))].concat(),
            StrayBoundary,
        ),
        (
            [b"pre\n".as_slice(), &part(&field("user"))].concat(),
            StrayBoundary,
        ),
        (part("Content-Type: text/plain"), PartHeaders),
        (part(""), PartHeaders),
        (
            part(&format!("{}\r\n{}", field("x"), field("user"))),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data;\r\n name=\"user\""),
            PartHeaders,
        ),
        (
            part("Content-Type: a\nContent-Disposition: form-data; name=user"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name=x\r"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name*=utf-8''user"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name*0=user"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name=\"us\\er\""),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name=\"a\"; name=\"user\""),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name = \"user\""),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; junk name=user"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name=\"user"),
            PartHeaders,
        ),
        (
            part("Content-Disposition: form-data; name=\"user\"x"),
            PartHeaders,
        ),
        (
            part("X-Note\r\nContent-Disposition: form-data; name=user"),
            PartHeaders,
        ),
        (
            part("\u{1c}Content-Disposition: form-data; name=user"),
            PartHeaders,
        ),
        (
            part("\u{a0}Content-Disposition: form-data; name=user"),
            PartHeaders,
        ),
    ];
    for (body, want) in cases {
        assert_eq!(
            rewrite(&body),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn bodies_without_their_closing_delimiter_are_refused() {
    let body = form(&[(&field("user"), b"bob")]);
    for end in [0, 5, body.len() - 5, body.len() - 3] {
        assert_eq!(
            rewrite(&body[..end]),
            Err(MultipartError::Truncated),
            "{end}"
        );
    }
}

#[test]
fn header_blocks_are_capped() {
    let headers = format!("{}\r\nX-Pad: {}", field("user"), "p".repeat(100));
    let body = form(&[(&headers, b"bob")]);
    let block = headers.len() + 4;
    let cuts: Vec<usize> = (1..body.len()).collect();
    assert!(run_split(&body, &cuts, block).is_ok());
    for cap in [block - 1, 20] {
        let err = Err(MultipartError::HeadersTooLarge(cap));
        assert_eq!(run_split(&body, &[], cap), err);
        assert_eq!(run_split(&body, &cuts, cap), err);
    }
}

#[test]
fn the_boundary_comes_from_a_form_data_content_type() {
    for (ct, want) in [
        ("multipart/form-data; boundary=abc", "abc"),
        (
            "Multipart/Form-Data;BOUNDARY=\"----WebKitFormBoundary7MA4\"",
            "----WebKitFormBoundary7MA4",
        ),
        (
            "multipart/form-data; charset=utf-8; boundary=\"a'()+_,-./:=?\"",
            "a'()+_,-./:=?",
        ),
    ] {
        assert_eq!(boundary(ct), Ok(want), "{ct}");
    }
    let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
    for ct in [
        "application/json",
        "multipart/mixed; boundary=abc",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=\"\"",
        "multipart/form-data; boundary=\"a b\"",
        "multipart/form-data; boundary=\"a\\b\"",
        "multipart/form-data; boundary=a; boundary=b",
        "multipart/form-data; boundary=a{b",
        &long,
    ] {
        assert_eq!(boundary(ct), Err(MultipartError::ContentType), "{ct}");
        assert!(Rewriter::new(ct, &prefix(), DEFAULT_HEADER_CAP).is_err());
    }
}

#[test]
fn a_large_file_streams_with_bounded_memory_and_no_copies() {
    // Pseudo-random bytes, one in 16 a line end or a dash.
    let mut state = 0x2545_f491_u32;
    let content: Vec<u8> = (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match state % 16 {
                0 => b"\r\n-"[(state >> 8) as usize % 3],
                _ => (state >> 16) as u8,
            }
        })
        .collect();
    let file = "Content-Disposition: form-data; name=\"file\"; filename=\"big.bin\"";
    let body = form(&[(&field("user"), b"bob"), (file, &content)]);
    let mut rw = Rewriter::new(CT, &prefix(), DEFAULT_HEADER_CAP).unwrap();
    let (mut out, mut borrowed) = (Vec::new(), 0);
    for chunk in body.chunks(64 * 1024) {
        let chunk = Bytes::copy_from_slice(chunk);
        for piece in rw.push(chunk.clone()).unwrap() {
            let inside = chunk.as_ptr_range().contains(&piece.as_ptr());
            borrowed += if inside { piece.len() } else { 0 };
            out.extend_from_slice(&piece);
        }
        assert!(rw.held() <= "\r\n--XyZ123".len(), "held {}", rw.held());
    }
    rw.finish().unwrap();
    assert_eq!(
        out,
        form(&[(&field("user"), b"team-a:bob"), (file, &content)])
    );
    // Held tails are rare: almost every byte goes out as a slice of the chunk it came in.
    assert!(
        borrowed > body.len() * 9 / 10,
        "{borrowed} of {}",
        body.len()
    );
}

/// Fields as a real multipart parser reads them: (name, file name, content).
fn oracle(body: Vec<u8>) -> Vec<(String, Option<String>, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let input = Ok::<_, std::convert::Infallible>(Bytes::from(body));
        let mut parts = multer::Multipart::new(futures_util::stream::iter([input]), BOUNDARY);
        let mut fields = Vec::new();
        while let Some(f) = parts.next_field().await.unwrap() {
            let name = f.name().unwrap_or_default().to_owned();
            let file = f.file_name().map(str::to_owned);
            fields.push((name, file, f.bytes().await.unwrap().to_vec()));
        }
        fields
    })
}

/// Content bytes, dense in the pieces of a delimiter.
fn content() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..8),
        Just(b"\r\n".to_vec()),
        Just(b"\r\n--XyZ12".to_vec()),
        Just(b"-".to_vec()),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any chunking gives the single-chunk output, and a real parser reads that output as
    /// the same fields with the user field (and only it) prefixed.
    #[test]
    fn chunking_never_changes_the_output_and_a_parser_agrees(
        parts in proptest::collection::vec(
            (prop_oneof!["user", "file", "inputs", "User"], any::<bool>(), content()),
            1..5,
        ),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let dash = format!("--{BOUNDARY}");
        prop_assume!(parts.iter().all(|(_, _, c)| !c.windows(dash.len()).any(|w| w == dash.as_bytes())));
        let headers = |name: &str, file: bool| match file {
            true => format!("{}; filename=\"f.bin\"\r\nContent-Type: application/octet-stream", field(name)),
            false => field(name),
        };
        let sent: Vec<(String, &[u8])> = parts.iter().map(|(n, f, c)| (headers(n, *f), c.as_slice())).collect();
        let body = form(&sent.iter().map(|(h, c)| (h.as_str(), *c)).collect::<Vec<_>>());
        let single = whole(&body).unwrap();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(&run_split(&body, &cuts, DEFAULT_HEADER_CAP).unwrap(), &single);

        let want: Vec<(String, Option<String>, Vec<u8>)> = parts
            .iter()
            .map(|(name, file, c)| {
                let value = match (name.as_str(), file) {
                    ("user", false) => [b"team-a:".as_slice(), c].concat(),
                    _ => c.clone(),
                };
                (name.clone(), file.then(|| "f.bin".to_owned()), value)
            })
            .collect();
        prop_assert_eq!(oracle(single), want);
    }
}
