//! `latent serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1/*`, [`routes`]) and a web page over one
//! loaded model. Requests are read as AUTOMATIC1111's FastAPI reads them ([`request`]), queued
//! in a bounded FIFO for the one worker thread that owns the model ([`queue`]), and run as
//! batch runs ([`job`]), the same loop `latent batch` uses. [`models`] lists the models a
//! client may switch to.
pub mod api;
pub mod job;
pub mod models;
pub mod queue;
pub mod request;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Map;

use crate::{Error, Result};
use models::Catalog;
use queue::{Loader, Options, Queue};

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The starting model as the loader takes it.
    pub model_spec: String,
    /// Folder of further diffusers models clients may switch to.
    pub models_dir: Option<PathBuf>,
    /// Accepted `user:password` pairs; empty: no authentication.
    pub credentials: Vec<(String, String)>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Requests that may wait behind the one in flight.
    pub queue: usize,
    /// Where `save_images` requests put their folders.
    pub outputs: PathBuf,
}

/// Reads `--api-auth`'s `user:password[,user:password...]`, as AUTOMATIC1111 does.
pub fn parse_credentials(text: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .map(|pair| match pair.split_once(':') {
            Some((user, password)) if !user.is_empty() => {
                Ok((user.to_string(), password.to_string()))
            }
            _ => Err(Error::InvalidInput(format!(
                "api auth `{pair}`: expected user:password (several separated by commas)"
            ))),
        })
        .collect()
}

/// Runs the server until Ctrl-C: binds `config.listen` (before any loading, so a taken port
/// fails at once), loads the starting model on the worker thread, then serves. `on_ready` is
/// called with the bound address once requests are answered. Ctrl-C stops accepting, interrupts
/// the job in flight and refuses the queued ones, lets the open requests answer, and returns; a
/// second Ctrl-C exits at once.
pub fn run(config: ServeConfig, loader: Box<Loader>, on_ready: &dyn Fn(SocketAddr)) -> Result<()> {
    if config.queue == 0 {
        return Err(Error::InvalidInput(
            "the queue must hold at least 1 request".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot start the async runtime: {e}")))?;
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| Error::InvalidInput(format!("cannot listen on {}: {e}", config.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::InvalidInput(format!("cannot listen on {}: {e}", config.listen)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::InvalidInput(format!("cannot listen on {address}: {e}")))?;

    let options = Options {
        model: String::new(),
        clip_skip: 1,
        preview_every: 5,
        other: Map::new(),
    };
    let (queue, start, worker) =
        Queue::start(loader, config.model_spec.clone(), config.queue, options)?;
    let catalog = Catalog::new(
        &start.name,
        &config.model_spec,
        config.models_dir.as_deref(),
    )?;
    queue.shared().options().model = start.name.clone();
    let shared = Arc::clone(queue.shared());
    let app = Arc::new(routes::App {
        queue,
        catalog,
        start,
        outputs: config.outputs.clone(),
        credentials: config.credentials.clone(),
    });
    let router = routes::router(app, config.max_body);

    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        on_ready(address);
        let stop = async move {
            if tokio::signal::ctrl_c().await.is_err() {
                // No signal handling: run until killed.
                std::future::pending::<()>().await;
            }
            eprintln!("stopping: interrupting the job in flight, refusing queued requests (Ctrl-C again to quit now)");
            shared.stop();
            tokio::spawn(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("stopped");
                    std::process::exit(130);
                }
            });
        };
        axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
    });
    // The router (and with it the queue's sender) is gone: the worker ends after its job.
    drop(runtime);
    let _ = worker.join();
    served.map_err(|e| Error::InvalidInput(format!("server error: {e}")))
}
