//! rag — question answering over the documents a user may read.
//!
//! Flow: the conversation (its recent turns make a follow-up stand alone) → search
//! (which asks authz for the readable collections, filters to exactly those and
//! re-checks every hit) → the answer: written by the configured model from numbered
//! passages, streamed, every `[n]` checked against those passages; or extracted (quoted
//! sentences) without one; or "not in your documents" when retrieval found nothing
//! related → the exchange stored → `rag.asked` audit event.
//! Modules: `answer` (extractive), `context` (packing, prompt, citation checks), `llm`
//! (the model client), `service` (the flow), `store` (conversations).
//! Invariant: no text reaches an answer or citation unless it was retrieved for this
//! request from the collections authz allowed; a citation is never a passage the answer
//! did not cite.

mod answer;

/// Hits from one page of a document that an answer is drawn from: the passage and
/// its neighbour (the fact is often in the chunk after the one that names the topic),
/// while the other hits stay other places.
pub const HITS_PER_PAGE: usize = 2;
mod context;
mod llm;
mod service;
mod store;

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpListener;

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{ASK_EVENT_ANSWER, ASK_EVENT_DELTA, ASK_EVENT_ERROR, AnswerDelta, AskRequest, Principal, ReadableCollections};
use common::{ApiError, ServiceContext, ServiceName, rfc3339};

use service::{AskEvent, Rag};

type AppState = Arc<Rag>;

/// Creates this service's tables where `config` keeps its data, as its first start there
/// would (for `echod migrate`).
pub async fn prepare_store(config: &common::EchoConfig) -> anyhow::Result<()> {
    store::open(config).await.map(|_| ())
}

/// Runs the rag service on `listener` until the context's shutdown.
pub async fn run(ctx: ServiceContext, listener: TcpListener) -> anyhow::Result<()> {
    let store = store::open(&ctx.config).await?;
    let llm = llm::Llm::from_config(&ctx.config.llm)?;
    match &llm {
        Some(llm) => tracing::info!("{}", llm.describe()),
        None => tracing::info!("no language model is configured (llm.provider: none): answers quote the documents"),
    }
    let ready: common::server::ReadyCheck = {
        let store = store.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ready().await })
        })
    };
    let state: AppState = Arc::new(Rag { ctx: ctx.clone(), store, llm });
    let routes = Router::new()
        .route("/v1/ask", post(ask))
        .route("/v1/conversations", get(list_conversations))
        .route("/v1/conversations/{id}", get(get_conversation).patch(rename_conversation).delete(delete_conversation))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), common::server::require_service_token))
        .with_state(state);
    let router = common::server::service_router(&ctx, routes, ready).fallback(common::server::not_found);
    common::server::serve(listener, router, ctx.shutdown.clone()).await
}

async fn readable(ctx: &ServiceContext, principal: &Principal) -> ApiResult<ReadableCollections> {
    ctx.peers.post_json(ServiceName::Authz, "/v1/readable", Some(principal), &serde_json::json!({"action": "document:read_chunks"})).await
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"))
}

/// `POST /v1/ask`: the answer as JSON, or (`Accept: text/event-stream`) as SSE:
/// `delta` events, then `citations` (the whole answer) or `error` (a problem).
async fn ask(State(rag): State<AppState>, ActingUser(principal): ActingUser, headers: HeaderMap, Json(request): Json<AskRequest>) -> ApiResult<Response> {
    if !wants_sse(&headers) {
        return Ok(Json(rag.ask_whole(principal, request).await?).into_response());
    }
    let events = rag.ask(principal, request).await?.map(|event| {
        let event = match event {
            AskEvent::Delta(text) => Event::default().event(ASK_EVENT_DELTA).data(serde_json::to_string(&AnswerDelta { text }).unwrap_or_default()),
            AskEvent::Done(answer) => Event::default().event(ASK_EVENT_ANSWER).data(serde_json::to_string(&answer).unwrap_or_default()),
            AskEvent::Failed(error) => {
                error.log();
                Event::default().event(ASK_EVENT_ERROR).data(serde_json::to_string(&error.problem()).unwrap_or_default())
            }
        };
        Ok::<_, Infallible>(event)
    });
    Ok(Sse::new(events).into_response())
}

async fn list_conversations(State(rag): State<AppState>, ActingUser(principal): ActingUser) -> ApiResult<Json<Vec<store::ConversationSummary>>> {
    Ok(Json(rag.store.list(&principal.sub).await?))
}

/// What an assistant message says in the history when it quoted a document the reader
/// may no longer read (access revoked, classification changed, document deleted).
const WITHDRAWN: &str = "This answer quoted documents you can no longer read, so it is withdrawn. Ask again to be answered from what you can read now.";

/// A conversation as its owner may see it now: every cited document is checked again
/// (it must still exist and be readable at its classification); an answer that quoted
/// any that is not is withdrawn, and only the citations still readable are shown.
async fn get_conversation(State(rag): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let (title, stored) = rag.store.get(&principal.sub, &id).await?.ok_or_else(|| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    let readable = readable(&rag.ctx, &principal).await?;
    let mut verdicts: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut cited: Vec<String> = Vec::new();
    for message in &stored {
        for citation in &message.citations {
            if !cited.contains(&citation.document_id) {
                cited.push(citation.document_id.clone());
            }
        }
    }
    for document_id in cited {
        let path = format!("/v1/documents/{}", common::client::encode(&document_id));
        let allowed = match rag.ctx.peers.get_json::<common::wire::Document>(ServiceName::Ingest, &path, Some(&principal)).await {
            Ok(document) => readable.allows(&document.collection, &document.classification),
            Err(error) if error.kind == common::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        verdicts.insert(document_id, allowed);
    }
    let messages: Vec<serde_json::Value> = stored
        .into_iter()
        .map(|message| {
            let withdrawn = message.citations.iter().any(|c| !verdicts.get(&c.document_id).copied().unwrap_or(false));
            let citations: Vec<&common::wire::Citation> = message.citations.iter().filter(|c| verdicts.get(&c.document_id).copied().unwrap_or(false)).collect();
            serde_json::json!({
                "role": message.role,
                "content": if withdrawn { WITHDRAWN.to_string() } else { message.content },
                "citations": citations,
                "withdrawn": withdrawn,
                "mode": message.mode,
                "not_found": message.not_found,
                "created_at": rfc3339(message.created_at),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"id": id, "title": title, "messages": messages})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    title: String,
}

/// `PATCH /v1/conversations/{id} {"title"}`.
async fn rename_conversation(State(rag): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>, Json(body): Json<Rename>) -> ApiResult<Json<serde_json::Value>> {
    let title = body.title.split_whitespace().collect::<Vec<_>>().join(" ");
    if title.is_empty() || title.chars().count() > store::MAX_TITLE {
        return Err(ApiError::bad_request("rag.invalid_title", format!("a title is 1 to {} characters", store::MAX_TITLE)));
    }
    if !rag.store.rename(&principal.sub, &id, &title).await? {
        return Err(ApiError::not_found("rag.conversation_not_found", "no such conversation"));
    }
    Ok(Json(serde_json::json!({"id": id, "title": title})))
}

async fn delete_conversation(State(rag): State<AppState>, ActingUser(principal): ActingUser, Path(id): Path<String>) -> ApiResult<axum::http::StatusCode> {
    if !rag.store.delete(&principal.sub, &id).await? {
        return Err(ApiError::not_found("rag.conversation_not_found", "no such conversation"));
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}
