//! Server-rendered pages: documents (upload, live status), a document, ask (answer
//! with clickable citations), collections with their sharing, users (admins), and
//! friendly error pages. Forms carry the session's
//! CSRF token; every page carries the security headers.

use askama::Template;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use common::web::html_security_headers;
use common::wire::{AskRequest, Citation, Collection, Document};
use common::{ApiError, ErrorKind, ServiceName};

use crate::AppState;
use crate::auth::PageUser;
use crate::service;

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    detail: &'a str,
}

/// The HTML rendering of an error: the title and a safe detail, never internals.
pub(crate) fn error_page(error: &ApiError) -> Response {
    error.log();
    let problem = error.problem();
    let detail = if error.kind == ErrorKind::Internal { "Something went wrong on our side. Please try again." } else { problem.detail.as_str() };
    let mut response = render(error.kind.status(), ErrorPage { title: &problem.title, detail }.render());
    if let Some(seconds) = error.retry_after {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
    }
    response
}

fn render(status: StatusCode, html: Result<String, askama::Error>) -> Response {
    let mut response = match html {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    };
    html_security_headers(response.headers_mut());
    response
}

pub(crate) async fn page_not_found() -> Response {
    error_page(&ApiError::not_found("page.not_found", "There is no page at this address."))
}

pub(crate) async fn index(State(app): State<AppState>, headers: axum::http::HeaderMap) -> Redirect {
    match crate::session::load(app.store.as_ref(), &headers).await {
        Ok(Some(_)) => Redirect::to("/documents"),
        _ => Redirect::to("/auth/login"),
    }
}

#[derive(Template)]
#[template(path = "documents.html")]
struct DocumentsPage {
    csrf: String,
    username: String,
    org: String,
    collections: Vec<Collection>,
    documents: Vec<DocumentRow>,
    message: Option<String>,
    filter: DocumentsQuery,
    statuses: &'static [&'static str],
    total: i64,
}

/// The documents page's filter, from its query string.
#[derive(Default, Deserialize)]
pub(crate) struct DocumentsQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    collection: String,
    #[serde(default)]
    status: String,
    #[serde(default, rename = "type")]
    kind: String,
}

impl DocumentsQuery {
    fn is_empty(&self) -> bool {
        self.q.trim().is_empty() && self.collection.is_empty() && self.status.is_empty() && self.kind.trim().is_empty()
    }
}

/// A document as the list shows it: readable size and date, its collection by name,
/// and whether the viewer may stop, retry or delete it.
struct DocumentRow {
    id: String,
    filename: String,
    classification: String,
    collection: String,
    status: String,
    error: Option<String>,
    size: String,
    added: String,
    can_manage: bool,
}

/// `1536` → `1.5 KB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 { format!("{value:.1} {}", UNITS[unit]) } else { format!("{value:.0} {}", UNITS[unit]) }
}

/// `2026-12-05T12:14:44Z` → `2026-12-05 12:14 UTC`.
pub(crate) fn human_time(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..16)) {
        (Some(day), Some(time)) if rfc3339.ends_with('Z') => format!("{day} {time} UTC"),
        _ => rfc3339.to_string(),
    }
}

pub(crate) async fn documents(State(app): State<AppState>, PageUser(session): PageUser, axum::extract::Query(filter): axum::extract::Query<DocumentsQuery>) -> Response {
    documents_with(&app, session, None, filter).await
}

async fn documents_with(app: &AppState, session: crate::session::Session, message: Option<String>, filter: DocumentsQuery) -> Response {
    let principal = &session.principal;
    let loaded = async {
        let collections = service::collections(app, principal).await?;
        let wanted = service::document_filter(Some(&filter.q), Some(&filter.status), Some(&filter.kind))?;
        let collection = Some(filter.collection.as_str()).filter(|c| !c.is_empty());
        let page = service::list_documents(app, principal, collection, &wanted, Some(200), None).await?;
        Ok::<_, ApiError>((collections, page.documents, page.total))
    }
    .await;
    let (collections, documents, total) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&error),
    };
    let names: std::collections::HashMap<&str, &str> = collections.iter().map(|c| (c.id.as_str(), c.name.as_str())).collect();
    let mut may: std::collections::HashMap<(String, String), bool> = std::collections::HashMap::new();
    let mut rows = Vec::with_capacity(documents.len());
    for d in documents {
        let key = (d.collection.clone(), d.classification.clone());
        let can_manage = match may.get(&key) {
            Some(allowed) => *allowed,
            None => {
                let allowed = service::decide_classified(app, principal, "document:delete", "Collection", &d.collection, Some(d.classification.as_str())).await.unwrap_or(false);
                may.insert(key, allowed);
                allowed
            }
        };
        rows.push(DocumentRow {
            collection: names.get(d.collection.as_str()).map_or_else(|| "a shared collection".to_string(), |n| n.to_string()),
            size: human_size(d.size),
            added: human_time(&d.created_at),
            id: d.id,
            filename: d.filename,
            classification: d.classification,
            status: d.status,
            error: d.error,
            can_manage,
        });
    }
    let page = DocumentsPage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        collections,
        documents: rows,
        message,
        filter,
        statuses: &service::DOCUMENT_STATUSES,
        total,
    };
    render(StatusCode::OK, page.render())
}

pub(crate) async fn upload(State(app): State<AppState>, PageUser(session): PageUser, headers: axum::http::HeaderMap, multipart: Multipart) -> Response {
    match service::upload(&app, &session.principal, multipart, service::content_length(&headers), Some(&session.csrf)).await {
        Ok(created) if created.duplicate_of.is_some() => documents_with(&app, session, Some("That file is already in this collection.".into()), DocumentsQuery::default()).await,
        Ok(_) => {
            let mut response = Redirect::to("/documents").into_response();
            *response.status_mut() = StatusCode::SEE_OTHER;
            response
        }
        Err(error) => error_page(&error),
    }
}

#[derive(Template)]
#[template(path = "document.html")]
struct DocumentPage {
    csrf: String,
    username: String,
    org: String,
    document: Document,
    collection: String,
    size: String,
    added: String,
    may_download: bool,
    may_delete: bool,
    stages: Vec<StageRow>,
    preview: Vec<PreviewRow>,
    n_chunks: usize,
}

struct StageRow {
    stage: String,
    took: String,
}

struct PreviewRow {
    place: String,
    text: String,
}

/// How many chunks the document page shows.
const PREVIEW_CHUNKS: usize = 12;

/// `0.0123` → `12 ms`, `3.4` → `3.4 s`.
fn human_seconds(seconds: f64) -> String {
    if seconds < 1.0 { format!("{:.0} ms", seconds * 1000.0) } else if seconds < 120.0 { format!("{seconds:.1} s") } else { format!("{:.1} min", seconds / 60.0) }
}

/// A document: what it is, where it is, how its ingest went stage by stage, the start
/// of its extracted text as chunks (with pages and sections), and only the actions the
/// viewer may take.
pub(crate) async fn document(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>) -> Response {
    let principal = &session.principal;
    let document = match service::authorized_document(&app, principal, &id, "document:read_chunks").await {
        Ok(document) => document,
        Err(error) => return error_page(&error),
    };
    let class = Some(document.classification.as_str());
    let may = |action: &'static str| service::decide_classified(&app, principal, action, "Collection", &document.collection, class);
    let (may_download, may_delete) = (may("document:download").await.unwrap_or(false), may("document:delete").await.unwrap_or(false));
    let collection = service::collections(&app, principal)
        .await
        .ok()
        .and_then(|all| all.into_iter().find(|c| c.id == document.collection).map(|c| c.name))
        .unwrap_or_else(|| "a shared collection".to_string());
    let job: Option<common::wire::Job> = app.ctx.peers.get_json(ServiceName::Ingest, &format!("/v1/jobs/{}", document.job_id), Some(principal)).await.ok();
    let stages = job
        .map(|job| job.stages.into_iter().map(|s| StageRow { took: s.seconds.map(human_seconds).unwrap_or_default(), stage: s.stage }).collect())
        .unwrap_or_default();
    let preview: Option<common::wire::ChunkPreview> =
        app.ctx.peers.get_json(ServiceName::Search, &format!("/v1/documents/{}/chunks?limit={PREVIEW_CHUNKS}", document.id), Some(principal)).await.ok();
    let (n_chunks, preview) = preview
        .map(|p| {
            let rows = p
                .chunks
                .into_iter()
                .map(|c| {
                    let place = match (c.page, c.section) {
                        (Some(page), Some(section)) => format!("p. {page} · {section}"),
                        (Some(page), None) => format!("p. {page}"),
                        (None, Some(section)) => section,
                        (None, None) => String::new(),
                    };
                    PreviewRow { place, text: c.text }
                })
                .collect();
            (p.total, rows)
        })
        .unwrap_or_default();
    let page = DocumentPage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        collection,
        size: human_size(document.size),
        added: human_time(&document.created_at),
        document,
        may_download,
        may_delete,
        stages,
        preview,
        n_chunks,
    };
    render(StatusCode::OK, page.render())
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    csrf: String,
}

pub(crate) async fn delete_document(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    let deleted = async {
        service::authorized_document(&app, &session.principal, &id, "document:delete").await?;
        app.ctx.peers.delete(ServiceName::Ingest, &format!("/v1/documents/{id}"), Some(&session.principal)).await
    }
    .await;
    match deleted {
        Ok(()) => {
            let mut response = Redirect::to("/documents").into_response();
            *response.status_mut() = StatusCode::SEE_OTHER;
            response
        }
        Err(error) => error_page(&error),
    }
}

pub(crate) struct Segment {
    text: String,
    cite: Option<usize>,
}

/// Splits an answer into text and `[n]` citation markers that become links.
pub(crate) fn segments(answer: &str, cited: &[usize]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        let is_marker = !digits.is_empty() && after[digits.len()..].starts_with(']');
        match digits.parse::<usize>() {
            Ok(n) if is_marker && cited.contains(&n) => {
                out.push(Segment { text: rest[..open].to_string(), cite: None });
                out.push(Segment { text: String::new(), cite: Some(n) });
                rest = &after[digits.len() + 1..];
            }
            _ => {
                out.push(Segment { text: rest[..=open].to_string(), cite: None });
                rest = after;
            }
        }
    }
    out.push(Segment { text: rest.to_string(), cite: None });
    out
}

pub(crate) struct CitationView {
    n: usize,
    /// Unique on the page: `cite-{message}-{n}`.
    anchor: String,
    document_id: String,
    label: String,
    /// The passage in three parts: before, the quoted (highlighted) words, after.
    before: String,
    quoted: String,
    after: String,
    /// For a PDF page: a link that opens the document at it.
    page_link: Option<String>,
}

pub(crate) struct MessageView {
    /// Its place in the conversation (citation anchors are `cite-{index}-{n}`).
    index: usize,
    role: String,
    content: String,
    segments: Vec<Segment>,
    /// Said once per answer: how it was made.
    mode_label: String,
    withdrawn: bool,
    citations: Vec<CitationView>,
}

pub(crate) struct ConversationLink {
    id: String,
    title: String,
    current: bool,
}

pub(crate) struct CollectionOption {
    id: String,
    name: String,
}

#[derive(Template)]
#[template(path = "ask.html")]
struct AskPage {
    csrf: String,
    username: String,
    org: String,
    conversation_id: Option<String>,
    title: String,
    messages: Vec<MessageView>,
    conversations: Vec<ConversationLink>,
    collections: Vec<CollectionOption>,
    chosen_collection: String,
}

#[derive(Deserialize)]
struct StoredMessage {
    role: String,
    content: String,
    #[serde(default)]
    citations: Vec<Citation>,
    #[serde(default)]
    withdrawn: bool,
    #[serde(default)]
    mode: String,
}

#[derive(Deserialize)]
struct StoredConversation {
    title: String,
    messages: Vec<StoredMessage>,
}

#[derive(Deserialize)]
struct ConversationSummary {
    id: String,
    title: String,
}

#[derive(Deserialize, Default)]
pub(crate) struct AskQuery {
    #[serde(default)]
    collection: Option<String>,
    /// Which answer the address points at (`#m{n}` scrolls to it); part of the address
    /// so that each answer has its own.
    #[serde(default)]
    #[allow(dead_code)]
    answer: Option<usize>,
}

fn mode_label(mode: &str) -> &'static str {
    match mode {
        "llm" => "Written by the language model from your documents",
        "extractive" => "Quoted from your documents (no language model is configured)",
        _ => "",
    }
}

/// A citation's passage split around what the answer quoted.
fn citation_view(message: usize, citation: &Citation, filename: &str) -> CitationView {
    let (mut before, mut quoted, mut after) = (citation.text.clone(), String::new(), String::new());
    if let Some(quote) = citation.quote.as_deref().filter(|q| !q.is_empty())
        && let Some(at) = citation.text.find(quote)
    {
        before = citation.text[..at].to_string();
        quoted = quote.to_string();
        after = citation.text[at + quote.len()..].to_string();
    }
    let is_pdf = filename.to_lowercase().ends_with(".pdf");
    CitationView {
        n: citation.n,
        anchor: format!("cite-{message}-{}", citation.n),
        document_id: citation.document_id.clone(),
        label: label(citation, filename),
        before,
        quoted,
        after,
        page_link: citation.page.filter(|_| is_pdf).map(|page| format!("/api/v1/documents/{}/content#page={page}", citation.document_id)),
    }
}

async fn ask_page(app: &AppState, session: &crate::session::Session, conversation_id: Option<String>, collection: Option<String>) -> Response {
    let principal = &session.principal;
    let conversation = match &conversation_id {
        Some(id) => {
            if service::check_id(id).is_err() {
                return page_not_found().await;
            }
            match app.ctx.peers.get_json::<StoredConversation>(ServiceName::Rag, &format!("/v1/conversations/{id}"), Some(principal)).await {
                Ok(conversation) => Some(conversation),
                Err(error) => return error_page(&error),
            }
        }
        None => None,
    };
    let summaries: Vec<ConversationSummary> = app.ctx.peers.get_json(ServiceName::Rag, "/v1/conversations", Some(principal)).await.unwrap_or_default();
    let collections = service::collections(app, principal).await.unwrap_or_default();
    let mut filenames: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut messages = Vec::new();
    let title = conversation.as_ref().map(|c| c.title.clone()).unwrap_or_default();
    for (i, message) in conversation.map(|c| c.messages).unwrap_or_default().into_iter().enumerate() {
        let mut citations = Vec::with_capacity(message.citations.len());
        for citation in &message.citations {
            if !filenames.contains_key(&citation.document_id) {
                let filename = match service::authorized_document(app, principal, &citation.document_id, "document:read_chunks").await {
                    Ok(document) => document.filename,
                    Err(_) => "a document".to_string(),
                };
                filenames.insert(citation.document_id.clone(), filename);
            }
            let filename = filenames.get(&citation.document_id).map(String::as_str).unwrap_or("a document");
            citations.push(citation_view(i, citation, filename));
        }
        let cited: Vec<usize> = message.citations.iter().map(|c| c.n).collect();
        messages.push(MessageView {
            index: i,
            segments: segments(&message.content, &cited),
            mode_label: mode_label(&message.mode).to_string(),
            role: message.role,
            content: message.content,
            withdrawn: message.withdrawn,
            citations,
        });
    }
    let page = AskPage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        conversations: summaries.into_iter().map(|c| ConversationLink { current: Some(&c.id) == conversation_id.as_ref(), id: c.id, title: c.title }).collect(),
        conversation_id,
        title,
        messages,
        chosen_collection: collection.unwrap_or_default(),
        collections: collections.into_iter().map(|c| CollectionOption { id: c.id, name: if c.personal { format!("{} (personal)", c.name) } else { c.name } }).collect(),
    };
    render(StatusCode::OK, page.render())
}

/// `GET /ask`: a new conversation.
pub(crate) async fn ask_form(State(app): State<AppState>, PageUser(session): PageUser, axum::extract::Query(query): axum::extract::Query<AskQuery>) -> Response {
    ask_page(&app, &session, None, query.collection).await
}

/// `GET /ask/{id}`: a conversation, every answer with its citations.
pub(crate) async fn conversation(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::extract::Query(query): axum::extract::Query<AskQuery>) -> Response {
    ask_page(&app, &session, Some(id), query.collection).await
}

#[derive(Deserialize)]
pub(crate) struct AskForm {
    csrf: String,
    question: String,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    collection: Option<String>,
}

fn label(citation: &Citation, filename: &str) -> String {
    let mut label = filename.to_string();
    if let Some(page) = citation.page {
        label.push_str(&format!(", page {page}"));
    }
    if let Some(section) = &citation.section {
        label.push_str(&format!(" — {section}"));
    }
    label
}

fn see_other(location: &str) -> Response {
    let mut response = Redirect::to(location).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
}

/// `POST /ask` (the form without script): asks, then redirects to the conversation, so
/// every answer has its own address and Back never resubmits.
pub(crate) async fn ask(State(app): State<AppState>, PageUser(session): PageUser, axum::Form(form): axum::Form<AskForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    let collections = form.collection.filter(|c| !c.is_empty()).map(|c| vec![c]);
    let request = AskRequest { question: form.question.clone(), collections, conversation_id: form.conversation_id.filter(|c| !c.is_empty()), history: vec![] };
    match service::ask(&app, &session.principal, &request).await {
        Ok(answer) => see_other(&format!("/ask/{}#latest", answer.conversation_id)),
        Err(error) => error_page(&error),
    }
}

#[derive(Deserialize)]
pub(crate) struct RenameForm {
    csrf: String,
    title: String,
}

/// `POST /ask/{id}/rename`.
pub(crate) async fn rename_conversation(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::Form(form): axum::Form<RenameForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    if service::check_id(&id).is_err() {
        return page_not_found().await;
    }
    let renamed = async {
        let builder = app.ctx.peers.request(ServiceName::Rag, reqwest::Method::PATCH, &format!("/v1/conversations/{id}"), Some(&session.principal)).await?.json(&serde_json::json!({"title": form.title}));
        app.ctx.peers.send(ServiceName::Rag, builder).await
    }
    .await;
    match renamed {
        Ok(_) => see_other(&format!("/ask/{id}")),
        Err(error) => error_page(&error),
    }
}

/// `POST /ask/{id}/delete`.
pub(crate) async fn delete_conversation(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    if service::check_id(&id).is_err() {
        return page_not_found().await;
    }
    match app.ctx.peers.delete(ServiceName::Rag, &format!("/v1/conversations/{id}"), Some(&session.principal)).await {
        Ok(()) => see_other("/ask"),
        Err(error) => error_page(&error),
    }
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    csrf: String,
    username: String,
    org: String,
    users: Vec<common::wire::UserSummary>,
    message: Option<String>,
}

async fn users_page(app: &AppState, session: &crate::session::Session, message: Option<String>) -> Response {
    let principal = &session.principal;
    let listed = async {
        service::require_org_permission(app, principal, "admin:manage_users").await?;
        let path = format!("/internal/orgs/{}/users", common::client::encode(&principal.org));
        app.ctx.peers.get_json::<Vec<common::wire::UserSummary>>(ServiceName::Identity, &path, Some(principal)).await
    }
    .await;
    match listed {
        Ok(users) => render(
            StatusCode::OK,
            UsersPage { csrf: session.csrf.clone(), username: principal.username.clone(), org: principal.org.clone(), users, message }.render(),
        ),
        Err(error) => error_page(&error),
    }
}

pub(crate) async fn admin_users(State(app): State<AppState>, PageUser(session): PageUser) -> Response {
    users_page(&app, &session, None).await
}

#[derive(Deserialize)]
pub(crate) struct NewUserForm {
    csrf: String,
    username: String,
    password: String,
    role: String,
    /// The checkbox "must choose their own password at first sign-in".
    #[serde(default)]
    temporary: Option<String>,
}

pub(crate) async fn admin_create_user(State(app): State<AppState>, PageUser(session): PageUser, axum::Form(form): axum::Form<NewUserForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    let message = match service::create_user(&app, &session.principal, &form.username, &form.password, &form.role, None, form.temporary.is_some()).await {
        Ok(user) => format!("Created {} ({}).", user.username, form.role),
        Err(error) if error.kind != ErrorKind::Internal => format!("Could not create the user: {}", error.detail),
        Err(error) => return error_page(&error),
    };
    users_page(&app, &session, Some(message)).await
}

pub(crate) async fn admin_disable_user(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    let message = match service::disable_user(&app, &session.principal, &id).await {
        Ok(user) => format!("Disabled {}; their sign-ins and refresh tokens are revoked.", user.username),
        Err(error) if error.kind != ErrorKind::Internal => format!("Could not disable the user: {}", error.detail),
        Err(error) => return error_page(&error),
    };
    users_page(&app, &session, Some(message)).await
}

#[derive(Deserialize)]
struct ConsentRow {
    client_id: String,
    scope: String,
    granted_at: String,
}

#[derive(Template)]
#[template(path = "profile.html")]
struct ProfilePage {
    csrf: String,
    username: String,
    org: String,
    roles: String,
    consents: Vec<ConsentRow>,
    message: Option<String>,
}

async fn profile_page(app: &AppState, session: &crate::session::Session, message: Option<String>, status: StatusCode) -> Response {
    #[derive(Deserialize)]
    struct Consents {
        consents: Vec<ConsentRow>,
    }
    let principal = &session.principal;
    let path = format!("/internal/users/{}/consents", common::client::encode(&principal.sub));
    let consents = match app.ctx.peers.get_json::<Consents>(ServiceName::Identity, &path, Some(principal)).await {
        Ok(listed) => listed.consents,
        Err(error) => return error_page(&error),
    };
    let page = ProfilePage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        roles: principal.roles.join(", "),
        consents,
        message,
    };
    render(status, page.render())
}

#[derive(Deserialize)]
pub(crate) struct ProfileQuery {
    #[serde(default)]
    changed: Option<String>,
}

pub(crate) async fn profile(State(app): State<AppState>, PageUser(session): PageUser, axum::extract::Query(query): axum::extract::Query<ProfileQuery>) -> Response {
    let message = query.changed.map(|_| "Your password is changed, and everywhere else you are signed out.".to_string());
    profile_page(&app, &session, message, StatusCode::OK).await
}

#[derive(Deserialize)]
pub(crate) struct PasswordForm {
    csrf: String,
    current_password: String,
    new_password: String,
    new_password_again: String,
}

/// The profile page's password change: as through the API, every other session and
/// token ends and this browser continues under a new session cookie.
pub(crate) async fn change_password(State(app): State<AppState>, PageUser(session): PageUser, axum::Form(form): axum::Form<PasswordForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    if form.new_password != form.new_password_again {
        return profile_page(&app, &session, Some("The two new passwords differ.".into()), StatusCode::BAD_REQUEST).await;
    }
    let renewed = crate::session::NewSession::generate();
    match service::change_password(&app, &session.principal, &form.current_password, &form.new_password, Some(&renewed.id_hash)).await {
        Ok(()) => {}
        Err(error) if error.kind != ErrorKind::Internal => {
            return profile_page(&app, &session, Some(format!("Your password was not changed: {}", error.detail)), StatusCode::BAD_REQUEST).await;
        }
        Err(error) => return error_page(&error),
    }
    let cookie = match renewed.store(&app, &session.principal, session.id_token.as_deref()).await {
        Ok(cookie) => cookie,
        Err(error) => return error_page(&error),
    };
    if let Err(error) = crate::session::end_sessions_except(&app, &session.principal.sub, &renewed.id_hash).await {
        return error_page(&ApiError::from(error));
    }
    let mut response = Redirect::to("/profile?changed=1").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(axum::http::header::SET_COOKIE, cookie);
    response
}

pub(crate) async fn withdraw_consent(State(app): State<AppState>, PageUser(session): PageUser, Path(client_id): Path<String>, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if !common::rand::constant_time_eq(form.csrf.as_bytes(), session.csrf.as_bytes()) {
        return error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
    }
    let path = format!("/internal/users/{}/consents/{}", common::client::encode(&session.principal.sub), common::client::encode(&client_id));
    let message = match app.ctx.peers.delete(ServiceName::Identity, &path, Some(&session.principal)).await {
        Ok(()) => format!("{client_id} may no longer act for you; its tokens stop working."),
        Err(error) if error.kind != ErrorKind::Internal => format!("Nothing withdrawn: {}", error.detail),
        Err(error) => return error_page(&error),
    };
    profile_page(&app, &session, Some(message), StatusCode::OK).await
}

#[derive(Template)]
#[template(source = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed out · Echo</title></head><body style=\"font-family: system-ui, sans-serif; margin: 3rem;\"><h1>You are signed out</h1><p><a href=\"/auth/login\">Sign in again</a></p></body></html>", ext = "html")]
struct SignedOut;

pub(crate) async fn signed_out() -> Response {
    render(StatusCode::OK, SignedOut.render())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {

    #[test]
    fn sizes_and_times_read_as_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KB");
        assert_eq!(human_size(52_428_800), "50 MB");
        assert_eq!(human_time("2026-12-05T12:14:44Z"), "2026-12-05 12:14 UTC");
        assert_eq!(human_time("yesterday"), "yesterday");
    }

    #[test]
    fn a_waterfall_keeps_sub_millisecond_requests() {
        let records = [
            serde_json::json!({"ts_ms": 1_000_010, "service": "gateway", "message": "request served", "fields": {"elapsed_ms": 10.6, "method": "POST", "route": "/api/v1/search"}}),
            serde_json::json!({"ts_ms": 1_000_009, "service": "search", "message": "request served", "fields": {"elapsed_ms": 0.31, "method": "POST", "route": "/v1/search"}}),
        ];
        let (bars, total) = waterfall(&records);
        assert_eq!(total, "11 ms");
        assert_eq!(bars[0].service, "gateway");
        assert_eq!(bars[0].left, "0.00");
        assert_eq!(bars[1].took, "0.31 ms");
        // 9.29 ms after the gateway's start, of 10.6 in all.
        assert_eq!(bars[1].left, "87.64");
    }

    use super::*;

    #[test]
    fn citation_markers_become_links_only_when_they_exist() {
        let parts = segments("See [1] and [2], not [9] or [x].", &[1, 2]);
        let cites: Vec<_> = parts.iter().filter_map(|s| s.cite).collect();
        assert_eq!(cites, [1, 2]);
        let text: String = parts.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(text, "See  and , not [9] or [x].");
    }
}

// ---- collections and sharing ----

/// One member of a collection as the page shows it.
struct MemberView {
    kind: &'static str,
    id: String,
    name: String,
    role: String,
}

struct CollectionView {
    collection: Collection,
    /// Listed (with add and remove forms) when the viewer may share the collection.
    members: Option<Vec<MemberView>>,
    deletable: bool,
}

#[derive(Template)]
#[template(path = "collections.html")]
struct CollectionsPage {
    csrf: String,
    username: String,
    org: String,
    collections: Vec<CollectionView>,
    users: Vec<common::wire::UserSummary>,
    groups: Vec<(String, String)>,
    message: Option<String>,
    /// Org owners and admins may create collections owned by the org.
    org_admin: bool,
}

async fn collections_page(app: &AppState, session: &crate::session::Session, message: Option<String>) -> Response {
    let principal = &session.principal;
    let loaded = async {
        let collections = service::collections(app, principal).await?;
        // The org's directory, to share by name (members of an org see its usernames).
        let path = format!("/internal/orgs/{}/users", common::client::encode(&principal.org));
        let users: Vec<common::wire::UserSummary> = app.ctx.peers.get_json(ServiceName::Identity, &path, Some(principal)).await?;
        let groups: serde_json::Value = app.ctx.peers.get_json(ServiceName::Authz, "/v1/groups", Some(principal)).await?;
        let groups: Vec<(String, String)> = groups
            .as_array()
            .map(|list| list.iter().filter_map(|g| Some((g["id"].as_str()?.to_string(), g["name"].as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let mut views = Vec::with_capacity(collections.len());
        for collection in collections {
            let manages = matches!(collection.role.as_deref(), Some("owner" | "manager"));
            let members = if manages {
                let listed: serde_json::Value =
                    app.ctx.peers.get_json(ServiceName::Authz, &format!("/v1/collections/{}/members", collection.id), Some(principal)).await?;
                let members = listed["members"].as_array().cloned().unwrap_or_default();
                Some(
                    members
                        .iter()
                        .filter_map(|m| {
                            let role = m["role"].as_str()?.to_string();
                            if let Some(id) = m["user"].as_str() {
                                let name = users.iter().find(|u| u.id == id).map(|u| u.username.clone()).unwrap_or_else(|| id.to_string());
                                Some(MemberView { kind: "user", id: id.to_string(), name, role })
                            } else {
                                let id = m["group"].as_str()?;
                                let name = groups.iter().find(|(g, _)| g == id).map(|(_, n)| format!("group {n}")).unwrap_or_else(|| id.to_string());
                                Some(MemberView { kind: "group", id: id.to_string(), name, role })
                            }
                        })
                        .collect(),
                )
            } else {
                None
            };
            // Only to show the button: deleting is decided by Cedar.
            let deletable = !collection.personal && (collection.role.as_deref() == Some("owner") || (collection.org_owned && principal.is_admin()));
            views.push(CollectionView { collection, members, deletable });
        }
        Ok::<_, ApiError>((views, users, groups))
    }
    .await;
    match loaded {
        Ok((collections, users, groups)) => render(
            StatusCode::OK,
            CollectionsPage {
                csrf: session.csrf.clone(),
                username: principal.username.clone(),
                org: principal.org.clone(),
                collections,
                users: users.into_iter().filter(|u| !u.disabled && u.id != principal.sub).collect(),
                groups,
                message,
                org_admin: principal.is_admin(),
            }
            .render(),
        ),
        Err(error) => error_page(&error),
    }
}

fn csrf_ok(session: &crate::session::Session, csrf: &str) -> bool {
    common::rand::constant_time_eq(csrf.as_bytes(), session.csrf.as_bytes())
}

fn csrf_refused() -> Response {
    error_page(&ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"))
}

/// The collections page again with what happened; internal errors get the error page.
async fn collections_after(app: &AppState, session: &crate::session::Session, result: Result<String, ApiError>) -> Response {
    match result {
        Ok(message) => collections_page(app, session, Some(message)).await,
        Err(error) if error.kind != ErrorKind::Internal => collections_page(app, session, Some(format!("Not done: {}", error.detail))).await,
        Err(error) => error_page(&error),
    }
}

pub(crate) async fn collections(State(app): State<AppState>, PageUser(session): PageUser) -> Response {
    collections_page(&app, &session, None).await
}

#[derive(Deserialize)]
pub(crate) struct NewCollectionForm {
    csrf: String,
    name: String,
    #[serde(default)]
    org_owned: Option<String>,
}

pub(crate) async fn create_collection(State(app): State<AppState>, PageUser(session): PageUser, axum::Form(form): axum::Form<NewCollectionForm>) -> Response {
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let created: Result<Collection, ApiError> =
        app.ctx.peers.post_json(ServiceName::Authz, "/v1/collections", Some(&session.principal), &serde_json::json!({"name": form.name, "org_owned": form.org_owned.is_some()})).await;
    collections_after(&app, &session, created.map(|c| format!("Created the collection {}.", c.name))).await
}

#[derive(Deserialize)]
pub(crate) struct MemberForm {
    csrf: String,
    /// `user:<id>` or `group:<id>`.
    member: String,
    #[serde(default)]
    role: String,
}

/// Adds, changes (`role` set) or removes (`role` empty) one member, keeping the others.
async fn change_member(app: &AppState, session: &crate::session::Session, id: &str, form: &MemberForm) -> Result<String, ApiError> {
    service::check_id(id).map_err(|_| ApiError::not_found(crate::service::COLLECTION_NOT_FOUND, "no such collection"))?;
    let (kind, subject) = form
        .member
        .split_once(':')
        .filter(|(kind, subject)| matches!(*kind, "user" | "group") && !subject.is_empty())
        .ok_or_else(|| ApiError::bad_request("collection.invalid_member", "choose a user or a group"))?;
    let principal = &session.principal;
    let listed: serde_json::Value = app.ctx.peers.get_json(ServiceName::Authz, &format!("/v1/collections/{id}/members"), Some(principal)).await?;
    let mut members: Vec<serde_json::Value> =
        listed["members"].as_array().cloned().unwrap_or_default().into_iter().filter(|m| m[kind].as_str() != Some(subject)).collect();
    if !form.role.is_empty() {
        members.push(serde_json::json!({kind: subject, "role": form.role}));
    }
    let _: Collection =
        app.ctx.peers.put_json(ServiceName::Authz, &format!("/v1/collections/{id}/members"), Some(principal), &serde_json::json!({"members": members})).await?;
    Ok(if form.role.is_empty() { "Removed.".to_string() } else { format!("Shared as {}.", form.role) })
}

pub(crate) async fn collection_member(
    State(app): State<AppState>,
    PageUser(session): PageUser,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<MemberForm>,
) -> Response {
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let changed = change_member(&app, &session, &id, &form).await;
    collections_after(&app, &session, changed).await
}

pub(crate) async fn delete_collection(State(app): State<AppState>, PageUser(session): PageUser, Path(id): Path<String>, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let deleted = service::delete_collection(&app, &session.principal, &id).await.map(|()| "Deleted the collection and its documents.".to_string());
    collections_after(&app, &session, deleted).await
}

// ---- the event bus, for operators ----

struct SubscriptionView {
    name: String,
    topic: String,
    depth: i64,
    in_flight: i64,
    dead_letters: i64,
    oldest: String,
    letters: Vec<DeadLetterView>,
}

struct DeadLetterView {
    seq: i64,
    attempts: i64,
    error: String,
    event_type: String,
    event_id: String,
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    csrf: String,
    username: String,
    org: String,
    subscriptions: Vec<SubscriptionView>,
    /// Which backend keeps the messages (`sqlite`, `postgres`, `nats`).
    backend: String,
    message: Option<String>,
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "—".into(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) if ms < 120_000 => format!("{} s", ms / 1000),
        Some(ms) if ms < 7_200_000 => format!("{} min", ms / 60_000),
        Some(ms) => format!("{} h", ms / 3_600_000),
    }
}

async fn queue_page(app: &AppState, session: &crate::session::Session, message: Option<String>) -> Response {
    let principal = &session.principal;
    let loaded = async {
        crate::api::require_operator(app, principal, "system:manage_queue").await?;
        let stats: serde_json::Value = app.ctx.peers.get_json(ServiceName::Queue, "/v1/stats", Some(principal)).await?;
        let mut subscriptions = Vec::new();
        for s in stats["subscriptions"].as_array().cloned().unwrap_or_default() {
            let name = s["subscription"].as_str().unwrap_or_default().to_string();
            let dead_letters = s["dead_letters"].as_i64().unwrap_or(0);
            let mut letters = Vec::new();
            if dead_letters > 0 {
                let path = format!("/v1/subscriptions/{}/dead-letters?limit=20", common::client::encode(&name));
                let listed: serde_json::Value = app.ctx.peers.get_json(ServiceName::Queue, &path, Some(principal)).await?;
                for letter in listed["dead_letters"].as_array().cloned().unwrap_or_default() {
                    letters.push(DeadLetterView {
                        seq: letter["seq"].as_i64().unwrap_or(0),
                        attempts: letter["attempts"].as_i64().unwrap_or(0),
                        error: letter["last_error"].as_str().unwrap_or_default().chars().take(300).collect(),
                        event_type: letter["event"]["type"].as_str().unwrap_or_default().to_string(),
                        event_id: letter["event"]["id"].as_str().unwrap_or_default().to_string(),
                    });
                }
            }
            subscriptions.push(SubscriptionView {
                name,
                topic: s["topic"].as_str().unwrap_or_default().to_string(),
                depth: s["depth"].as_i64().unwrap_or(0),
                in_flight: s["in_flight"].as_i64().unwrap_or(0),
                dead_letters,
                oldest: age(s["oldest_age_ms"].as_i64()),
                letters,
            });
        }
        let backend = stats["backend"].as_str().unwrap_or("unknown").to_string();
        Ok::<_, ApiError>((subscriptions, backend))
    }
    .await;
    match loaded {
        Ok((subscriptions, backend)) => render(
            StatusCode::OK,
            QueuePage { csrf: session.csrf.clone(), username: principal.username.clone(), org: principal.org.clone(), subscriptions, backend, message }.render(),
        ),
        Err(error) => error_page(&error),
    }
}

pub(crate) async fn admin_queue(State(app): State<AppState>, PageUser(session): PageUser) -> Response {
    queue_page(&app, &session, None).await
}

#[derive(Deserialize)]
pub(crate) struct RedriveForm {
    csrf: String,
    #[serde(default)]
    seq: Option<i64>,
}

pub(crate) async fn admin_redrive(State(app): State<AppState>, PageUser(session): PageUser, Path(name): Path<String>, axum::Form(form): axum::Form<RedriveForm>) -> Response {
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    match service::redrive(&app, &session.principal, &name, form.seq).await {
        Ok(answer) => queue_page(&app, &session, Some(format!("Redelivering {} message(s) of {name}.", answer["redriven"]))).await,
        Err(error) => error_page(&error),
    }
}

// ---- the log viewer, for admins (their org) and operators (every org) ----

#[derive(Default, Deserialize)]
pub(crate) struct LogFilters {
    #[serde(default)]
    service: String,
    #[serde(default)]
    level: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    trace_id: String,
    /// How far back: `15m`, `1h`, `24h`, `7d`, or empty for all kept.
    #[serde(default)]
    window: String,
}

impl LogFilters {
    /// The logs service's query string for these filters.
    pub(crate) fn query(&self, limit: usize) -> String {
        let mut parts = vec![format!("limit={limit}")];
        for (key, value) in [("service", &self.service), ("level", &self.level), ("q", &self.q), ("trace_id", &self.trace_id)] {
            if !value.trim().is_empty() {
                parts.push(format!("{key}={}", common::client::encode(value.trim())));
            }
        }
        let window_ms = match self.window.as_str() {
            "15m" => Some(15 * 60_000),
            "1h" => Some(3_600_000),
            "24h" => Some(86_400_000),
            "7d" => Some(7 * 86_400_000),
            _ => None,
        };
        if let Some(ms) = window_ms {
            parts.push(format!("since={}", common::now_unix_ms() - ms));
        }
        parts.join("&")
    }
}

struct LogRow {
    time: String,
    service: String,
    level: String,
    message: String,
    fields: String,
    trace_id: String,
    trace_short: String,
}

/// One bar of a trace's waterfall: a request served by a service, or a mark for a
/// record that took no time.
struct SpanBar {
    service: String,
    label: String,
    /// Offset and width in per cent of the trace's span.
    left: String,
    width: String,
    took: String,
}

#[derive(Template)]
#[template(path = "logs.html")]
struct LogsPage {
    csrf: String,
    username: String,
    org: String,
    filters: LogFilters,
    services: Vec<&'static str>,
    records: Vec<LogRow>,
    waterfall: Vec<SpanBar>,
    trace_total: String,
    tail_query: String,
}

/// `HH:MM:SS.mmm` (UTC) of Unix milliseconds, with the date when not today.
fn clock(ms: i64) -> String {
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else { return String::new() };
    let today = time::OffsetDateTime::now_utc().date() == at.date();
    let time_part = format!("{:02}:{:02}:{:02}.{:03}", at.hour(), at.minute(), at.second(), at.millisecond());
    if today { time_part } else { format!("{} {time_part}", at.date()) }
}

fn log_row(record: &serde_json::Value) -> LogRow {
    let fields = record["fields"].as_object().map(|f| f.iter().map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect::<Vec<_>>().join(" ")).unwrap_or_default();
    LogRow {
        time: clock(record["ts_ms"].as_i64().unwrap_or(0)),
        service: record["service"].as_str().unwrap_or_default().to_string(),
        level: record["level"].as_str().unwrap_or_default().to_string(),
        message: record["message"].as_str().unwrap_or_default().chars().take(500).collect(),
        fields: fields.chars().take(400).collect(),
        trace_id: record["trace_id"].as_str().unwrap_or_default().to_string(),
        trace_short: record["trace_id"].as_str().unwrap_or_default().chars().take(8).collect(),
    }
}

/// A duration as people read it: two decimals under 10 ms (a search takes 0.3 ms), whole
/// milliseconds above.
fn millis(ms: f64) -> String {
    if ms < 10.0 { format!("{ms:.2} ms") } else { format!("{ms:.0} ms") }
}

/// The waterfall of one trace's records (oldest first): each "request served" record
/// is a bar from its start (its time less its duration, which has microseconds) to its
/// end.
fn waterfall(records: &[serde_json::Value]) -> (Vec<SpanBar>, String) {
    let spans: Vec<(f64, f64, &serde_json::Value)> = records
        .iter()
        .map(|r| {
            let end = r["ts_ms"].as_i64().unwrap_or(0) as f64;
            let took = r["fields"]["elapsed_ms"].as_f64().unwrap_or(0.0).max(0.0);
            (end - took, end, r)
        })
        .collect();
    let (Some(start), Some(end)) = (spans.iter().map(|s| s.0).reduce(f64::min), spans.iter().map(|s| s.1).reduce(f64::max)) else { return (Vec::new(), String::new()) };
    let total = (end - start).max(1.0);
    let mut bars: Vec<(f64, SpanBar)> = spans
        .iter()
        .map(|(from, to, r)| {
            let route = r["fields"]["route"].as_str().unwrap_or_default();
            let method = r["fields"]["method"].as_str().unwrap_or_default();
            let label = if route.is_empty() { r["message"].as_str().unwrap_or_default().to_string() } else { format!("{method} {route}") };
            let bar = SpanBar {
                service: r["service"].as_str().unwrap_or_default().to_string(),
                label,
                left: format!("{:.2}", (from - start) * 100.0 / total),
                width: format!("{:.2}", ((to - from) * 100.0 / total).max(0.4)),
                took: if to > from { millis(to - from) } else { String::new() },
            };
            (*from, bar)
        })
        .collect();
    bars.sort_by(|a, b| a.0.total_cmp(&b.0));
    (bars.into_iter().map(|(_, bar)| bar).collect(), millis(end - start))
}

pub(crate) async fn admin_logs(State(app): State<AppState>, PageUser(session): PageUser, axum::extract::Query(filters): axum::extract::Query<LogFilters>) -> Response {
    let principal = &session.principal;
    let loaded = async {
        crate::api::require_read(&app, principal, "logs:read", "system:read_all_logs").await?;
        let listed: serde_json::Value = app.ctx.peers.get_json(ServiceName::Logs, &format!("/v1/logs?{}", filters.query(if filters.trace_id.is_empty() { 200 } else { 1000 })), Some(principal)).await?;
        Ok::<_, ApiError>(listed["records"].as_array().cloned().unwrap_or_default())
    }
    .await;
    let records = match loaded {
        Ok(records) => records,
        Err(error) => return error_page(&error),
    };
    let (waterfall, trace_total) = if filters.trace_id.trim().is_empty() {
        (Vec::new(), String::new())
    } else {
        let mut oldest_first = records.clone();
        oldest_first.reverse();
        waterfall(&oldest_first)
    };
    let page = LogsPage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        tail_query: filters.query(200),
        filters,
        services: ServiceName::ALL.iter().map(|s| s.as_str()).collect(),
        records: records.iter().map(log_row).collect(),
        waterfall,
        trace_total,
    };
    render(StatusCode::OK, page.render())
}

// ---- the audit viewer, for admins (their org) and operators (every org) ----

#[derive(Default, Deserialize)]
pub(crate) struct AuditFilters {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    resource: String,
    /// `24h`, `7d`, `30d`, or empty for all.
    #[serde(default)]
    window: String,
    /// Also verify the whole chain.
    #[serde(default)]
    verify: Option<String>,
}

impl AuditFilters {
    fn query(&self) -> String {
        let mut parts = vec!["limit=200".to_string()];
        for (key, value) in [("actor", &self.actor), ("action", &self.action), ("resource", &self.resource)] {
            if !value.trim().is_empty() {
                parts.push(format!("{key}={}", common::client::encode(value.trim())));
            }
        }
        let window_secs = match self.window.as_str() {
            "24h" => Some(86_400),
            "7d" => Some(7 * 86_400),
            "30d" => Some(30 * 86_400),
            _ => None,
        };
        if let Some(secs) = window_secs {
            parts.push(format!("since={}", common::now_unix() - secs));
        }
        parts.join("&")
    }
}

struct AuditRow {
    seq: i64,
    time: String,
    actor: String,
    /// The actor's username when the actor is a person of the viewer's org.
    actor_name: String,
    action: String,
    resource: String,
    outcome: String,
    context: String,
    hash: String,
}

struct ChainView {
    ok: bool,
    records: i64,
    head: String,
    first_bad: String,
    reason: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    csrf: String,
    username: String,
    org: String,
    filters: AuditFilters,
    records: Vec<AuditRow>,
    chain: Option<ChainView>,
}

pub(crate) async fn admin_audit(State(app): State<AppState>, PageUser(session): PageUser, axum::extract::Query(filters): axum::extract::Query<AuditFilters>) -> Response {
    let principal = &session.principal;
    let loaded = async {
        crate::api::require_read(&app, principal, "audit:read", "system:read_all_audit").await?;
        let listed: serde_json::Value = app.ctx.peers.get_json(ServiceName::Audit, &format!("/v1/audit?{}", filters.query()), Some(principal)).await?;
        let chain = match filters.verify {
            Some(_) => Some(app.ctx.peers.get_json::<serde_json::Value>(ServiceName::Audit, "/v1/audit/verify", Some(principal)).await?),
            None => None,
        };
        // Actors are user ids; the viewer's org directory names its people.
        let path = format!("/internal/orgs/{}/users", common::client::encode(&principal.org));
        let people: Vec<common::wire::UserSummary> = app.ctx.peers.get_json(ServiceName::Identity, &path, Some(principal)).await.unwrap_or_default();
        let names: std::collections::HashMap<String, String> = people.into_iter().map(|u| (u.id, u.username)).collect();
        Ok::<_, ApiError>((listed["records"].as_array().cloned().unwrap_or_default(), chain, names))
    }
    .await;
    let (records, chain, names) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&error),
    };
    let rows = records
        .iter()
        .map(|r| AuditRow {
            seq: r["seq"].as_i64().unwrap_or(0),
            time: r["time"].as_str().unwrap_or_default().replace('T', " ").trim_end_matches('Z').to_string(),
            actor: r["actor"].as_str().unwrap_or_default().to_string(),
            actor_name: r["actor"].as_str().and_then(|a| names.get(a.strip_prefix("user:").unwrap_or(a))).cloned().unwrap_or_default(),
            action: r["action"].as_str().unwrap_or_default().to_string(),
            resource: r["resource"].as_str().unwrap_or_default().to_string(),
            outcome: r["outcome"].as_str().unwrap_or_default().to_string(),
            context: r["context"].as_object().filter(|c| !c.is_empty()).map(|c| serde_json::Value::Object(c.clone()).to_string().chars().take(160).collect()).unwrap_or_default(),
            hash: r["hash"].as_str().unwrap_or_default().chars().take(12).collect(),
        })
        .collect();
    let chain = chain.map(|v| ChainView {
        ok: v["ok"].as_bool().unwrap_or(false),
        records: v["n_records"].as_i64().unwrap_or(0),
        head: v["head_hash"].as_str().unwrap_or_default().to_string(),
        first_bad: v["first_bad"].as_i64().map(|s| s.to_string()).unwrap_or_default(),
        reason: v["reason"].as_str().unwrap_or_default().to_string(),
    });
    let page = AuditPage { csrf: session.csrf.clone(), username: principal.username.clone(), org: principal.org.clone(), filters, records: rows, chain };
    render(StatusCode::OK, page.render())
}

// ---- system health, for admins (operators also see the bus) ----

struct ServiceHealth {
    name: &'static str,
    ready: bool,
    detail: String,
    version: String,
    took: String,
}

struct FailedJob {
    id: String,
    filename: String,
    error: String,
    updated: String,
}

#[derive(Template)]
#[template(path = "health.html")]
struct HealthPage {
    csrf: String,
    username: String,
    org: String,
    services: Vec<ServiceHealth>,
    all_ready: bool,
    /// Operators only: the bus's subscriptions.
    bus: Option<Vec<SubscriptionView>>,
    failed: Vec<FailedJob>,
    errors: Vec<LogRow>,
}

/// Every service's `/readyz`, asked at once, each within two seconds.
async fn service_health(app: &AppState) -> Vec<ServiceHealth> {
    let probes = ServiceName::ALL.iter().map(|service| {
        let http = app.ctx.peers.http().clone();
        let url = format!("{}/readyz", app.ctx.config.url(*service));
        async move {
            let started = std::time::Instant::now();
            let answer = http.get(&url).timeout(std::time::Duration::from_secs(2)).send().await;
            let took = format!("{} ms", started.elapsed().as_millis());
            match answer {
                Ok(response) => {
                    let version = response.headers().get(common::server::VERSION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
                    let ready = response.status().is_success();
                    let detail = response.text().await.unwrap_or_default().chars().take(200).collect();
                    ServiceHealth { name: service.as_str(), ready, detail, version, took }
                }
                Err(error) => ServiceHealth {
                    name: service.as_str(),
                    ready: false,
                    detail: if error.is_timeout() { "no answer within 2 s".into() } else { "unreachable".into() },
                    version: "?".into(),
                    took,
                },
            }
        }
    });
    futures_util::future::join_all(probes).await
}

pub(crate) async fn admin_health(State(app): State<AppState>, PageUser(session): PageUser) -> Response {
    let principal = &session.principal;
    let loaded = async {
        crate::api::require_read(&app, principal, "logs:read", "system:read_all_logs").await?;
        let services = service_health(&app).await;
        let bus = if principal.is_operator() && crate::api::require_operator(&app, principal, "system:manage_queue").await.is_ok() {
            let stats: serde_json::Value = app.ctx.peers.get_json(ServiceName::Queue, "/v1/stats", Some(principal)).await?;
            Some(
                stats["subscriptions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| SubscriptionView {
                        name: s["subscription"].as_str().unwrap_or_default().to_string(),
                        topic: s["topic"].as_str().unwrap_or_default().to_string(),
                        depth: s["depth"].as_i64().unwrap_or(0),
                        in_flight: s["in_flight"].as_i64().unwrap_or(0),
                        dead_letters: s["dead_letters"].as_i64().unwrap_or(0),
                        oldest: age(s["oldest_age_ms"].as_i64()),
                        letters: Vec::new(),
                    })
                    .collect(),
            )
        } else {
            None
        };
        let filter = common::wire::DocumentFilter { status: Some("failed".into()), ..Default::default() };
        let failed = service::list_documents(&app, principal, None, &filter, Some(20), None).await?;
        let errors: serde_json::Value = app.ctx.peers.get_json(ServiceName::Logs, "/v1/logs?level=warn&limit=20", Some(principal)).await?;
        Ok::<_, ApiError>((services, bus, failed, errors))
    }
    .await;
    let (services, bus, failed, errors) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return error_page(&error),
    };
    let page = HealthPage {
        csrf: session.csrf.clone(),
        username: principal.username.clone(),
        org: principal.org.clone(),
        all_ready: services.iter().all(|s| s.ready),
        services,
        bus,
        failed: failed
            .documents
            .iter()
            .map(|d| FailedJob { id: d.id.clone(), filename: d.filename.clone(), error: d.error.clone().unwrap_or_default().chars().take(300).collect(), updated: d.updated_at.replace('T', " ").trim_end_matches('Z').to_string() })
            .collect(),
        errors: errors["records"].as_array().cloned().unwrap_or_default().iter().map(log_row).collect(),
    };
    render(StatusCode::OK, page.render())
}
