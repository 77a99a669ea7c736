//! The search service's HTTP handlers: decode, call `service`, encode. Every route
//! needs a service token; `/v1/search` also the user it searches for.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use common::error::{ApiResult, Json};
use common::server::ActingUser;
use common::wire::{EmbedRequest, EmbedResponse, IndexRequest, RebuildStatus, SearchQuery};
use common::ApiError;

use crate::service::Retrieval;

/// Texts one embedding call may carry.
const MAX_EMBED_TEXTS: usize = 1024;

/// `POST /v1/search`: what the acting user may read that answers the query
/// (`SearchResults`, sent as the result cache keeps it).
pub(crate) async fn search(State(retrieval): State<Retrieval>, ActingUser(principal): ActingUser, Json(query): Json<SearchQuery>) -> ApiResult<Response> {
    let answer = retrieval.search_answer(&principal, query).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
}

/// `POST /v1/embed`: the ingest worker's embedding stage.
pub(crate) async fn embed(State(retrieval): State<Retrieval>, Json(request): Json<EmbedRequest>) -> ApiResult<Json<EmbedResponse>> {
    if request.texts.len() > MAX_EMBED_TEXTS {
        return Err(ApiError::bad_request("search.too_many_texts", format!("at most {MAX_EMBED_TEXTS} texts per call")));
    }
    let (vectors, model) = retrieval.embed(request.texts).await?;
    let dimension = vectors.first().map(Vec::len).unwrap_or(model.dimension);
    Ok(Json(EmbedResponse { vectors: vectors.iter().map(|v| common::wire::encode_vector(v)).collect(), model: model.name, dimension }))
}

/// `POST /v1/index`: a document's chunks replace its old ones.
pub(crate) async fn index(State(retrieval): State<Retrieval>, Json(request): Json<IndexRequest>) -> ApiResult<Json<serde_json::Value>> {
    let indexed = retrieval.index(request.document_id, request.chunks, false).await?;
    Ok(Json(serde_json::json!({"indexed": indexed})))
}

/// `POST /v1/rebuild/index`: a document's chunks into the index being rebuilt only.
pub(crate) async fn rebuild_index(State(retrieval): State<Retrieval>, Json(request): Json<IndexRequest>) -> ApiResult<Json<serde_json::Value>> {
    let indexed = retrieval.index(request.document_id, request.chunks, true).await?;
    Ok(Json(serde_json::json!({"indexed": indexed})))
}

/// `GET /v1/rebuild`: the live index and the one being rebuilt, if any.
pub(crate) async fn rebuild_status(State(retrieval): State<Retrieval>) -> ApiResult<Json<RebuildStatus>> {
    Ok(Json(retrieval.rebuild_status().await?))
}

/// `POST /v1/rebuild`: starts a rebuild beside the live index (or goes on with one).
pub(crate) async fn begin_rebuild(State(retrieval): State<Retrieval>) -> ApiResult<Json<RebuildStatus>> {
    Ok(Json(retrieval.begin_rebuild().await?))
}

/// `POST /v1/rebuild/finish`: the rebuilt index becomes the live one.
pub(crate) async fn finish_rebuild(State(retrieval): State<Retrieval>) -> ApiResult<Json<RebuildStatus>> {
    Ok(Json(retrieval.finish_rebuild().await?))
}

/// `DELETE /v1/rebuild`: gives up the rebuild; the live index stays.
pub(crate) async fn abandon_rebuild(State(retrieval): State<Retrieval>) -> ApiResult<Json<RebuildStatus>> {
    Ok(Json(retrieval.abandon_rebuild().await?))
}

/// `GET /v1/documents/{id}`: how many chunks of the document the index holds.
pub(crate) async fn document(State(retrieval): State<Retrieval>, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(serde_json::json!({"document_id": id.clone(), "chunks": retrieval.chunks_of(id).await?})))
}

#[derive(serde::Deserialize)]
pub(crate) struct PreviewQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/documents/{id}/chunks?limit=N`: the document's first chunks in order (at
/// most 100) and its chunk count. The caller has checked `document:read_chunks`.
pub(crate) async fn preview(State(retrieval): State<Retrieval>, Path(id): Path<String>, axum::extract::Query(query): axum::extract::Query<PreviewQuery>) -> ApiResult<Json<common::wire::ChunkPreview>> {
    let (total, chunks) = retrieval.preview(id.clone(), query.limit.unwrap_or(20).min(100)).await?;
    Ok(Json(common::wire::ChunkPreview { document_id: id, total, chunks }))
}

/// `DELETE /v1/documents/{id}`.
pub(crate) async fn delete_document(State(retrieval): State<Retrieval>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    retrieval.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
