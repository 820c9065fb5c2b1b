//! The Workflow App API's routes, as Dify lays them out under `/v1`.
//!
//! Invariant: a path names at most one route, and each route lists the methods Dify serves on
//! it; anything else under `/v1` is Dify's 404.

use http::Method;

/// One route of the Workflow App API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route<'a> {
    /// `GET /workflows/run/{workflow_run_id}`.
    RunDetail(&'a str),
    /// `POST /workflows/run`, or `/workflows/{workflow_id}/run` with the id.
    RunStart(Option<&'a str>),
    /// `POST /workflows/tasks/{task_id}/stop`.
    Stop(&'a str),
    /// `GET /workflow/{workflow_run_id}/events` (singular `workflow`).
    Events(&'a str),
    /// `GET /workflows/logs`.
    Logs,
    /// `POST /files/upload`.
    Upload,
    /// `GET /files/{file_id}/preview`.
    Preview(&'a str),
    /// `GET /info`, `/parameters`, `/meta`, `/site`.
    AppMeta(AppMeta),
    /// `GET /end-users/{end_user_id}`.
    EndUser(&'a str),
    /// `POST /audio-to-text`.
    AudioToText,
    /// `POST /text-to-audio`.
    TextToAudio,
    /// `GET`/`POST /form/human_input/{form_token}`.
    HumanInput(&'a str),
    /// Not a Workflow App route.
    Unknown,
}

/// The app's read-only descriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AppMeta {
    Info,
    Parameters,
    Meta,
    Site,
}

impl<'a> Route<'a> {
    pub(super) fn parse(path: &'a str) -> Route<'a> {
        let Some(rest) = path.strip_prefix("/v1/") else {
            return Route::Unknown;
        };
        // The run id is everything after the prefix, slashes and all, as Dify's router sees a
        // single path segment it cannot parse as a UUID.
        if let Some(id) = rest.strip_prefix("workflows/run/") {
            return Route::RunDetail(id);
        }
        let segs: Vec<&str> = rest.split('/').collect();
        match segs.as_slice() {
            ["workflows", "run"] => Route::RunStart(None),
            ["workflows", "logs"] => Route::Logs,
            ["workflows", "tasks", task, "stop"] => Route::Stop(task),
            ["workflows", workflow, "run"] => Route::RunStart(Some(workflow)),
            ["workflow", run, "events"] => Route::Events(run),
            ["files", "upload"] => Route::Upload,
            ["files", file, "preview"] => Route::Preview(file),
            ["info"] => Route::AppMeta(AppMeta::Info),
            ["parameters"] => Route::AppMeta(AppMeta::Parameters),
            ["meta"] => Route::AppMeta(AppMeta::Meta),
            ["site"] => Route::AppMeta(AppMeta::Site),
            ["end-users", id] => Route::EndUser(id),
            ["audio-to-text"] => Route::AudioToText,
            ["text-to-audio"] => Route::TextToAudio,
            ["form", "human_input", token] => Route::HumanInput(token),
            _ => Route::Unknown,
        }
    }

    /// Whether Dify serves `method` on this route (`HEAD` wherever `GET` is).
    pub(super) fn allows(&self, method: &Method) -> bool {
        let get = method == Method::GET || method == Method::HEAD;
        let post = method == Method::POST;
        match self {
            Route::RunDetail(_)
            | Route::Events(_)
            | Route::Logs
            | Route::Preview(_)
            | Route::AppMeta(_)
            | Route::EndUser(_) => get,
            Route::RunStart(_)
            | Route::Stop(_)
            | Route::Upload
            | Route::AudioToText
            | Route::TextToAudio => post,
            Route::HumanInput(_) => get || post,
            Route::Unknown => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_routes() {
        let cases = [
            ("/v1/workflows/run", Route::RunStart(None)),
            ("/v1/workflows/wf-1/run", Route::RunStart(Some("wf-1"))),
            ("/v1/workflows/run/abc", Route::RunDetail("abc")),
            ("/v1/workflows/run/a/b", Route::RunDetail("a/b")),
            ("/v1/workflows/tasks/t-1/stop", Route::Stop("t-1")),
            ("/v1/workflows/logs", Route::Logs),
            ("/v1/workflow/r-1/events", Route::Events("r-1")),
            ("/v1/workflows/r-1/events", Route::Unknown),
            ("/v1/files/upload", Route::Upload),
            ("/v1/files/f-1/preview", Route::Preview("f-1")),
            ("/v1/site", Route::AppMeta(AppMeta::Site)),
            ("/v1/end-users/u-1", Route::EndUser("u-1")),
            ("/v1/form/human_input/tok", Route::HumanInput("tok")),
            ("/v1/chat-messages", Route::Unknown),
            ("/v2/info", Route::Unknown),
        ];
        for (path, want) in cases {
            assert_eq!(Route::parse(path), want, "{path}");
        }
        assert!(Route::RunDetail("x").allows(&Method::HEAD));
        assert!(!Route::RunDetail("x").allows(&Method::POST));
        assert!(!Route::RunStart(None).allows(&Method::GET));
    }
}
