//! An app's descriptions (`/info`, `/parameters`, `/meta`, `/site`), kept per app for
//! `cache.app_meta_ttl`: every SDK asks for them at start-up, and they change only when the app
//! is republished.
//!
//! Invariant: only a 200 answer is kept; concurrent requests for the same description of the
//! same app make one upstream request between them; an answer is never kept past the TTL.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use moka::sync::Cache as Moka;
use tokio::sync::OnceCell;

use crate::cache::AppId;
use crate::outcome::CacheOutcome;
use crate::routes::Route;

/// One kept answer.
#[derive(Debug)]
pub struct Kept {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The kept descriptions of every app.
pub struct MetaCache {
    cells: Moka<(AppId, Route), Arc<OnceCell<Arc<Kept>>>>,
}

impl MetaCache {
    pub fn new(ttl: Duration) -> MetaCache {
        MetaCache {
            cells: Moka::builder().max_capacity(4096).time_to_live(ttl).build(),
        }
    }

    /// The kept answer of `route` for `app`, or `fetch`'s (kept when it is a 200), with how it
    /// was served. Concurrent callers wait for one fetch; a failed or non-200 one is not kept.
    pub async fn get<E>(
        &self,
        app: AppId,
        route: Route,
        fetch: impl Future<Output = Result<Kept, E>>,
    ) -> Result<(Arc<Kept>, CacheOutcome), E> {
        let key = (app, route);
        let cell = self.cells.get_with(key, || Arc::new(OnceCell::new()));
        let ran = AtomicBool::new(false);
        let mut passed = None;
        let got = cell
            .get_or_try_init(|| async {
                ran.store(true, Ordering::Relaxed);
                let kept = Arc::new(fetch.await.map_err(Some)?);
                if kept.status == StatusCode::OK {
                    Ok(kept)
                } else {
                    // Passed on, not kept: the next request asks again.
                    passed = Some(Arc::clone(&kept));
                    Err(None)
                }
            })
            .await;
        match got {
            Ok(kept) => {
                let outcome = if ran.load(Ordering::Relaxed) {
                    CacheOutcome::Miss
                } else {
                    CacheOutcome::Hit
                };
                Ok((Arc::clone(kept), outcome))
            }
            Err(None) => Ok((passed.expect("set with Err(None)"), CacheOutcome::Miss)),
            Err(Some(failure)) => Err(failure),
        }
    }
}
