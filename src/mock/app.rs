//! The app around the runs: `GET /info`, `/parameters`, `/meta`, `/site`, `GET
//! /end-users/{id}`, `POST /text-to-audio` and `GET`/`POST /form/human_input/{form_token}`.
//!
//! Invariant: every `user` the mock meets becomes one end user, with one id for good, as Dify
//! creates an end user per session id on first sight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::Value;

use super::json::Obj;
use super::reply::{self, Reply};
use super::route::AppMeta;
use super::{lock, required_user, Answer, Body, Call, State};

/// The app's description.
const INFO: &str = "{\"name\": \"mock workflow\", \"description\": \"\", \"tags\": [], \"mode\": \"workflow\", \"author_name\": \"mock\"}\n";

/// The app's input form and limits.
const PARAMETERS: &str = "{\"user_input_form\": [{\"text-input\": {\"label\": \"query\", \"variable\": \"query\", \"required\": true, \"max_length\": 256, \"default\": \"\"}}], \"file_upload\": {\"image\": {\"enabled\": false, \"number_limits\": 3, \"transfer_methods\": [\"remote_url\", \"local_file\"]}}, \"system_parameters\": {\"file_size_limit\": 15, \"image_file_size_limit\": 10, \"audio_file_size_limit\": 50, \"video_file_size_limit\": 100, \"workflow_file_upload_limit\": 10}}\n";

/// The app's tool icons.
const META: &str = "{\"tool_icons\": {}}\n";

/// The app's web-app settings.
const SITE: &str = "{\"title\": \"mock workflow\", \"chat_color_theme\": null, \"chat_color_theme_inverted\": false, \"icon_type\": \"emoji\", \"icon\": \"\\ud83e\\udd16\", \"icon_background\": \"#FFEAD5\", \"icon_url\": null, \"description\": \"\", \"copyright\": null, \"privacy_policy\": null, \"custom_disclaimer\": \"\", \"default_language\": \"en-US\", \"show_workflow_steps\": true, \"use_icon_as_answer_icon\": false}\n";

/// The tenant and app every end user belongs to.
const TENANT_ID: &str = "11223344-5566-4788-99aa-bbccddeeff00";
const APP_ID: &str = "5c3d7f0e-1a2b-4c5d-8e9f-0a1b2c3d4e5f";

/// `GET /info`, `/parameters`, `/meta`, `/site`.
pub(super) fn meta(which: AppMeta) -> Response<Body> {
    reply::ok(match which {
        AppMeta::Info => INFO,
        AppMeta::Parameters => PARAMETERS,
        AppMeta::Meta => META,
        AppMeta::Site => SITE,
    })
}

/// End users by session id (the `user` a caller sends).
#[derive(Default)]
pub(super) struct EndUsers(Mutex<HashMap<String, EndUser>>);

struct EndUser {
    id: String,
    created_at: SystemTime,
}

impl EndUsers {
    /// The id of the end user for `session_id`, created on first sight.
    pub(super) fn meet(&self, session_id: &str) -> String {
        lock(&self.0)
            .entry(session_id.to_owned())
            .or_insert_with(|| EndUser {
                id: uuid::Uuid::new_v4().to_string(),
                created_at: SystemTime::now(),
            })
            .id
            .clone()
    }
}

/// `GET /end-users/{end_user_id}`.
pub(super) fn end_user(st: &State, id: &str) -> Answer {
    let users = lock(&st.users.0);
    let (session, user) = users
        .iter()
        .find(|(_, u)| u.id == id)
        .ok_or_else(|| reply::not_found("End user"))?;
    let at = humantime::format_rfc3339_seconds(user.created_at).to_string();
    let body = Obj::new()
        .str("id", &user.id)
        .str("tenant_id", TENANT_ID)
        .str("app_id", APP_ID)
        .str("type", "service_api")
        .str("external_user_id", session)
        .raw("name", "null")
        .bool("is_anonymous", false)
        .str("session_id", session)
        .str("created_at", &at)
        .str("updated_at", &at)
        .done();
    Ok(reply::ok(body))
}

/// A few silent MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz).
fn mp3() -> Bytes {
    const FRAME_LEN: usize = 417;
    let mut frame = vec![0u8; FRAME_LEN];
    frame[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x64]);
    Bytes::from(frame.repeat(8))
}

/// `POST /text-to-audio`: `audio/mpeg` for a `text` (or a `message_id`) and a `user`.
pub(super) fn text_to_audio(st: &State, call: &Call) -> Answer {
    let body = call.object()?;
    let user = required_user(&body)?;
    let has = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    if !has("text") && !has("message_id") {
        return Err(reply::invalid_param("text or message_id is required"));
    }
    st.users.meet(&user);
    Ok(reply::reply_response(Reply::with_type(
        StatusCode::OK,
        "audio/mpeg",
        mp3(),
    )))
}

/// `GET /form/human_input/{form_token}`: the paused form; `POST`: its answer (`inputs`, an
/// `action` of the form, a `user`), accepted with `{}`.
pub(super) fn human_input(st: &State, call: &Call) -> Answer {
    if call.method != Method::POST {
        let body = Obj::new()
            .str("form_content", "Please review the draft and confirm.")
            .raw("inputs", "[{\"type\": \"text_input\", \"output_variable_name\": \"comment\", \"default\": {\"type\": \"constant\", \"selector\": [], \"value\": \"\"}}]")
            .raw("resolved_default_values", "{\"comment\": \"\"}")
            .raw("user_actions", "[{\"id\": \"approve\", \"title\": \"Approve\", \"button_style\": \"primary\"}, {\"id\": \"reject\", \"title\": \"Request changes\", \"button_style\": \"default\"}]")
            .int("expiration_time", super::now_epoch() + 3600)
            .done();
        return Ok(reply::ok(body));
    }
    let body = call.object()?;
    let user = required_user(&body)?;
    if !body.get("inputs").is_some_and(Value::is_object) {
        return Err(reply::invalid_param("inputs is required"));
    }
    match body.get("action").and_then(Value::as_str) {
        Some("approve" | "reject") => {}
        _ => {
            return Err(reply::invalid_param(
                "action must be one of the form's actions",
            ))
        }
    }
    st.users.meet(&user);
    Ok(reply::ok("{}"))
}
