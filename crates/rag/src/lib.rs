//! rag — question answering over the documents a user may read.
//!
//! Flow: authz ("collections this principal may read_chunks") → search (filtered to
//! exactly those) → every hit re-checked against that set → answer (extractive until a
//! model provider is configured) → conversation stored → `rag.asked` audit event.
//! Public surface: `run`. Invariant: no text reaches an answer or citation unless its
//! collection was in the authz answer for this request.

mod answer;


use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::Serialize;
use sqlx::{Row, SqlitePool};
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{Answer, AskRequest, Principal, ReadableCollections, SearchQuery, SearchResults};
use common::{ApiError, ServiceContext, ServiceName, now_unix, rfc3339};

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX conversations_user ON conversations(user_id, updated_at);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    citations TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL
);
"#];

#[derive(Clone)]
struct AppState {
    ctx: ServiceContext,
    pool: SqlitePool,
}

/// Runs the rag service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let pool = common::db::open_migrated(&ctx.config.db_path(ServiceName::Rag), MIGRATIONS).await?;
    let state = AppState { ctx: ctx.clone(), pool };
    let routes = Router::new()
        .route("/v1/ask", post(ask))
        .route("/v1/conversations", get(list_conversations))
        .route("/v1/conversations/{id}", get(get_conversation).delete(delete_conversation))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, common::server::always_ready()).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

async fn readable(ctx: &ServiceContext, principal: &Principal) -> ApiResult<ReadableCollections> {
    ctx.peers.post_json(ServiceName::Authz, "/v1/readable", Some(principal), &serde_json::json!({"action": "document:read_chunks"})).await
}

async fn ask(State(state): State<AppState>, ActingUser(principal): ActingUser, Json(request): Json<AskRequest>) -> ApiResult<Json<Answer>> {
    let question = request.question.trim().to_string();
    if question.is_empty() || question.chars().count() > 4000 {
        return Err(ApiError::bad_request("rag.invalid_question", "questions are 1 to 4000 characters"));
    }
    let conversation_id = match &request.conversation_id {
        Some(id) => {
            let owner: Option<String> = sqlx::query_scalar("SELECT user_id FROM conversations WHERE id = ?").bind(id).fetch_optional(&state.pool).await?;
            if owner.as_deref() != Some(principal.sub.as_str()) {
                return Err(ApiError::not_found("rag.conversation_not_found", "no such conversation"));
            }
            id.clone()
        }
        None => {
            let id = uuid::Uuid::now_v7().to_string();
            let title: String = question.chars().take(80).collect();
            sqlx::query("INSERT INTO conversations (id, user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)")
                .bind(&id)
                .bind(&principal.sub)
                .bind(title)
                .bind(now_unix())
                .bind(now_unix())
                .execute(&state.pool)
                .await?;
            id
        }
    };
    let config = &state.ctx.config.rag;
    // The one authorized retrieval path: search asks authz, filters, re-checks.
    let query = SearchQuery { query: question.clone(), k: config.top_k, collections: request.collections.clone(), mode: None, full_text: true, rerank: None };
    let results: SearchResults = state.ctx.peers.post_json(ServiceName::Search, "/v1/search", Some(&principal), &query).await?;
    let hits = results.hits;
    let (text, citations) = answer::extractive(&question, &hits, config.max_citations);
    let mut tx = common::db::begin_write(&state.pool).await?;
    for (role, content, cited) in [("user", question.as_str(), "[]".to_string()), ("assistant", text.as_str(), serde_json::to_string(&citations).unwrap_or_default())] {
        sqlx::query("INSERT INTO messages (conversation_id, role, content, citations, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&conversation_id)
            .bind(role)
            .bind(content)
            .bind(cited)
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE conversations SET updated_at = ? WHERE id = ?").bind(now_unix()).bind(&conversation_id).execute(&mut *tx).await?;
    tx.commit().await?;
    let recorded_question = if config.audit_question == "plain" { question.clone() } else { common::rand::sha256_hex(question.as_bytes()) };
    state
        .ctx
        .audit(
            &principal.sub,
            "rag.asked",
            &format!("conversation:{conversation_id}"),
            "success",
            serde_json::json!({
                "question": recorded_question,
                "question_form": config.audit_question,
                "cited_chunks": citations.iter().map(|c| c.chunk_id.clone()).collect::<Vec<_>>(),
            }),
        )
        .await;
    metrics::counter!("echo_rag_questions_total", "mode" => "extractive").increment(1);
    Ok(Json(Answer { answer: text, citations, conversation_id, mode: "extractive".into() }))
}

#[derive(Serialize)]
struct ConversationSummary {
    id: String,
    title: String,
    updated_at: String,
}

async fn list_conversations(State(state): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Vec<ConversationSummary>>> {
    let rows = sqlx::query("SELECT id, title, updated_at FROM conversations WHERE user_id = ? ORDER BY updated_at DESC LIMIT 200")
        .bind(&principal.sub)
        .fetch_all(&state.pool)
        .await?;
    let list = rows
        .iter()
        .map(|r| Ok(ConversationSummary { id: r.try_get("id")?, title: r.try_get("title")?, updated_at: rfc3339(r.try_get("updated_at")?) }))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(list))
}

/// What an assistant message says in the history when it quoted a document the reader
/// may no longer read (access revoked, classification changed, document deleted).
const WITHDRAWN: &str = "This answer quoted documents you can no longer read, so it is withdrawn. Ask again to be answered from what you can read now.";

/// A conversation as its owner may see it now: every cited document is checked again
/// (it must still exist and be readable at its classification); an answer that quoted
/// any that is not is withdrawn, and only the citations still readable are shown.
async fn get_conversation(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let title: Option<String> = sqlx::query_scalar("SELECT title FROM conversations WHERE id = ? AND user_id = ?")
        .bind(&id)
        .bind(&principal.sub)
        .fetch_optional(&state.pool)
        .await?;
    let title = title.ok_or_else(|| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    let rows = sqlx::query("SELECT role, content, citations, created_at FROM messages WHERE conversation_id = ? ORDER BY id LIMIT 1000")
        .bind(&id)
        .fetch_all(&state.pool)
        .await?;
    let mut stored = Vec::with_capacity(rows.len());
    for r in &rows {
        let citations: String = r.try_get("citations")?;
        let citations: Vec<common::wire::Citation> = serde_json::from_str(&citations).unwrap_or_default();
        stored.push((r.try_get::<String, _>("role")?, r.try_get::<String, _>("content")?, citations, r.try_get::<i64, _>("created_at")?));
    }
    let readable = readable(&state.ctx, &principal).await?;
    let mut verdicts: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut cited: Vec<String> = Vec::new();
    for (_, _, citations, _) in &stored {
        for citation in citations {
            if !cited.contains(&citation.document_id) {
                cited.push(citation.document_id.clone());
            }
        }
    }
    for document_id in cited {
        let path = format!("/v1/documents/{}", common::client::encode(&document_id));
        let allowed = match state.ctx.peers.get_json::<common::wire::Document>(ServiceName::Ingest, &path, Some(&principal)).await {
            Ok(document) => readable.allows(&document.collection, &document.classification),
            Err(error) if error.kind == common::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        verdicts.insert(document_id, allowed);
    }
    let messages: Vec<serde_json::Value> = stored
        .into_iter()
        .map(|(role, content, citations, created_at)| {
            let withdrawn = citations.iter().any(|c| !verdicts.get(&c.document_id).copied().unwrap_or(false));
            let citations: Vec<&common::wire::Citation> = citations.iter().filter(|c| verdicts.get(&c.document_id).copied().unwrap_or(false)).collect();
            serde_json::json!({
                "role": role,
                "content": if withdrawn { WITHDRAWN.to_string() } else { content },
                "citations": citations,
                "withdrawn": withdrawn,
                "created_at": rfc3339(created_at),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"id": id, "title": title, "messages": messages})))
}

async fn delete_conversation(State(state): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<axum::http::StatusCode> {
    let done = sqlx::query("DELETE FROM conversations WHERE id = ? AND user_id = ?").bind(&id).bind(&principal.sub).execute(&state.pool).await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("rag.conversation_not_found", "no such conversation"));
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

