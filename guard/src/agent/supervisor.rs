//! How every task of the agent starts and stops: one way, per layer.
//!
//! A [`Layer`] is a group of tasks that live and die together (the bind
//! source, the owners model, the rule guard, the probes, the Kubernetes
//! watches …). Each layer has a child of the agent's [`CancellationToken`] and
//! its own [`TaskTracker`]: [`Layer::stop`] cancels the token and waits for
//! every task. A task either ends at the token on its own (the rule guard,
//! which removes its pins first: [`Layer::spawn_graceful`]) or is dropped at
//! its next await point ([`Layer::spawn`]). A task that ends while its layer
//! still runs is reported to the agent as [`AgentEvent::TaskEnded`]: nothing
//! stops silently.

use std::{any::Any, future::Future, panic::AssertUnwindSafe, time::Duration};

use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error};

use super::events::AgentEvent;
use crate::logging::ErrorChain;

/// Any task's error, boxed on its way to the supervisor.
pub type TaskError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long a layer's tasks may take to end once cancelled (the rule guard
/// removes its pins within this).
pub const LAYER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a task ended while its layer was still running.
#[derive(Debug, thiserror::Error)]
pub enum TaskFailure {
    #[error("stopped unexpectedly")]
    Returned,
    #[error("failed")]
    Failed(#[source] TaskError),
    #[error("panicked: {0}")]
    Panicked(String),
}

/// A group of tasks started and stopped together.
pub struct Layer {
    name: &'static str,
    token: CancellationToken,
    tracker: TaskTracker,
    events: mpsc::Sender<AgentEvent>,
}

impl Layer {
    /// A layer below `parent`: cancelling the parent stops it too.
    pub fn new(
        name: &'static str,
        parent: &CancellationToken,
        events: mpsc::Sender<AgentEvent>,
    ) -> Self {
        Self {
            name,
            token: parent.child_token(),
            tracker: TaskTracker::new(),
            events,
        }
    }

    /// Runs `task` until the layer stops; then it is dropped at its next await.
    pub fn spawn<F, E>(&self, task: &'static str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<TaskError>,
    {
        self.spawn_graceful(task, move |token| async move {
            tokio::select! {
                () = token.cancelled() => Ok(()),
                done = fut => done.map_err(Into::into),
            }
        });
    }

    /// Runs a task that watches the layer's token itself and may tear down
    /// before it returns (within [`LAYER_STOP_TIMEOUT`]).
    pub fn spawn_graceful<F, Fut, E>(&self, task: &'static str, start: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<TaskError>,
    {
        let token = self.token.clone();
        let events = self.events.clone();
        let layer = self.name;
        let fut = start(token.clone());
        self.tracker.spawn(async move {
            // Scoped: the task's own error type need not be Send.
            let failure = {
                match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(Ok(())) if token.is_cancelled() => return,
                    Ok(Ok(())) => TaskFailure::Returned,
                    Ok(Err(e)) => TaskFailure::Failed(e.into()),
                    Err(panic) => TaskFailure::Panicked(panic_message(panic.as_ref())),
                }
            };
            if token.is_cancelled() {
                // Its teardown failed: said, but the layer is stopping anyway.
                error!(event = "task_failed", layer, task, error = %ErrorChain(&failure), "task failed while stopping");
                return;
            }
            let _ = events
                .send(AgentEvent::TaskEnded {
                    layer,
                    task,
                    failure,
                })
                .await;
        });
    }

    /// Cancels the layer's token and waits for its tasks.
    pub async fn stop(&self) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(LAYER_STOP_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            error!(
                event = "layer_stop_timeout",
                layer = self.name,
                tasks = self.tracker.len(),
                timeout = ?LAYER_STOP_TIMEOUT,
                "layer did not stop in time"
            );
        } else {
            debug!(layer = self.name, "layer stopped");
        }
    }
}

impl Drop for Layer {
    /// A layer dropped without [`Layer::stop`] still stops its tasks.
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn stop_cancels_every_task_and_reports_none() {
        let (tx, mut rx) = mpsc::channel(8);
        let root = CancellationToken::new();
        let layer = Layer::new("test", &root, tx);
        layer.spawn(
            "forever",
            std::future::pending::<Result<(), std::io::Error>>(),
        );
        let torn_down = Arc::new(AtomicBool::new(false));
        let flag = torn_down.clone();
        layer.spawn_graceful("graceful", move |token| async move {
            token.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        });
        layer.stop().await;
        assert!(
            torn_down.load(Ordering::SeqCst),
            "teardown ran before stop returned"
        );
        drop(layer);
        assert!(rx.recv().await.is_none(), "a stop is not a task ending");
    }

    #[tokio::test]
    async fn a_task_ending_early_is_reported() {
        let (tx, mut rx) = mpsc::channel(8);
        let layer = Layer::new("test", &CancellationToken::new(), tx);
        layer.spawn("returns", async { Ok::<_, std::io::Error>(()) });
        layer.spawn("fails", async {
            Err::<(), _>(std::io::Error::other("boom"))
        });
        layer.spawn("panics", async {
            panic!("kaboom");
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(())
        });
        let mut seen = Vec::new();
        for _ in 0..3 {
            let Some(AgentEvent::TaskEnded { task, failure, .. }) = rx.recv().await else {
                panic!("expected TaskEnded");
            };
            seen.push((task, failure.to_string()));
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                ("fails", "failed".to_owned()),
                ("panics", "panicked: kaboom".to_owned()),
                ("returns", "stopped unexpectedly".to_owned()),
            ]
        );
    }
}
