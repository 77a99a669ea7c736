//! The public REST API `/api/v1` (SPEC §7) and the OpenAI-compatible `/v1`.
//! Handlers extract, call one function of `service` or a peer, and map the result.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;

use common::error::{ApiResult, Json, Query};
use common::wire::{ASK_EVENT_ANSWER, ASK_EVENT_DELTA, ASK_EVENT_ERROR, Answer, AnswerDelta, AskRequest, Collection, Job, ShareRequest, Turn};
use common::{ApiError, ServiceName};

use crate::AppState;
use crate::auth::Caller;
use crate::service;

pub(crate) async fn me(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    let profile: serde_json::Value = app.ctx.peers.get_json(ServiceName::Profile, "/v1/me", Some(&caller.principal)).await?;
    let p = &caller.principal;
    Ok(Json(serde_json::json!({
        "id": p.sub,
        "username": p.username,
        "org": p.org,
        "roles": p.roles,
        "display_name": profile["display_name"],
        "preferences": profile["preferences"],
    })))
}

pub(crate) async fn patch_me(State(app): State<AppState>, caller: Caller, Json(body): Json<serde_json::Value>) -> ApiResult<Json<serde_json::Value>> {
    let builder = app.ctx.peers.request(ServiceName::Profile, reqwest::Method::PATCH, "/v1/me", Some(&caller.principal)).await?.json(&body);
    let profile: serde_json::Value = app.ctx.peers.send(ServiceName::Profile, builder).await?.json().await.map_err(ApiError::internal)?;
    Ok(Json(profile))
}

pub(crate) async fn list_collections(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Collection>>> {
    Ok(Json(service::collections(&app, &caller.principal).await?))
}

pub(crate) async fn create_collection(State(app): State<AppState>, caller: Caller, Json(body): Json<serde_json::Value>) -> ApiResult<(StatusCode, Json<Collection>)> {
    let created: Collection = app.ctx.peers.post_json(ServiceName::Authz, "/v1/collections", Some(&caller.principal), &body).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub(crate) async fn share_collection(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<ShareRequest>) -> ApiResult<Json<Collection>> {
    service::check_id(&id).map_err(|_| ApiError::not_found(crate::service::COLLECTION_NOT_FOUND, "no such collection"))?;
    let path = format!("/v1/collections/{id}/members");
    Ok(Json(app.ctx.peers.put_json(ServiceName::Authz, &path, Some(&caller.principal), &body).await?))
}

pub(crate) async fn collection_members(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found(crate::service::COLLECTION_NOT_FOUND, "no such collection"))?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Authz, &format!("/v1/collections/{id}/members"), Some(&caller.principal)).await?))
}

/// `DELETE /api/v1/collections/{id}`: its documents leave the catalogue, the index and
/// storage, then the collection and its shares go.
pub(crate) async fn delete_collection(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    service::delete_collection(&app, &caller.principal, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn upload(State(app): State<AppState>, caller: Caller, headers: HeaderMap, multipart: Multipart) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let created = service::upload(&app, &caller.principal, multipart, service::content_length(&headers), None).await?;
    let status = if created.duplicate_of.is_some() { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(serde_json::json!({"id": created.id, "job_id": created.job_id, "status": created.status, "duplicate": created.duplicate_of.is_some()}))))
}

#[derive(Deserialize)]
pub(crate) struct ListParams {
    collection: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    /// A part of the file name.
    q: Option<String>,
    status: Option<String>,
    /// A file extension (`pdf`).
    #[serde(rename = "type")]
    kind: Option<String>,
}

pub(crate) async fn list_documents(State(app): State<AppState>, caller: Caller, Query(params): Query<ListParams>) -> ApiResult<Json<serde_json::Value>> {
    let filter = service::document_filter(params.q.as_deref(), params.status.as_deref(), params.kind.as_deref())?;
    let page = service::list_documents(&app, &caller.principal, params.collection.as_deref(), &filter, params.limit, params.offset).await?;
    Ok(Json(serde_json::json!({"documents": page.documents, "total": page.total})))
}

pub(crate) async fn get_document(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<common::wire::Document>> {
    Ok(Json(service::authorized_document(&app, &caller.principal, &id, "document:read_chunks").await?))
}

pub(crate) async fn content(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    service::download(&app, &caller.principal, &id, &headers).await
}

pub(crate) async fn delete_document(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    service::authorized_document(&app, &caller.principal, &id, "document:delete").await?;
    app.ctx.peers.delete(ServiceName::Ingest, &format!("/v1/documents/{id}"), Some(&caller.principal)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How long one `GET /api/v1/documents/events` stream lasts; the browser's EventSource
/// reconnects, and so signs in again (a revoked session stops getting news).
const DOCUMENT_EVENTS_FOR: Duration = Duration::from_secs(300);

/// `GET /api/v1/documents/events`: server-sent `documents` events, each the documents
/// whose status changed since the last (the first: all of them), as the pipeline moves.
pub(crate) async fn document_events(State(app): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let first = service::list_documents(&app, &caller.principal, None, &Default::default(), Some(200), None).await?;
    let principal = caller.principal;
    let started = tokio::time::Instant::now();
    let initial: Vec<serde_json::Value> = first.documents.iter().map(document_news).collect();
    let seen: std::collections::HashMap<String, serde_json::Value> = initial.iter().map(|d| (d["id"].as_str().unwrap_or_default().to_string(), d.clone())).collect();
    let first_event = futures_util::stream::once(async move { Ok::<_, Infallible>(Event::default().event("documents").data(serde_json::Value::Array(initial).to_string())) });
    let changes = futures_util::stream::unfold((app, principal, seen), move |(app, principal, mut seen)| async move {
        loop {
            if started.elapsed() > DOCUMENT_EVENTS_FOR {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(page) = service::list_documents(&app, &principal, None, &Default::default(), Some(200), None).await else { return None };
            let changed: Vec<serde_json::Value> = page
                .documents
                .iter()
                .map(document_news)
                .filter(|d| seen.get(d["id"].as_str().unwrap_or_default()) != Some(d))
                .collect();
            if changed.is_empty() {
                continue;
            }
            for d in &changed {
                seen.insert(d["id"].as_str().unwrap_or_default().to_string(), d.clone());
            }
            let event = Event::default().event("documents").data(serde_json::Value::Array(changed).to_string());
            return Some((Ok::<_, Infallible>(event), (app, principal, seen)));
        }
    });
    Ok(Sse::new(first_event.chain(changes)).keep_alive(axum::response::sse::KeepAlive::default()).into_response())
}

fn document_news(document: &common::wire::Document) -> serde_json::Value {
    serde_json::json!({
        "id": document.id, "status": document.status, "error": document.error,
        "pages": document.pages, "chunks": document.chunks, "embedded": document.embedded,
    })
}

/// `POST /api/v1/documents/{id}/cancel`: stops its processing (whoever may delete the
/// document may stop or restart its processing).
pub(crate) async fn cancel_document(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let document = service::authorized_document(&app, &caller.principal, &id, "document:delete").await?;
    let path = format!("/v1/jobs/{}/cancel", document.job_id);
    Ok(Json(app.ctx.peers.post_json(ServiceName::Ingest, &path, Some(&caller.principal), &serde_json::json!({})).await?))
}

/// `POST /api/v1/documents/{id}/retry`: processes a failed or cancelled document again.
pub(crate) async fn retry_document(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let document = service::authorized_document(&app, &caller.principal, &id, "document:delete").await?;
    let path = format!("/v1/jobs/{}/retry", document.job_id);
    Ok(Json(app.ctx.peers.post_json(ServiceName::Ingest, &path, Some(&caller.principal), &serde_json::json!({})).await?))
}

pub(crate) async fn get_job(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(service::authorized_job(&app, &caller.principal, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchBody {
    query: String,
    #[serde(default = "default_k")]
    k: usize,
    #[serde(default)]
    collections: Option<Vec<String>>,
    /// `hybrid` (the default), `bm25` or `vector`.
    #[serde(default)]
    mode: Option<common::wire::SearchMode>,
    /// Each hit's whole chunk text; by default hits carry a highlighted snippet.
    #[serde(default)]
    full_text: bool,
    /// Whether the configured reranker reorders the hits (default: when configured).
    #[serde(default)]
    rerank: Option<bool>,
    /// At most this many hits from one page (default 1; 0: no limit).
    #[serde(default)]
    per_page: Option<usize>,
}

fn default_k() -> usize {
    10
}

pub(crate) async fn search(State(app): State<AppState>, caller: Caller, Json(body): Json<SearchBody>) -> ApiResult<Response> {
    let query = common::wire::SearchQuery { query: body.query, k: body.k.clamp(1, 100), collections: body.collections, mode: body.mode, full_text: body.full_text, rerank: body.rerank, per_page: body.per_page };
    let answer = service::search_answer(&app, &caller.principal, query).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], answer).into_response())
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"))
}

/// `POST /api/v1/ask`: JSON, or with `Accept: text/event-stream` rag's events as they
/// come (`delta`, then `citations` carrying the whole answer, or `error`).
pub(crate) async fn ask(State(app): State<AppState>, caller: Caller, headers: HeaderMap, Json(body): Json<AskRequest>) -> ApiResult<Response> {
    if !wants_sse(&headers) {
        return Ok(Json(service::ask(&app, &caller.principal, &body).await?).into_response());
    }
    let events = service::ask_stream(&app, &caller.principal, &body).await?.map(|event| {
        Ok::<_, Infallible>(match event {
            Ok(event) => Event::default().event(event.event).data(event.data),
            Err(error) => Event::default().event(ASK_EVENT_ERROR).data(stream_problem(&error).to_string()),
        })
    });
    Ok(Sse::new(events).into_response())
}

/// A broken stream from rag as the client sees it.
fn stream_problem(error: &common::sse::StreamError) -> serde_json::Value {
    tracing::warn!(error = %error, "the answer stream from rag broke off");
    serde_json::to_value(ApiError::unavailable("rag.stream_broken", "the answer stopped before it was complete; ask again").problem()).unwrap_or_default()
}

pub(crate) async fn conversations(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(app.ctx.peers.get_json(ServiceName::Rag, "/v1/conversations", Some(&caller.principal)).await?))
}

pub(crate) async fn conversation(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Rag, &format!("/v1/conversations/{id}"), Some(&caller.principal)).await?))
}

/// `PATCH /api/v1/conversations/{id} {"title"}`.
pub(crate) async fn rename_conversation(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<serde_json::Value>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    let builder = app.ctx.peers.request(ServiceName::Rag, reqwest::Method::PATCH, &format!("/v1/conversations/{id}"), Some(&caller.principal)).await?.json(&body);
    Ok(Json(app.ctx.peers.send(ServiceName::Rag, builder).await?.json().await.map_err(ApiError::internal)?))
}

pub(crate) async fn delete_conversation(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    service::check_id(&id).map_err(|_| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    app.ctx.peers.delete(ServiceName::Rag, &format!("/v1/conversations/{id}"), Some(&caller.principal)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn passthrough_query(uri: &axum::http::Uri) -> String {
    uri.query().map(|q| format!("?{q}")).unwrap_or_default()
}

/// Org admins read their own org's records; operators (Cedar `system:*`) every org's.
/// The audit and logs services also force the org for anyone who is not an operator.
pub(crate) async fn require_read(app: &AppState, principal: &common::wire::Principal, org_action: &str, operator_action: &str) -> ApiResult<()> {
    if principal.is_operator() {
        require_operator(app, principal, operator_action).await
    } else {
        service::require_org_permission(app, principal, org_action).await
    }
}

pub(crate) async fn logs(State(app): State<AppState>, caller: Caller, uri: axum::http::Uri) -> ApiResult<Json<serde_json::Value>> {
    require_read(&app, &caller.principal, "logs:read", "system:read_all_logs").await?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Logs, &format!("/v1/logs{}", passthrough_query(&uri)), Some(&caller.principal)).await?))
}

/// How long one `GET /api/v1/logs/tail` stream lasts before the client reconnects (and
/// so is authorized again).
const LOG_TAIL_FOR: Duration = Duration::from_secs(300);

/// `GET /api/v1/logs/tail?service=&level=&q=&trace_id=`: server-sent `records` events,
/// each the records stored since the last (oldest first), from the moment of asking.
/// Whoever may read the logs may tail them; the reader is checked again every poll.
pub(crate) async fn log_tail(State(app): State<AppState>, caller: Caller, axum::extract::Query(filters): axum::extract::Query<crate::pages::LogFilters>) -> ApiResult<Response> {
    require_read(&app, &caller.principal, "logs:read", "system:read_all_logs").await?;
    let query = filters.query(200);
    let newest: serde_json::Value = app.ctx.peers.get_json(ServiceName::Logs, "/v1/logs?limit=1", Some(&caller.principal)).await?;
    let after = newest["records"][0]["id"].as_i64().unwrap_or(0);
    let principal = caller.principal;
    let started = tokio::time::Instant::now();
    let records = futures_util::stream::unfold((app, principal, after), move |(app, principal, mut after)| {
        let query = query.clone();
        async move {
            loop {
                if started.elapsed() > LOG_TAIL_FOR {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if require_read(&app, &principal, "logs:read", "system:read_all_logs").await.is_err() {
                    return None;
                }
                let Ok(found) = app.ctx.peers.get_json::<serde_json::Value>(ServiceName::Logs, &format!("/v1/logs?{query}&after={after}"), Some(&principal)).await else { return None };
                let records = found["records"].as_array().cloned().unwrap_or_default();
                let Some(last) = records.last().and_then(|r| r["id"].as_i64()) else { continue };
                after = last;
                let event = Event::default().event("records").data(serde_json::Value::Array(records).to_string());
                return Some((Ok::<_, Infallible>(event), (app, principal, after)));
            }
        }
    });
    Ok(Sse::new(records).keep_alive(axum::response::sse::KeepAlive::default()).into_response())
}

pub(crate) async fn audit(State(app): State<AppState>, caller: Caller, uri: axum::http::Uri) -> ApiResult<Json<serde_json::Value>> {
    require_read(&app, &caller.principal, "audit:read", "system:read_all_audit").await?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Audit, &format!("/v1/audit{}", passthrough_query(&uri)), Some(&caller.principal)).await?))
}

pub(crate) async fn audit_verify(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    require_read(&app, &caller.principal, "audit:read", "system:read_all_audit").await?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Audit, "/v1/audit/verify", Some(&caller.principal)).await?))
}

pub(crate) async fn rooms(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(app.ctx.peers.get_json(ServiceName::Chat, "/v1/rooms", Some(&caller.principal)).await?))
}

pub(crate) async fn create_room(State(app): State<AppState>, caller: Caller, Json(body): Json<serde_json::Value>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    Ok((StatusCode::CREATED, Json(app.ctx.peers.post_json(ServiceName::Chat, "/v1/rooms", Some(&caller.principal), &body).await?)))
}

pub(crate) async fn room_messages(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, uri: axum::http::Uri) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("chat.room_not_found", "no such room"))?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Chat, &format!("/v1/rooms/{id}/messages{}", passthrough_query(&uri)), Some(&caller.principal)).await?))
}

/// `GET /api/v1/rooms/{id}/members`: who is in the room (its members see it).
pub(crate) async fn room_members(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("chat.room_not_found", "no such room"))?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Authz, &format!("/v1/rooms/{id}/members"), Some(&caller.principal)).await?))
}

/// `PUT /api/v1/rooms/{id}/members {"members": [{"user", "role": "owner"|"member"}]}`
/// (the room's owners only; everyone named must be of the org).
pub(crate) async fn set_room_members(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<serde_json::Value>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("chat.room_not_found", "no such room"))?;
    Ok(Json(app.ctx.peers.put_json(ServiceName::Authz, &format!("/v1/rooms/{id}/members"), Some(&caller.principal), &body).await?))
}

pub(crate) async fn post_room_message(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<serde_json::Value>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    service::check_id(&id).map_err(|_| ApiError::not_found("chat.room_not_found", "no such room"))?;
    Ok((StatusCode::CREATED, Json(app.ctx.peers.post_json(ServiceName::Chat, &format!("/v1/rooms/{id}/messages"), Some(&caller.principal), &body).await?)))
}

// ---- OpenAI-compatible surface ----

pub(crate) async fn models(_caller: Caller) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "echo"}]}))
}

#[derive(Deserialize)]
pub(crate) struct ChatMessage {
    role: String,
    #[serde(default)]
    content: serde_json::Value,
}

#[derive(Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The OpenAI chat completion request; fields Echo does not use (temperature, tools …)
/// are accepted and ignored, as OpenAI-compatible servers do.
#[derive(Deserialize)]
pub(crate) struct ChatCompletion {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

fn message_text(content: &serde_json::Value) -> String {
    match content {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

/// The question (the last user message) and the turns before it.
fn question_and_history(messages: &[ChatMessage]) -> Result<(String, Vec<Turn>), ApiError> {
    let last = messages.iter().rposition(|m| m.role == "user").ok_or_else(|| ApiError::bad_request("openai.no_user_message", "the request has no user message"))?;
    let question = message_text(&messages[last].content);
    if question.trim().is_empty() {
        return Err(ApiError::bad_request("openai.no_user_message", "the last user message is empty"));
    }
    let history = messages[..last]
        .iter()
        .filter(|m| m.role == "user" || m.role == "assistant")
        .map(|m| Turn { role: m.role.clone(), content: message_text(&m.content) })
        .filter(|t| !t.content.trim().is_empty())
        .collect();
    Ok((question, history))
}

/// One `chat.completion.chunk`.
fn completion_chunk(id: &str, created: i64, model: &str, delta: serde_json::Value, finish: Option<&str>) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

/// `POST /v1/chat/completions`: Echo as an OpenAI-compatible model, answering with the
/// caller's permissions; citations in a top-level `citations` array.
pub(crate) async fn chat_completions(State(app): State<AppState>, caller: Caller, Json(body): Json<ChatCompletion>) -> ApiResult<Response> {
    let (question, history) = question_and_history(&body.messages)?;
    let request = AskRequest { question, collections: None, conversation_id: None, history };
    let model = body.model.unwrap_or_else(|| "echo".into());
    let created = common::now_unix();
    if !body.stream {
        let answer = service::ask(&app, &caller.principal, &request).await?;
        let usage = answer.usage.unwrap_or_default();
        return Ok(Json(serde_json::json!({
            "id": format!("chatcmpl-{}", answer.conversation_id), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer}, "finish_reason": "stop"}],
            "usage": usage,
            "citations": answer.citations,
        }))
        .into_response());
    }
    let include_usage = body.stream_options.unwrap_or_default().include_usage;
    let id = format!("chatcmpl-{}", uuid::Uuid::now_v7());
    let events = service::ask_stream(&app, &caller.principal, &request).await?;
    let first = completion_chunk(&id, created, &model, serde_json::json!({"role": "assistant", "content": ""}), None);
    let chunks = events.flat_map(move |event| {
        let mut out: Vec<String> = Vec::new();
        match event {
            Ok(event) if event.event == ASK_EVENT_DELTA => {
                if let Ok(delta) = serde_json::from_str::<AnswerDelta>(&event.data) {
                    out.push(completion_chunk(&id, created, &model, serde_json::json!({"content": delta.text}), None).to_string());
                }
            }
            Ok(event) if event.event == ASK_EVENT_ANSWER => {
                let answer: Option<Answer> = serde_json::from_str(&event.data).ok();
                let mut last = completion_chunk(&id, created, &model, serde_json::json!({}), Some("stop"));
                last["citations"] = serde_json::to_value(answer.as_ref().map(|a| a.citations.clone()).unwrap_or_default()).unwrap_or_default();
                out.push(last.to_string());
                if include_usage {
                    let usage = answer.and_then(|a| a.usage).unwrap_or_default();
                    out.push(serde_json::json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}).to_string());
                }
                out.push("[DONE]".into());
            }
            Ok(event) if event.event == ASK_EVENT_ERROR => {
                let problem: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
                out.push(serde_json::json!({"error": {"message": problem["detail"], "type": "server_error", "code": problem["code"]}}).to_string());
                out.push("[DONE]".into());
            }
            Ok(_) => {}
            Err(error) => {
                let problem = stream_problem(&error);
                out.push(serde_json::json!({"error": {"message": problem["detail"], "type": "server_error", "code": problem["code"]}}).to_string());
                out.push("[DONE]".into());
            }
        }
        futures_util::stream::iter(out.into_iter().map(|data| Ok::<_, Infallible>(Event::default().data(data))))
    });
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(Event::default().data(first.to_string())) }).chain(chunks);
    Ok(Sse::new(stream).into_response())
}

pub(crate) async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], crate::OPENAPI).into_response()
}

// ---- operator actions (the audited role that reaches across orgs) ----

/// The permission check for an operator action; anyone else gets 403.
pub(crate) async fn require_operator(app: &AppState, principal: &common::wire::Principal, action: &str) -> ApiResult<()> {
    if service::decide(app, principal, action, "System", "echo").await? {
        Ok(())
    } else {
        Err(ApiError::forbidden("auth.operator_required", "only an Echo operator may do this (granted with `echod user operator`)"))
    }
}

/// `POST /api/v1/admin/keys/rotate {"lead_secs": 60}`: publishes new signing keys
/// now; they sign after the lead, and the old ones stay published while their tokens live.
pub(crate) async fn admin_rotate_keys(State(app): State<AppState>, caller: Caller, body: axum::body::Bytes) -> ApiResult<Json<serde_json::Value>> {
    require_operator(&app, &caller.principal, "system:rotate_keys").await?;
    let body: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("request.invalid_json", format!("the body is not valid JSON: {e}")))?
    };
    Ok(Json(app.ctx.peers.post_json(ServiceName::Identity, "/internal/keys/rotate", Some(&caller.principal), &body).await?))
}

/// `POST /api/v1/admin/policies/reload`: re-reads `authz.policy_dir`; an invalid set
/// is refused (400 with file, line and message) and the previous one stays in force.
pub(crate) async fn admin_reload_policies(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    require_operator(&app, &caller.principal, "system:reload_policies").await?;
    Ok(Json(app.ctx.peers.post_json(ServiceName::Authz, "/v1/policies/reload", Some(&caller.principal), &serde_json::json!({})).await?))
}

/// `GET /api/v1/admin/queue`: per subscription, depth, in flight, dead letters and
/// the age of the oldest undelivered message.
pub(crate) async fn admin_queue(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    require_operator(&app, &caller.principal, "system:manage_queue").await?;
    Ok(Json(app.ctx.peers.get_json(ServiceName::Queue, "/v1/stats", Some(&caller.principal)).await?))
}

pub(crate) async fn admin_dead_letters(State(app): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    require_operator(&app, &caller.principal, "system:manage_queue").await?;
    let path = format!("/v1/subscriptions/{}/dead-letters", common::client::encode(&name));
    Ok(Json(app.ctx.peers.get_json(ServiceName::Queue, &path, Some(&caller.principal)).await?))
}

/// `POST /api/v1/admin/queue/{subscription}/redrive {"seq": n}` (or `{}` for all).
pub(crate) async fn admin_redrive(State(app): State<AppState>, caller: Caller, Path(name): Path<String>, Json(body): Json<serde_json::Value>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(service::redrive(&app, &caller.principal, &name, body.get("seq").and_then(|v| v.as_i64())).await?))
}

// ---- user administration (org admins, within their own org) ----

pub(crate) async fn admin_users(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<common::wire::UserSummary>>> {
    service::require_org_permission(&app, &caller.principal, "admin:manage_users").await?;
    let path = format!("/internal/orgs/{}/users", common::client::encode(&caller.principal.org));
    Ok(Json(app.ctx.peers.get_json(ServiceName::Identity, &path, Some(&caller.principal)).await?))
}

#[derive(Deserialize)]
pub(crate) struct NewUser {
    username: String,
    password: String,
    #[serde(default = "default_role")]
    role: String,
    #[serde(default)]
    email: Option<String>,
    /// The user must replace the password at first sign-in.
    #[serde(default)]
    temporary: bool,
}

fn default_role() -> String {
    "member".into()
}

pub(crate) async fn admin_create_user(State(app): State<AppState>, caller: Caller, Json(body): Json<NewUser>) -> ApiResult<(StatusCode, Json<common::wire::UserSummary>)> {
    let created = service::create_user(&app, &caller.principal, &body.username, &body.password, &body.role, body.email.clone(), body.temporary).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub(crate) async fn admin_disable_user(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<common::wire::UserSummary>> {
    Ok(Json(service::disable_user(&app, &caller.principal, &id).await?))
}

#[derive(Deserialize)]
pub(crate) struct UserChange {
    role: String,
}

/// `PATCH /api/v1/admin/users/{id}` `{"role"}`.
pub(crate) async fn admin_update_user(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<UserChange>) -> ApiResult<Json<common::wire::UserSummary>> {
    Ok(Json(service::set_user_role(&app, &caller.principal, &id, &body.role).await?))
}

/// `POST /api/v1/admin/users/{id}/reset`: mails the user a reset link.
pub(crate) async fn admin_reset_user(State(app): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    service::send_password_reset(&app, &caller.principal, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /api/v1/me/consents`: the applications the caller allowed to act for them.
pub(crate) async fn my_consents(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    let path = format!("/internal/users/{}/consents", common::client::encode(&caller.principal.sub));
    Ok(Json(app.ctx.peers.get_json(ServiceName::Identity, &path, Some(&caller.principal)).await?))
}

/// `DELETE /api/v1/me/consents/{client_id}`: withdraws it; the application's tokens
/// for the caller stop working.
pub(crate) async fn withdraw_consent(State(app): State<AppState>, caller: Caller, Path(client_id): Path<String>) -> ApiResult<StatusCode> {
    if client_id.is_empty() || client_id.len() > 128 {
        return Err(ApiError::not_found("identity.consent_not_found", "you never allowed that application"));
    }
    let path = format!("/internal/users/{}/consents/{}", common::client::encode(&caller.principal.sub), common::client::encode(&client_id));
    app.ctx.peers.delete(ServiceName::Identity, &path, Some(&caller.principal)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(crate) struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// `POST /api/v1/me/password`: every other session and token of the account ends, as
/// after a reset. A browser session that made the change continues under a new id (a
/// new cookie); a bearer token that made it is refused from now on, like all others.
pub(crate) async fn change_password(State(app): State<AppState>, caller: Caller, Json(body): Json<PasswordChange>) -> ApiResult<Response> {
    let renewed = caller.session.as_ref().map(|session| (crate::session::NewSession::generate(), session.id_token.clone()));
    service::change_password(&app, &caller.principal, &body.current_password, &body.new_password, renewed.as_ref().map(|(s, _)| s.id_hash.as_str())).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some((renewed, id_token)) = renewed {
        let cookie = renewed.store(&app, &caller.principal, id_token.as_deref()).await?;
        crate::session::end_sessions_except(&app, &caller.principal.sub, &renewed.id_hash).await?;
        response.headers_mut().append(axum::http::header::SET_COOKIE, cookie);
    }
    Ok(response)
}

// ---- groups (org admins) ----

pub(crate) async fn groups(State(app): State<AppState>, caller: Caller) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(app.ctx.peers.get_json(ServiceName::Authz, "/v1/groups", Some(&caller.principal)).await?))
}

pub(crate) async fn create_group(State(app): State<AppState>, caller: Caller, Json(body): Json<serde_json::Value>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    Ok((StatusCode::CREATED, Json(app.ctx.peers.post_json(ServiceName::Authz, "/v1/groups", Some(&caller.principal), &body).await?)))
}

pub(crate) async fn set_group_members(State(app): State<AppState>, caller: Caller, Path(id): Path<String>, Json(body): Json<serde_json::Value>) -> ApiResult<Json<serde_json::Value>> {
    service::check_id(&id).map_err(|_| ApiError::not_found("authz.group_not_found", "no such group"))?;
    Ok(Json(app.ctx.peers.put_json(ServiceName::Authz, &format!("/v1/groups/{id}/members"), Some(&caller.principal), &body).await?))
}
