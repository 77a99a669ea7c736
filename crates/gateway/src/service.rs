//! The gateway's business functions, shared by the API and the pages: every check of
//! "may this user see or do this" goes through authz here, and a document the user
//! may not read is reported exactly like one that does not exist.

use axum::body::Bytes;
use axum::extract::multipart::{Field, Multipart};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use common::formats;
use common::wire::{Answer, AskRequest, BlobInfo, Collection, CreatedDocument, Decision, DecisionRequest, Document, Job, NewDocument, Principal, ReadableCollections, SearchQuery};
use common::{ApiError, ErrorKind, ServiceName};

use crate::AppState;

/// One code for a collection that does not exist or that the caller may not read (the
/// two are not told apart), wherever the gateway answers it; authz uses the same.
pub(crate) const COLLECTION_NOT_FOUND: &str = "authz.collection_not_found";

pub(crate) fn not_found() -> ApiError {
    ApiError::not_found("document.not_found", "no such document")
}

/// Ids in paths are UUIDs; anything else cannot exist (and never reaches a peer URL).
pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    uuid::Uuid::parse_str(id).map(|_| ()).map_err(|_| not_found())
}

pub(crate) async fn collections(app: &AppState, principal: &Principal) -> Result<Vec<Collection>, ApiError> {
    app.ctx.peers.get_json(ServiceName::Authz, "/v1/collections", Some(principal)).await
}

/// The collections (and, where only some may be read, the classifications) `principal`
/// may do `action` on.
pub(crate) async fn readable(app: &AppState, principal: &Principal, action: &str) -> Result<ReadableCollections, ApiError> {
    app.ctx.peers.post_json(ServiceName::Authz, "/v1/readable", Some(principal), &serde_json::json!({"action": action})).await
}

pub(crate) async fn decide(app: &AppState, principal: &Principal, action: &str, resource_type: &str, resource_id: &str) -> Result<bool, ApiError> {
    decide_classified(app, principal, action, resource_type, resource_id, None).await
}

/// A decision about one document: the collection, with the document's classification.
pub(crate) async fn decide_classified(
    app: &AppState,
    principal: &Principal,
    action: &str,
    resource_type: &str,
    resource_id: &str,
    classification: Option<&str>,
) -> Result<bool, ApiError> {
    let request = DecisionRequest {
        action: action.into(),
        resource_type: resource_type.into(),
        resource_id: resource_id.into(),
        classification: classification.map(str::to_string),
        new_role: None,
    };
    let decision: Decision = app.ctx.peers.post_json(ServiceName::Authz, "/v1/decide", Some(principal), &request).await?;
    Ok(decision.allowed)
}

pub(crate) async fn require_org_permission(app: &AppState, principal: &Principal, action: &str) -> Result<(), ApiError> {
    if decide(app, principal, action, "Org", &principal.org).await? {
        Ok(())
    } else {
        Err(ApiError::forbidden("auth.forbidden", "your role does not allow this"))
    }
}

/// Moves a subscription's dead letters (one, or all) back to delivery; operators only,
/// audited.
pub(crate) async fn redrive(app: &AppState, principal: &Principal, subscription: &str, seq: Option<i64>) -> Result<serde_json::Value, ApiError> {
    if !principal.is_operator() || !decide(app, principal, "system:manage_queue", "System", "echo").await? {
        return Err(ApiError::forbidden("auth.operator_required", "only an Echo operator may do this (granted with `echod user operator`)"));
    }
    let path = format!("/v1/subscriptions/{}/redrive", common::client::encode(subscription));
    let body = match seq {
        Some(seq) => serde_json::json!({"seq": seq}),
        None => serde_json::json!({}),
    };
    let answer: serde_json::Value = app.ctx.peers.post_json(ServiceName::Queue, &path, Some(principal), &body).await?;
    app.ctx
        .audit(&principal.sub, "queue.redriven", &format!("subscription:{subscription}"), "success", serde_json::json!({"seq": seq, "redriven": answer["redriven"]}))
        .await;
    Ok(answer)
}

/// Deletes a collection the principal may delete: documents first (so a failure
/// leaves the collection and its access as they were, and a retry finishes the job),
/// then the collection and its shares. Personal collections cannot be deleted.
pub(crate) async fn delete_collection(app: &AppState, principal: &Principal, id: &str) -> Result<(), ApiError> {
    let not_found = || ApiError::not_found(COLLECTION_NOT_FOUND, "no such collection");
    check_id(id).map_err(|_| not_found())?;
    let collection: Collection = app.ctx.peers.get_json(ServiceName::Authz, &format!("/v1/collections/{id}"), Some(principal)).await?;
    if collection.personal {
        return Err(ApiError::new(common::ErrorKind::Conflict, "collection.personal", "a personal collection cannot be deleted"));
    }
    if !decide(app, principal, "collection:delete", "Collection", id).await? {
        return Err(ApiError::forbidden("collection.forbidden", "only the collection's owner (or, for one owned by the org, its owners and admins) may delete it"));
    }
    let _: serde_json::Value = app.ctx.peers.post_json(ServiceName::Ingest, &format!("/v1/collections/{id}/purge"), Some(principal), &serde_json::json!({})).await?;
    let path = format!("/v1/collections/{id}");
    app.ctx.peers.delete(ServiceName::Authz, &path, Some(principal)).await
}

/// The document if `principal` may read its chunks and, when `action` is stronger, do `action`.
pub(crate) async fn authorized_document(app: &AppState, principal: &Principal, id: &str, action: &str) -> Result<Document, ApiError> {
    check_id(id)?;
    let document: Document = app.ctx.peers.get_json(ServiceName::Ingest, &format!("/v1/documents/{id}"), Some(principal)).await?;
    let class = Some(document.classification.as_str());
    if !decide_classified(app, principal, "document:read_chunks", "Collection", &document.collection, class).await? {
        return Err(not_found());
    }
    if action != "document:read_chunks" && !decide_classified(app, principal, action, "Collection", &document.collection, class).await? {
        return Err(ApiError::forbidden("document.forbidden", "you may read answers from this document but not do this"));
    }
    Ok(document)
}

pub(crate) async fn authorized_job(app: &AppState, principal: &Principal, id: &str) -> Result<Job, ApiError> {
    check_id(id).map_err(|_| ApiError::not_found("job.not_found", "no such job"))?;
    let job: Job = app.ctx.peers.get_json(ServiceName::Ingest, &format!("/v1/jobs/{id}"), Some(principal)).await?;
    if !decide(app, principal, "document:read_chunks", "Collection", &job.collection).await? {
        return Err(ApiError::not_found("job.not_found", "no such job"));
    }
    Ok(job)
}

#[derive(Serialize, Deserialize)]
pub(crate) struct DocumentPage {
    pub(crate) documents: Vec<Document>,
    pub(crate) total: i64,
}

/// The most documents one page lists.
pub(crate) const MAX_PAGE: i64 = 500;

/// The statuses a document can be listed by.
pub(crate) const DOCUMENT_STATUSES: [&str; 9] = ["queued", "parsing", "chunking", "embedding", "indexing", "done", "failed", "cancelled", "deleting"];

/// A document filter from a caller's words: the name part at most 200 characters, a
/// known status, an extension of letters and digits.
pub(crate) fn document_filter(name: Option<&str>, status: Option<&str>, extension: Option<&str>) -> Result<common::wire::DocumentFilter, ApiError> {
    let given = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
    let (name, status, extension) = (given(name), given(status), given(extension).map(|e| e.trim_start_matches('.').to_ascii_lowercase()));
    if name.as_ref().is_some_and(|n| n.chars().count() > 200) {
        return Err(ApiError::bad_request("request.invalid_filter", "a name filter is at most 200 characters"));
    }
    if status.as_ref().is_some_and(|s| !DOCUMENT_STATUSES.contains(&s.as_str())) {
        return Err(ApiError::bad_request("request.invalid_filter", format!("status is one of {}", DOCUMENT_STATUSES.join(", "))));
    }
    if extension.as_ref().is_some_and(|e| e.is_empty() || e.len() > 10 || !e.chars().all(|c| c.is_ascii_alphanumeric())) {
        return Err(ApiError::bad_request("request.invalid_filter", "type is a file extension such as pdf or docx"));
    }
    Ok(common::wire::DocumentFilter { name, status, extension })
}

pub(crate) async fn list_documents(
    app: &AppState,
    principal: &Principal,
    collection: Option<&str>,
    filter: &common::wire::DocumentFilter,
    limit: Option<i64>,
    offset: Option<i64>,
) -> Result<DocumentPage, ApiError> {
    if limit.is_some_and(|l| !(1..=MAX_PAGE).contains(&l)) {
        return Err(ApiError::bad_request("request.invalid_limit", format!("limit is 1 to {MAX_PAGE}")));
    }
    if offset.is_some_and(|o| !(0..=10_000_000).contains(&o)) {
        return Err(ApiError::bad_request("request.invalid_offset", "offset is 0 or more"));
    }
    let readable = readable(app, principal, "document:read_chunks").await?;
    let mut collections = readable.collections;
    if let Some(wanted) = collection {
        collections.retain(|c| c == wanted);
    }
    let restricted: std::collections::BTreeMap<&String, &Vec<String>> = readable.restricted.iter().filter(|(c, _)| collections.contains(c)).collect();
    let body = serde_json::json!({"collections": collections, "restricted": restricted, "limit": limit, "offset": offset, "filter": filter});
    app.ctx.peers.post_json(ServiceName::Ingest, "/v1/documents/query", Some(principal), &body).await
}

/// The search of the acting user: search asks authz what they may read, searches
/// only that and re-checks every hit (the one authorized retrieval path).
/// Search's answer as it sent it (`SearchResults` JSON), for passing on unchanged: the
/// public API's shape is the same, so nothing is decoded and encoded again.
pub(crate) async fn search_answer(app: &AppState, principal: &Principal, query: SearchQuery) -> Result<bytes::Bytes, ApiError> {
    if query.query.trim().is_empty() || query.query.len() > 4096 {
        return Err(ApiError::bad_request("search.invalid_query", "queries are 1 to 4096 bytes"));
    }
    let request = app.ctx.peers.request(ServiceName::Search, reqwest::Method::POST, "/v1/search", Some(principal)).await?.json(&query);
    let response = app.ctx.peers.send(ServiceName::Search, request).await?;
    response.bytes().await.map_err(|e| ApiError::unavailable("peer.unreachable", format!("search's answer broke off: {e}")))
}

pub(crate) async fn ask(app: &AppState, principal: &Principal, request: &AskRequest) -> Result<Answer, ApiError> {
    if let Some(id) = &request.conversation_id {
        check_id(id).map_err(|_| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    }
    app.ctx.peers.post_json(ServiceName::Rag, "/v1/ask", Some(principal), request).await
}

/// The answer as rag streams it (`delta` events, then `citations` or `error`). Dropping
/// the stream closes the connection to rag, which stops the model's work.
pub(crate) async fn ask_stream(
    app: &AppState,
    principal: &Principal,
    request: &AskRequest,
) -> Result<impl futures_util::Stream<Item = Result<common::sse::SseEvent, common::sse::StreamError>> + Send + 'static, ApiError> {
    if let Some(id) = &request.conversation_id {
        check_id(id).map_err(|_| ApiError::not_found("rag.conversation_not_found", "no such conversation"))?;
    }
    let timeout = answer_timeout(&app.ctx.config);
    let builder = app
        .ctx
        .peers
        .request(ServiceName::Rag, reqwest::Method::POST, "/v1/ask", Some(principal))
        .await?
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .timeout(timeout)
        .json(request);
    let response = app.ctx.peers.send(ServiceName::Rag, builder).await?;
    Ok(common::sse::events(response.bytes_stream()))
}

/// How long an answer may take end to end: twice the model's own limit (a retry), and
/// never less than two minutes.
pub(crate) fn answer_timeout(config: &common::EchoConfig) -> std::time::Duration {
    std::time::Duration::from_secs(config.llm.timeout_secs.saturating_mul(2).max(120))
}

async fn personal_collection(app: &AppState, principal: &Principal) -> Result<String, ApiError> {
    collections(app, principal)
        .await?
        .into_iter()
        .find(|c| c.personal && c.owner == principal.sub)
        .map(|c| c.id)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("no personal collection")))
}

/// The request's declared body size, if any.
pub(crate) fn content_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads a multipart upload (`csrf` for pages, optional `collection`, then `file`),
/// refuses empty and unsupported files before storing anything, streams the bytes to
/// storage and registers the document with ingest. `declared_size` (the request's
/// `Content-Length`) bounds the file: that much quota is reserved before any byte
/// is stored. A refusal reads the rest of the (size-limited) body first, so the
/// client hears the answer instead of a reset connection.
pub(crate) async fn upload(
    app: &AppState,
    principal: &Principal,
    mut multipart: Multipart,
    declared_size: Option<u64>,
    expected_csrf: Option<&str>,
) -> Result<CreatedDocument, ApiError> {
    let outcome = read_upload(app, principal, &mut multipart, declared_size, expected_csrf).await;
    if outcome.is_err() {
        let drain = async {
            while let Ok(Some(mut field)) = multipart.next_field().await {
                while let Ok(Some(_)) = field.chunk().await {}
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
    }
    outcome
}

async fn read_upload(
    app: &AppState,
    principal: &Principal,
    multipart: &mut Multipart,
    declared_size: Option<u64>,
    expected_csrf: Option<&str>,
) -> Result<CreatedDocument, ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        let status = e.status().as_u16();
        if status == 413 {
            ApiError::new(ErrorKind::PayloadTooLarge, "document.too_large", format!("files are limited to {} bytes", app.ctx.config.gateway.max_upload_bytes))
        } else {
            ApiError::bad_request("document.invalid_upload", e.body_text())
        }
    };
    let mut collection: Option<String> = None;
    let mut classification = common::wire::default_classification();
    let mut csrf_ok = expected_csrf.is_none();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        match field.name() {
            Some("csrf") => {
                let presented = field.text().await.map_err(bad)?;
                csrf_ok = expected_csrf.is_some_and(|expected| common::rand::constant_time_eq(expected.as_bytes(), presented.as_bytes()));
            }
            Some("collection") => {
                let value = field.text().await.map_err(bad)?;
                let value = value.trim().to_string();
                collection = (!value.is_empty()).then_some(value);
            }
            Some("classification") => {
                let value = field.text().await.map_err(bad)?;
                let value = value.trim();
                if !value.is_empty() {
                    if !common::wire::is_classification(value) {
                        return Err(ApiError::bad_request("document.invalid_classification", "classification is public, internal, confidential or restricted"));
                    }
                    classification = value.to_string();
                }
            }
            Some("file") => {
                if !csrf_ok {
                    return Err(ApiError::forbidden("auth.csrf", "the form expired; reload the page and try again"));
                }
                let collection = match collection.take() {
                    Some(id) => {
                        check_id(&id).map_err(|_| ApiError::not_found(COLLECTION_NOT_FOUND, "no such collection"))?;
                        id
                    }
                    None => personal_collection(app, principal).await?,
                };
                if !decide(app, principal, "collection:read", "Collection", &collection).await? {
                    return Err(ApiError::not_found(COLLECTION_NOT_FOUND, "no such collection"));
                }
                if !decide(app, principal, "document:create", "Collection", &collection).await? {
                    return Err(ApiError::forbidden("collection.read_only", "you may not add documents to this collection"));
                }
                return store_file(app, principal, &collection, &classification, field, declared_size, bad).await;
            }
            _ => {}
        }
    }
    Err(ApiError::bad_request("document.no_file", "the upload has no `file` field"))
}

async fn store_file(
    app: &AppState,
    principal: &Principal,
    collection: &str,
    classification: &str,
    mut field: Field<'_>,
    declared_size: Option<u64>,
    bad: impl Fn(axum::extract::multipart::MultipartError) -> ApiError,
) -> Result<CreatedDocument, ApiError> {
    let filename = formats::clean_filename(field.file_name().unwrap_or("upload"));
    let declared = field.content_type().unwrap_or_default().to_string();
    let mut head = Vec::new();
    while head.len() < 8192 {
        match field.chunk().await.map_err(&bad)? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => break,
        }
    }
    if head.is_empty() {
        return Err(ApiError::bad_request("document.empty", "the file is empty"));
    }
    let format = formats::detect(&declared, &filename, &head)
        .map_err(|e| ApiError::new(ErrorKind::UnsupportedMediaType, "document.unsupported_type", e.to_string()))?;

    // The file is at most the whole request: reserve that much quota before sending a
    // byte, so concurrent uploads cannot together pass the quota.
    let max_file = app.ctx.config.gateway.max_upload_bytes.min(app.ctx.config.storage.max_blob_bytes);
    let reserve_bytes = declared_size.unwrap_or(max_file).min(max_file).max(head.len() as u64);
    #[derive(Deserialize)]
    struct Reservation {
        reservation: String,
    }
    let reservation: Reservation = app.ctx.peers.post_json(ServiceName::Storage, "/v1/reservations", Some(principal), &serde_json::json!({"bytes": reserve_bytes})).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) });
    let path = format!("/v1/blobs?reservation={}", common::client::encode(&reservation.reservation));
    let request = app.ctx.peers.request(ServiceName::Storage, Method::PUT, &path, Some(principal)).await?.body(reqwest::Body::wrap_stream(stream));
    let pump = async move {
        if sender.send(Ok(Bytes::from(head))).await.is_err() {
            return Ok(());
        }
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    if sender.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(error) => {
                    let _ = sender.send(Err(std::io::Error::other("upload interrupted"))).await;
                    return Err(bad(error));
                }
            }
        }
    };
    let (stored, pumped) = tokio::join!(app.ctx.peers.send(ServiceName::Storage, request), pump);
    pumped?;
    let blob: BlobInfo = stored?.json().await.map_err(ApiError::internal)?;
    let new = NewDocument {
        collection_id: collection.to_string(),
        owner: principal.sub.clone(),
        filename,
        content_type: format.content_type().to_string(),
        size: blob.size,
        sha256: blob.sha256.clone(),
        blob_id: blob.blob_id.clone(),
        classification: classification.to_string(),
    };
    let created: CreatedDocument = app.ctx.peers.post_json(ServiceName::Ingest, "/v1/documents", Some(principal), &new).await?;
    if created.duplicate_of.is_some() {
        // The same content is already in this collection: keep one copy.
        let _ = app.ctx.peers.delete(ServiceName::Storage, &format!("/v1/blobs/{}", blob.blob_id), Some(principal)).await;
    } else {
        app.ctx
            .audit(&principal.sub, "document.uploaded", &format!("document:{}", created.id), "success", serde_json::json!({"collection": collection, "sha256": blob.sha256, "size": blob.size, "classification": classification}))
            .await;
    }
    Ok(created)
}

/// Streams the document's bytes from storage, passing `Range` and validators through.
pub(crate) async fn download(app: &AppState, principal: &Principal, id: &str, headers: &axum::http::HeaderMap) -> Result<axum::response::Response, ApiError> {
    use axum::http::{HeaderValue, header};
    let document = authorized_document(app, principal, id, "document:download").await?;
    let mut request = app.ctx.peers.request(ServiceName::Storage, Method::GET, &format!("/v1/blobs/{}", document.blob_id), Some(principal)).await?;
    for name in [header::RANGE, header::IF_NONE_MATCH, header::IF_RANGE, header::IF_MODIFIED_SINCE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    let upstream = app.ctx.peers.send(ServiceName::Storage, request).await?;
    let status = axum::http::StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(axum::http::StatusCode::OK);
    let mut response = axum::response::Response::builder().status(status);
    for name in [header::CONTENT_LENGTH, header::CONTENT_RANGE, header::ACCEPT_RANGES, header::ETAG, header::LAST_MODIFIED] {
        if let Some(value) = upstream.headers().get(name.as_str()) {
            response = response.header(name, value.as_bytes());
        }
    }
    let ascii: String = document.filename.chars().map(|c| if c.is_ascii_alphanumeric() || "._- ".contains(c) { c } else { '_' }).collect();
    let disposition = format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{}", common::client::encode(&document.filename).replace('+', "%20"));
    let body = axum::body::Body::from_stream(upstream.bytes_stream());
    let mut response = response.body(body).map_err(ApiError::internal)?;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(&document.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment")));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    Ok(response)
}

/// Creates a user in the admin's own org. Only owners may create owners.
/// `temporary`: the admin chose the password, and the user must replace it at first sign-in.
pub(crate) async fn create_user(app: &AppState, admin: &Principal, username: &str, password: &str, role: &str, email: Option<String>, temporary: bool) -> Result<common::wire::UserSummary, ApiError> {
    require_org_permission(app, admin, "admin:manage_users").await?;
    if role == "owner" && !admin.roles.iter().any(|r| r == "owner") {
        return Err(ApiError::forbidden("admin.owner_only", "only owners may create owners"));
    }
    if role == "admin" && !admin.roles.iter().any(|r| r == "owner") {
        return Err(ApiError::forbidden("admin.owner_only", "only owners may create admins"));
    }
    let body = serde_json::json!({"username": username, "password": password, "org": admin.org, "role": role, "email": email, "temporary": temporary});
    app.ctx.peers.post_json(ServiceName::Identity, "/internal/users", Some(admin), &body).await
}

/// A user of the admin's own org that the admin may manage at all (`admin:manage_users`);
/// users of other orgs are not found.
async fn managed_user(app: &AppState, admin: &Principal, id: &str) -> Result<common::wire::UserSummary, ApiError> {
    require_org_permission(app, admin, "admin:manage_users").await?;
    let not_found = || ApiError::not_found("admin.user_not_found", "no such user");
    check_id(id).map_err(|_| not_found())?;
    let user: common::wire::UserSummary = app.ctx.peers.get_json(ServiceName::Identity, &format!("/internal/users/{id}"), Some(admin)).await.map_err(|_| not_found())?;
    if user.org != admin.org {
        return Err(not_found());
    }
    Ok(user)
}

/// Whether `admin` may do `action` (`user:disable`, `user:set_role`, `user:reset_password`)
/// to the account `target`: a Cedar decision (owners manage everyone, admins members and viewers).
async fn require_account_permission(app: &AppState, admin: &Principal, action: &str, target: &str, new_role: Option<&str>) -> Result<(), ApiError> {
    let request = DecisionRequest {
        action: action.into(),
        resource_type: "User".into(),
        resource_id: target.into(),
        classification: None,
        new_role: new_role.map(str::to_string),
    };
    let decision: Decision = app.ctx.peers.post_json(ServiceName::Authz, "/v1/decide", Some(admin), &request).await?;
    if decision.allowed {
        Ok(())
    } else {
        Err(ApiError::forbidden("admin.not_permitted", "your role does not allow this: owners manage everyone of the org, admins only members and viewers, and nobody changes their own account this way"))
    }
}

/// Disables a user of the admin's own org.
pub(crate) async fn disable_user(app: &AppState, admin: &Principal, id: &str) -> Result<common::wire::UserSummary, ApiError> {
    let user = managed_user(app, admin, id).await?;
    if user.id == admin.sub {
        return Err(ApiError::bad_request("admin.not_yourself", "you cannot disable yourself"));
    }
    require_account_permission(app, admin, "user:disable", &user.id, None).await?;
    app.ctx.peers.post_json(ServiceName::Identity, &format!("/internal/users/{id}/disable"), Some(admin), &serde_json::json!({})).await
}

/// Gives a user of the admin's own org another role.
pub(crate) async fn set_user_role(app: &AppState, admin: &Principal, id: &str, role: &str) -> Result<common::wire::UserSummary, ApiError> {
    if !matches!(role, "owner" | "admin" | "member" | "viewer") {
        return Err(ApiError::bad_request("admin.invalid_role", "role must be owner, admin, member or viewer"));
    }
    let user = managed_user(app, admin, id).await?;
    require_account_permission(app, admin, "user:set_role", &user.id, Some(role)).await?;
    app.ctx.peers.post_json(ServiceName::Identity, &format!("/internal/users/{id}/role"), Some(admin), &serde_json::json!({"role": role})).await
}

/// Mails a user of the admin's own org a password-reset link.
pub(crate) async fn send_password_reset(app: &AppState, admin: &Principal, id: &str) -> Result<(), ApiError> {
    let user = managed_user(app, admin, id).await?;
    require_account_permission(app, admin, "user:reset_password", &user.id, None).await?;
    let request = app.ctx.peers.request(ServiceName::Identity, Method::POST, &format!("/internal/users/{id}/reset"), Some(admin)).await?;
    app.ctx.peers.send(ServiceName::Identity, request).await?;
    Ok(())
}

/// Changes the caller's own password at identity (the current one is required);
/// identity then ends every other session and token of the account, keeping only the
/// gateway session whose id hash is `keep_session`.
pub(crate) async fn change_password(app: &AppState, principal: &Principal, current: &str, new: &str, keep_session: Option<&str>) -> Result<(), ApiError> {
    let path = format!("/internal/users/{}/password", common::client::encode(&principal.sub));
    let body = serde_json::json!({"current_password": current, "new_password": new, "keep_session": keep_session});
    let request = app.ctx.peers.request(ServiceName::Identity, Method::POST, &path, Some(principal)).await?.json(&body);
    app.ctx.peers.send(ServiceName::Identity, request).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn non_uuid_ids_are_not_found() {
        assert!(check_id("../../etc/passwd").is_err());
        assert!(check_id("0190f1e6-3b7a-7c2e-9d8f-1a2b3c4d5e6f").is_ok());
    }
}
