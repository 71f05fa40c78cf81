//! The axum + sqlx example plugin: a small JSON API of notes kept in SQLite, the kind of
//! service the dev loop's bench times (`bench/run.sh devloop`).
//!
//! `build` runs in each new worker's `on_worker_start`. It reads `[plugin_config]`
//! (`database`, default `example-sqlx.db`, resolved against the config file's directory with
//! `WorkerContext::resolve_path`), and opens a pool and runs its migration with
//! `WorkerContext::block_on`, on the plugin's runtime. Under `host check`
//! (`WorkerContext::is_check`) it creates nothing: it opens an existing database read-only, or
//! only checks that the database's directory exists.
//!
//! Routes:
//! - `GET /`: `hello from example-sqlx <version>` and the worker's generation.
//! - `GET /notes`: every note, newest first, as JSON.
//! - `POST /notes`: `{"text": "..."}` in; the stored note out, `201 Created`.
//! - `GET /notes/{id}`: one note, or `404`.

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use plugin_api::{BoxError, WorkerContext};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `[plugin_config]`.
#[derive(Deserialize)]
struct Config {
    /// The SQLite file; relative paths resolve against the config file's directory.
    #[serde(default = "default_database")]
    database: PathBuf,
}

fn default_database() -> PathBuf {
    "example-sqlx.db".into()
}

#[derive(Clone)]
struct App {
    db: SqlitePool,
    generation: u64,
}

#[derive(Serialize, sqlx::FromRow)]
struct Note {
    id: i64,
    text: String,
}

#[derive(Deserialize)]
struct NewNote {
    text: String,
}

/// Builds the router in each new worker; an error refuses the build.
pub fn build(ctx: &WorkerContext) -> Result<Router, BoxError> {
    let config: Config = ctx.config()?;
    let path = ctx.resolve_path(&config.database);
    if ctx.is_check() {
        return check(ctx, &path).map(|()| Router::new());
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    // Async set-up, awaited on the plugin's runtime; the pool's tasks keep running on it.
    let db = ctx.block_on(async {
        let db = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL)",
        )
        .execute(&db)
        .await?;
        Ok::<_, sqlx::Error>(db)
    })
    .map_err(|e| format!("database {}: {e}", path.display()))?;
    tracing::info!(database = %path.display(), slot = ctx.slot, "example-sqlx started");
    let app = App {
        db,
        generation: ctx.generation,
    };
    Ok(Router::new()
        .route("/", get(hello))
        .route("/notes", get(list).post(create))
        .route("/notes/{id}", get(one))
        .with_state(app))
}

/// Under `host check`: validate without creating anything. An existing database is opened
/// read-only and its table read; a missing one needs only its directory.
fn check(ctx: &WorkerContext, path: &std::path::Path) -> Result<(), BoxError> {
    if path.exists() {
        let options = SqliteConnectOptions::new().filename(path).read_only(true);
        return ctx
            .block_on(async {
                let db = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?;
                sqlx::query("SELECT count(*) FROM notes")
                    .fetch_one(&db)
                    .await?;
                db.close().await;
                Ok::<_, sqlx::Error>(())
            })
            .map_err(|e| format!("database {}: {e}", path.display()).into());
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(format!(
            "database {}: {} is not a directory",
            path.display(),
            dir.display()
        )
        .into()),
        _ => Ok(()),
    }
}

plugin_api::export_axum!(build);

async fn hello(State(app): State<App>) -> String {
    format!(
        "hello from example-sqlx {VERSION}\ngeneration {}\n",
        app.generation
    )
}

async fn list(State(app): State<App>) -> Result<Json<Vec<Note>>, (StatusCode, String)> {
    sqlx::query_as::<_, Note>("SELECT id, text FROM notes ORDER BY id DESC LIMIT 100")
        .fetch_all(&app.db)
        .await
        .map(Json)
        .map_err(internal)
}

async fn create(
    State(app): State<App>,
    Json(new): Json<NewNote>,
) -> Result<(StatusCode, Json<Note>), (StatusCode, String)> {
    let note = sqlx::query_as::<_, Note>("INSERT INTO notes (text) VALUES (?) RETURNING id, text")
        .bind(new.text)
        .fetch_one(&app.db)
        .await
        .map_err(internal)?;
    Ok((StatusCode::CREATED, Json(note)))
}

async fn one(
    State(app): State<App>,
    Path(id): Path<i64>,
) -> Result<Json<Note>, (StatusCode, String)> {
    sqlx::query_as::<_, Note>("SELECT id, text FROM notes WHERE id = ?")
        .bind(id)
        .fetch_optional(&app.db)
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or((StatusCode::NOT_FOUND, format!("no note {id}\n")))
}

fn internal(e: sqlx::Error) -> (StatusCode, String) {
    tracing::warn!(error = %e, "database error");
    (StatusCode::INTERNAL_SERVER_ERROR, "database error\n".into())
}
