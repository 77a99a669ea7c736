//! Types that cross a process boundary: HTTP bodies between services, events on the
//! bus, audit and log records. A serialisable type here is a compatibility promise:
//! add optional fields, never rename or remove one.

use serde::{Deserialize, Serialize};

/// The signed-in user a service acts for. Derived by the gateway from a verified
/// token and passed to callees in the `x-echo-principal` header; callees trust it
/// only from a caller whose service token they verified.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub username: String,
    pub org: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The role that reaches across orgs; granted only by `echod user operator`.
pub const OPERATOR_ROLE: &str = "operator";

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "owner" || r == "admin")
    }

    pub fn is_operator(&self) -> bool {
        self.roles.iter().any(|r| r == OPERATOR_ROLE)
    }
}

pub const PRINCIPAL_HEADER: &str = "x-echo-principal";

/// A CloudEvents 1.0 structured-mode JSON envelope.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub time: String,
    #[serde(default = "default_content_type")]
    pub datacontenttype: String,
    /// Schema version of `data` for this `type`.
    #[serde(default = "default_data_version")]
    pub dataversion: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub data: serde_json::Value,
}

fn default_content_type() -> String {
    "application/json".into()
}
fn default_data_version() -> String {
    "1".into()
}

impl CloudEvent {
    pub fn new(source: &str, type_: &str, subject: Option<String>, data: serde_json::Value) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            type_: type_.into(),
            subject,
            time: crate::rfc3339(crate::now_unix()),
            datacontenttype: default_content_type(),
            dataversion: default_data_version(),
            // The consumer's work continues the trace of the work that published it.
            traceparent: crate::trace::outgoing(),
            data,
        }
    }

    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self.data.clone())
    }
}

/// Event types Echo publishes (SPEC §3).
pub mod events {
    pub const DOCUMENT_UPLOADED: &str = "echo.document.uploaded";
    pub const DOCUMENT_INDEXED: &str = "echo.document.indexed";
    pub const DOCUMENT_FAILED: &str = "echo.document.failed";
    pub const DOCUMENT_DELETED: &str = "echo.document.deleted";
    pub const USER_CREATED: &str = "echo.user.created";
    pub const USER_DISABLED: &str = "echo.user.disabled";
    pub const TOKENS_REVOKED: &str = "echo.token.revoked";
    pub const RELATIONSHIP_CHANGED: &str = "echo.relationship.changed";
    pub const CHAT_MESSAGE_POSTED: &str = "echo.chat.message.posted";
    pub const AUDIT_RECORDED: &str = "echo.audit.recorded";
    pub const LOG_BATCH: &str = "echo.log.batch";

    pub const ALL: [&str; 11] = [
        DOCUMENT_UPLOADED,
        DOCUMENT_INDEXED,
        DOCUMENT_FAILED,
        DOCUMENT_DELETED,
        USER_CREATED,
        USER_DISABLED,
        TOKENS_REVOKED,
        RELATIONSHIP_CHANGED,
        CHAT_MESSAGE_POSTED,
        AUDIT_RECORDED,
        LOG_BATCH,
    ];
}

/// A change of who may read what (`echo.relationship.changed`): memberships, shares,
/// collections, groups, rooms, or the policies (`object` = `policies`). `epoch` is the
/// access epoch after the change; readers caching access answers drop those of an
/// older epoch.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RelationshipChanged {
    pub object: String,
    pub relation: String,
    pub subjects: serde_json::Value,
    #[serde(default)]
    pub epoch: AccessEpoch,
}

/// Where authz's access facts stand: the relationship version (bumped by every write
/// to `authz.db`) and the policy generation (set from the clock when authz starts,
/// bumped on every reload). Both only grow, so an answer tagged with an epoch older
/// than one already announced is stale.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct AccessEpoch {
    pub version: i64,
    pub policies: u64,
}

impl AccessEpoch {
    /// Whether an answer computed at `self` is still good after `announced`.
    pub fn current_after(&self, announced: &AccessEpoch) -> bool {
        self.version >= announced.version && self.policies >= announced.policies
    }

    /// The later of the two, field by field.
    pub fn max(&self, other: &AccessEpoch) -> AccessEpoch {
        AccessEpoch { version: self.version.max(other.version), policies: self.policies.max(other.policies) }
    }
}

/// Access tokens that must no longer be accepted, and browser sessions that must end
/// (`echo.token.revoked`, from identity): after `/revoke`, a replayed authorization
/// code, a reused refresh token, a password change or reset. Verifiers keep each `jti`
/// until its `exp`, so the refusal survives their restarts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TokensRevoked {
    /// Why: `revoked`, `code_reuse`, `refresh_reuse`, `password_changed`, `password_reset`,
    /// `role_changed`, `consent_withdrawn`, `disabled`.
    pub reason: String,
    pub tokens: Vec<RevokedToken>,
    /// When set, every browser session of this user ends…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_sessions_of: Option<String>,
    /// …except the one with this id hash (the session that changed the password,
    /// re-issued by the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_session: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RevokedToken {
    pub jti: String,
    /// Unix seconds; after it the token is refused as expired anyway.
    pub exp: i64,
}

/// A chat message was stored (`echo.chat.message.posted`).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChatMessagePosted {
    pub room_id: String,
    pub message_id: String,
    pub seq: i64,
}

/// Every (event type, data version) Echo speaks, with the JSON Schema of its `data`
/// generated from the typed struct `validate_event_data` checks it against. The schemas
/// are kept in the repository (`schemas/events/TYPE/vN.json`); a test refuses a change
/// that would break a consumer of a kept version unless the version is bumped (a new
/// struct, a new `dataversion`) while the old one is still accepted.
pub fn event_schemas() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default()
    }
    vec![
        (events::DOCUMENT_UPLOADED, "1", schema::<DocumentUploaded>()),
        (events::DOCUMENT_INDEXED, "1", schema::<DocumentIndexed>()),
        (events::DOCUMENT_FAILED, "1", schema::<DocumentFailed>()),
        (events::DOCUMENT_DELETED, "1", schema::<DocumentDeleted>()),
        (events::USER_CREATED, "1", schema::<UserSummary>()),
        (events::USER_DISABLED, "1", schema::<UserSummary>()),
        (events::TOKENS_REVOKED, "1", schema::<TokensRevoked>()),
        (events::RELATIONSHIP_CHANGED, "1", schema::<RelationshipChanged>()),
        (events::CHAT_MESSAGE_POSTED, "1", schema::<ChatMessagePosted>()),
        (events::AUDIT_RECORDED, "1", schema::<AuditEvent>()),
        (events::LOG_BATCH, "1", schema::<LogBatch>()),
    ]
}

/// Checks that `data` matches the schema of event `type_` at `version`: each event type
/// has one typed struct per version here, and the queue refuses anything else.
pub fn validate_event_data(type_: &str, version: &str, data: &serde_json::Value) -> Result<(), String> {
    fn check<T: serde::de::DeserializeOwned>(data: &serde_json::Value) -> Result<(), String> {
        serde_json::from_value::<T>(data.clone()).map(|_| ()).map_err(|e| e.to_string())
    }
    if version != "1" {
        return Err(format!("unknown dataversion `{version}` for {type_}"));
    }
    match type_ {
        events::DOCUMENT_UPLOADED => check::<DocumentUploaded>(data),
        events::DOCUMENT_INDEXED => check::<DocumentIndexed>(data),
        events::DOCUMENT_FAILED => check::<DocumentFailed>(data),
        events::DOCUMENT_DELETED => check::<DocumentDeleted>(data),
        events::USER_CREATED | events::USER_DISABLED => check::<UserSummary>(data),
        events::TOKENS_REVOKED => check::<TokensRevoked>(data),
        events::RELATIONSHIP_CHANGED => check::<RelationshipChanged>(data),
        events::CHAT_MESSAGE_POSTED => check::<ChatMessagePosted>(data),
        events::AUDIT_RECORDED => check::<AuditEvent>(data),
        events::LOG_BATCH => check::<LogBatch>(data),
        other => Err(format!("`{other}` is not an Echo event type")),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DocumentUploaded {
    pub document_id: String,
    pub job_id: String,
    pub collection_id: String,
    pub owner: String,
    pub blob_id: String,
    pub sha256: String,
    pub content_type: String,
    pub filename: String,
    pub version: i64,
    /// Events written before classifications existed carry none: `internal`.
    #[serde(default = "default_classification")]
    pub classification: String,
}

// ---- document classification ----

/// The classifications a document can carry, from least to most protected. Policies
/// see the one of the document in question as `context.classification`.
pub const CLASSIFICATIONS: [&str; 4] = ["public", "internal", "confidential", "restricted"];

/// What a document is when nobody said otherwise (and what documents stored before
/// classifications existed are).
pub const DEFAULT_CLASSIFICATION: &str = "internal";

pub fn default_classification() -> String {
    DEFAULT_CLASSIFICATION.to_string()
}

pub fn is_classification(value: &str) -> bool {
    CLASSIFICATIONS.contains(&value)
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DocumentIndexed {
    pub document_id: String,
    pub job_id: String,
    pub collection_id: String,
    pub n_chunks: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DocumentFailed {
    pub document_id: String,
    pub job_id: String,
    pub collection_id: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DocumentDeleted {
    pub document_id: String,
    pub collection_id: String,
    pub blob_id: String,
}

/// An audit event as every service publishes it; the audit service chains it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct AuditEvent {
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    #[serde(default)]
    pub context: serde_json::Value,
}

/// One operational log record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct LogRecord {
    pub ts_ms: i64,
    pub service: String,
    pub level: String,
    pub target: String,
    pub message: String,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LogBatch {
    pub records: Vec<LogRecord>,
    #[serde(default)]
    pub dropped: u64,
}

// ---- storage ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobInfo {
    pub blob_id: String,
    pub sha256: String,
    pub size: u64,
}

// ---- parser ----

/// A piece of extracted text with the structure a citation can point at.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TextBlock {
    pub text: String,
    /// 1-based physical page (PDF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// Heading path such as `Install > Linux`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParsedDocument {
    pub format: String,
    pub blocks: Vec<TextBlock>,
    #[serde(default)]
    pub n_pages: Option<u32>,
    /// The document's own title (HTML `<title>`, Markdown's first heading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

// ---- ingest ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewDocument {
    pub collection_id: String,
    pub owner: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    pub blob_id: String,
    #[serde(default = "default_classification")]
    pub classification: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Document {
    pub id: String,
    pub collection: String,
    pub owner: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    pub status: String,
    pub version: i64,
    pub job_id: String,
    pub blob_id: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default = "default_classification")]
    pub classification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Progress of the latest processing: pages parsed (formats with pages), chunks
    /// made, chunks embedded so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u32>,
    #[serde(default)]
    pub chunks: u64,
    #[serde(default)]
    pub embedded: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedDocument {
    pub id: String,
    pub job_id: String,
    pub status: String,
    /// The existing document when the same content already sits in the collection.
    #[serde(default)]
    pub duplicate_of: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub document_id: String,
    pub collection: String,
    pub status: String,
    pub attempts: i64,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// The stages the job went through, in order, with their durations.
    #[serde(default)]
    pub stages: Vec<JobStage>,
}

/// What a document list is narrowed to (gateway → ingest): a part of the file name
/// (any case), a status, a file extension. The gateway checks the values.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DocumentFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
}

/// One stage of an ingest job: when it began and, once the next began, how long it took.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobStage {
    pub stage: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

// ---- search ----

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Chunk {
    pub chunk_id: String,
    pub document_id: String,
    pub collection_id: String,
    pub ordinal: u32,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    pub char_start: u64,
    pub char_end: u64,
    #[serde(default = "default_classification")]
    pub classification: String,
    /// The document's title (an HTML `<title>`, a first heading, else the filename).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The chunk's embedding: little-endian f32s, base64 (see `encode_vector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<String>,
}

/// An embedding as it crosses a process: little-endian f32s, standard base64.
pub fn encode_vector(vector: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of `encode_vector`; `None` for anything that is not whole f32s.
pub fn decode_vector(text: &str) -> Option<Vec<f32>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Texts to embed (`POST /v1/embed` of search).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmbedRequest {
    pub texts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmbedResponse {
    /// One `encode_vector` per text, in order.
    pub vectors: Vec<String>,
    /// The model, e.g. `all-MiniLM-L6-v2`, and its dimension.
    pub model: String,
    pub dimension: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexRequest {
    pub document_id: String,
    pub chunks: Vec<Chunk>,
}

/// A search as the gateway or rag sends it, for the user it acts for: search asks
/// authz what that user may read and searches only that (`collections` can narrow it,
/// never widen it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchQuery {
    pub query: String,
    pub k: usize,
    /// Only these of the readable collections; unset: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<Vec<String>>,
    /// `hybrid` (default when embeddings are on), `bm25` or `vector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SearchMode>,
    /// Each hit's whole chunk text in `text`; otherwise hits carry the snippet only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_text: bool,
    /// Whether the configured reranker reorders the hits; unset: yes, when one is
    /// configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<bool>,
    /// At most this many hits from one page of a document (from one document, when it
    /// has no pages); unset: 1, so ten hits are ten places to look; 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_page: Option<usize>,
}

/// Which rankings a search uses.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    Hybrid,
    Bm25,
    Vector,
}

/// A document's first chunks in reading order and its chunk count (search →
/// gateway, for the document page's preview).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChunkPreview {
    pub document_id: String,
    pub total: usize,
    pub chunks: Vec<SearchHit>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SearchHit {
    pub document_id: String,
    pub chunk_id: String,
    pub collection_id: String,
    pub score: f32,
    /// The chunk's text when the search asked for it (`full_text`), else empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    #[serde(default = "default_classification")]
    pub classification: String,
    /// The part of `text` that matched, HTML-escaped, query terms in `<mark>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Cosine similarity of the chunk's embedding to the question's, when the vector
    /// ranking saw this chunk: a calibrated "how related is it" that fused ranks are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchResults {
    pub hits: Vec<SearchHit>,
}

/// A rebuild of the whole index (`echod reindex`), as ingest runs it: every indexed
/// document parsed, chunked and embedded again into a new index generation, which
/// replaces the live one when all are in.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReindexRun {
    pub id: String,
    /// `running`, `stopped` (an error paused it; starting again resumes) or `done`.
    pub status: String,
    /// Documents to rebuild, as counted at the start.
    pub total: i64,
    /// Documents rebuilt so far (the cursor survives restarts).
    pub done: i64,
    /// Documents that could not be rebuilt (each marked failed with the reason).
    pub failed: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// Search's index generations (`/v1/rebuild`): the live one, and the one being
/// rebuilt beside it while `echod reindex` runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildStatus {
    pub building: bool,
    pub live: String,
    pub live_chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub next_chunks: u64,
}

// ---- authz ----

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Collection {
    pub id: String,
    pub name: String,
    pub org: String,
    pub owner: String,
    pub personal: bool,
    /// Owned by the org (its owners and admins manage it), not by a person.
    #[serde(default)]
    pub org_owned: bool,
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecisionRequest {
    pub action: String,
    /// `Collection::"<id>"` style resource: type and id.
    pub resource_type: String,
    pub resource_id: String,
    /// For document actions: the classification of the document in question
    /// (`context.classification` in the policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<String>,
    /// For `user:set_role` on a `User`: the role being given (`context.new_role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_role: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub policies: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadableCollections {
    /// Every collection where at least one classification may be read.
    pub collections: Vec<String>,
    /// Those of `collections` where only some classifications may be read, with them;
    /// every other listed collection may be read whatever the classification.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub restricted: std::collections::BTreeMap<String, Vec<String>>,
    /// The access epoch the answer was computed at.
    #[serde(default)]
    pub epoch: AccessEpoch,
}

impl ReadableCollections {
    /// Whether a document of `collection` with `classification` is in this set.
    pub fn allows(&self, collection: &str, classification: &str) -> bool {
        self.collections.iter().any(|c| c == collection)
            && self.restricted.get(collection).is_none_or(|classes| classes.iter().any(|c| c == classification))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShareMember {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub role: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShareRequest {
    pub members: Vec<ShareMember>,
}

// ---- rag ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AskRequest {
    pub question: String,
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    #[serde(default)]
    pub conversation_id: Option<String>,
    /// Earlier turns the client keeps itself (the OpenAI-compatible `messages`), used
    /// like a stored conversation's for follow-ups; nothing of it is stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Turn>,
}

/// One turn of a conversation: `user` or `assistant`, and what was said.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Citation {
    pub n: usize,
    pub document_id: String,
    pub chunk_id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// The document's title, to name the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The words of `text` the answer quotes (extractive) or rests on, to highlight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub answer: String,
    pub citations: Vec<Citation>,
    pub conversation_id: String,
    pub mode: String,
    /// The documents the asker may read hold nothing that answers this: the answer
    /// says so and cites nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_found: bool,
    /// Sentences of the answer whose words are mostly absent from the passages they
    /// cite (`llm.flag_unsupported`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// The model's token counts (`llm` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A streamed ask (rag → gateway → API clients, `Accept: text/event-stream`) sends
/// `delta` events (an [`AnswerDelta`]) as the answer is written, then one `citations`
/// event (the whole [`Answer`], its citations verified), or an `error` event (a
/// problem) instead.
pub const ASK_EVENT_DELTA: &str = "delta";
pub const ASK_EVENT_ANSWER: &str = "citations";
pub const ASK_EVENT_ERROR: &str = "error";

/// A piece of an answer as it is written.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnswerDelta {
    pub text: String,
}

/// Tokens a model call used, as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

// ---- identity ----

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserSummary {
    pub id: String,
    pub username: String,
    pub org: String,
    pub roles: Vec<String>,
    pub email: Option<String>,
    pub disabled: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_has_a_schema_that_refuses_the_wrong_shape() {
        for type_ in events::ALL {
            let error = validate_event_data(type_, "1", &serde_json::json!({"unexpected": true})).unwrap_err();
            assert!(error.contains("missing field"), "{type_}: {error}");
        }
        let deleted = serde_json::json!({"document_id": "d", "collection_id": "c", "blob_id": "b"});
        assert!(validate_event_data(events::DOCUMENT_DELETED, "1", &deleted).is_ok());
        assert!(validate_event_data(events::DOCUMENT_DELETED, "2", &deleted).is_err(), "unknown versions are refused");
    }
}
