//! Answering a question for a principal: the conversation it belongs to, a retrieval
//! query that carries a follow-up's context, the authorized search, then the answer —
//! written by the model (streamed, citations checked label by label) or extracted —
//! stored with its conversation and audited. Handlers call `ask`, which yields
//! [`AskEvent`]s: the same events feed the JSON answer and the SSE stream, so both
//! carry the same verified answer.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use common::text::content_terms;
use common::wire::{Answer, AskRequest, Citation, EmbedRequest, EmbedResponse, Principal, SearchHit, SearchQuery, SearchResults, Turn};
use common::{ApiError, ErrorKind, ServiceContext, ServiceName};

use crate::answer::{self, Grounding};
use crate::context::{self, CitationFilter};
use crate::llm::{Llm, LlmError, Piece};
use crate::store::{ConversationStore, Reply};

/// What a streamed ask yields, in order: deltas, then the answer or an error.
pub(crate) enum AskEvent {
    Delta(String),
    Done(Box<Answer>),
    Failed(ApiError),
}

pub(crate) struct Rag {
    pub(crate) ctx: ServiceContext,
    pub(crate) store: std::sync::Arc<dyn ConversationStore>,
    pub(crate) llm: Option<Llm>,
}

/// Everything decided before the answer is written.
struct Prepared {
    principal: Principal,
    conversation_id: String,
    question: String,
    /// The question with a follow-up's context (what retrieval and extraction match).
    standalone: String,
    history: Vec<Turn>,
    hits: Vec<SearchHit>,
}

/// Sentences compared with the question in one embedding call: the first 8 hits hold
/// ~80 on the evaluation set; more (lists of short lines) and the words alone decide,
/// so an ask never waits on a long embedding.
const MAX_EMBEDDED_SENTENCES: usize = 256;

/// Words that point back at an earlier turn.
const BACK_REFERENCES: [&str; 14] = ["it", "its", "this", "that", "these", "those", "they", "them", "their", "there", "one", "ones", "he", "she"];

/// Whether `question` leans on what was said before ("And how do I change it?").
pub(crate) fn is_follow_up(question: &str) -> bool {
    let lower = question.trim().to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    words.iter().any(|w| BACK_REFERENCES.contains(w))
        || ["and ", "what about", "how about", "also", "then "].iter().any(|start| lower.starts_with(start))
        || content_terms(question).len() < 2
}

/// A follow-up with the content words of the last question that stood alone carried in
/// (used when no model is configured to rewrite it).
pub(crate) fn carried(history: &[Turn], question: &str) -> String {
    if !is_follow_up(question) {
        return question.to_string();
    }
    let Some(previous) = history.iter().rev().find(|t| t.role == "user") else { return question.to_string() };
    let mut carried: Vec<String> = Vec::new();
    for word in previous.content.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')).map(|w| w.trim_matches('.')) {
        if !word.is_empty() && !common::text::is_stop_word(word) && !carried.iter().any(|c| c.eq_ignore_ascii_case(word)) {
            carried.push(word.to_string());
        }
    }
    format!("{question} ({})", carried.join(" "))
}

impl Rag {
    fn grounding(&self) -> Grounding {
        let config = &self.ctx.config.rag;
        Grounding { min_similarity: config.min_similarity, min_coverage: config.min_coverage }
    }

    /// Answers `request` as a stream of events. The work runs in its own task and stops
    /// (dropping the model's connection) as soon as the receiver is gone.
    pub(crate) async fn ask(self: &Arc<Self>, principal: Principal, request: AskRequest) -> Result<impl Stream<Item = AskEvent> + Send + 'static, ApiError> {
        let prepared = self.prepare(principal, request).await?;
        let (tx, rx) = mpsc::channel::<AskEvent>(64);
        let rag = self.clone();
        // The answer's work (search, the model) stays in the ask's trace and log span.
        let work = async move {
            let closed = tx.clone();
            tokio::select! {
                () = rag.answer(prepared, tx) => {}
                () = closed.closed() => tracing::info!("the asker went away; the answer was stopped"),
            }
        };
        tokio::spawn(common::trace::in_current(tracing::Instrument::in_current_span(work)));
        Ok(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) }))
    }

    /// Answers `request` whole (the stream drained).
    pub(crate) async fn ask_whole(self: &Arc<Self>, principal: Principal, request: AskRequest) -> Result<Answer, ApiError> {
        let mut events = Box::pin(self.ask(principal, request).await?);
        while let Some(event) = events.next().await {
            match event {
                AskEvent::Delta(_) => {}
                AskEvent::Done(answer) => return Ok(*answer),
                AskEvent::Failed(error) => return Err(error),
            }
        }
        Err(ApiError::internal(anyhow::anyhow!("the answer ended without a result")))
    }

    async fn prepare(&self, principal: Principal, request: AskRequest) -> Result<Prepared, ApiError> {
        let question = request.question.trim().to_string();
        if question.is_empty() || question.chars().count() > 4000 {
            return Err(ApiError::bad_request("rag.invalid_question", "questions are 1 to 4000 characters"));
        }
        if request.history.len() > 100 || request.history.iter().any(|t| t.content.chars().count() > 100_000) {
            return Err(ApiError::bad_request("rag.invalid_history", "a history is at most 100 turns of at most 100,000 characters"));
        }
        let mut history = request.history.clone();
        let conversation_id = match &request.conversation_id {
            Some(id) => {
                if !self.store.owns(&principal.sub, id).await? {
                    return Err(ApiError::not_found("rag.conversation_not_found", "no such conversation"));
                }
                history.extend(self.store.recent_turns(id, 6).await?);
                id.clone()
            }
            None => self.store.create(&principal.sub, &question).await?,
        };
        let standalone = self.standalone(&history, &question).await;
        let config = &self.ctx.config.rag;
        // The one authorized retrieval path: search asks authz, filters, re-checks.
        let query = SearchQuery { query: standalone.clone(), k: config.top_k, collections: request.collections.clone(), mode: None, full_text: true, rerank: None, per_page: Some(crate::HITS_PER_PAGE) };
        let results: SearchResults = self.ctx.peers.post_json(ServiceName::Search, "/v1/search", Some(&principal), &query).await?;
        Ok(Prepared { principal, conversation_id, question, standalone, history, hits: results.hits })
    }

    /// The question as retrieval should see it: rewritten by the model when one is
    /// configured and the question leans on earlier turns, else with carried words.
    async fn standalone(&self, history: &[Turn], question: &str) -> String {
        if history.is_empty() || !is_follow_up(question) {
            return question.to_string();
        }
        if let Some(llm) = &self.llm {
            let messages = context::rewrite_prompt(history, question);
            match llm.stream(&messages, 120).await {
                Ok(mut pieces) => {
                    let mut text = String::new();
                    while let Some(piece) = pieces.next().await {
                        match piece {
                            Ok(Piece::Text(t)) => text.push_str(&t),
                            Ok(Piece::Usage(_)) => {}
                            Err(error) => {
                                tracing::warn!(error = %error, "rewriting a follow-up failed; carrying its words instead");
                                text.clear();
                                break;
                            }
                        }
                    }
                    let text = text.trim().trim_matches('"').trim();
                    if !text.is_empty() && text.chars().count() <= 1000 {
                        return text.to_string();
                    }
                }
                Err(error) => tracing::warn!(error = %error, "rewriting a follow-up failed; carrying its words instead"),
            }
        }
        carried(history, question)
    }

    async fn answer(&self, prepared: Prepared, tx: mpsc::Sender<AskEvent>) {
        let outcome = match &self.llm {
            Some(llm) => self.written(llm, &prepared, &tx).await,
            None => {
                // The quotes arrive whole: one delta, so every streaming client shows them.
                let answer = self.extracted(&prepared).await;
                let _ = tx.send(AskEvent::Delta(answer.answer.clone())).await;
                Ok(answer)
            }
        };
        let outcome = match outcome {
            // Only before anything of the model's answer was shown.
            Err((error, false)) if self.ctx.config.llm.fallback_extractive && error.kind == ErrorKind::Unavailable => {
                tracing::warn!(detail = %error.detail, "the model failed; answering extractively");
                let mut answer = self.extracted(&prepared).await;
                answer.answer = format!("(The language model is unavailable, so this answer quotes the documents.)\n\n{}", answer.answer);
                let _ = tx.send(AskEvent::Delta(answer.answer.clone())).await;
                Ok(answer)
            }
            other => other.map_err(|(error, _)| error),
        };
        let event = match outcome {
            Ok(answer) => match self.finish(&prepared, answer).await {
                Ok(answer) => AskEvent::Done(Box::new(answer)),
                Err(error) => AskEvent::Failed(error),
            },
            Err(error) => AskEvent::Failed(error),
        };
        let _ = tx.send(event).await;
    }

    /// Each candidate sentence's cosine to the question, from the search service's
    /// embedder; `None` (the words alone decide) when embeddings are off, the sentences
    /// are too many for one call, or the embedder fails.
    async fn sentence_similarity(&self, question: &str, hits: &[SearchHit]) -> Option<Vec<f32>> {
        if self.ctx.config.embedding_provider() == "none" || hits.is_empty() {
            return None;
        }
        let sentences = answer::candidate_texts(hits);
        if sentences.is_empty() || sentences.len() > MAX_EMBEDDED_SENTENCES {
            return None;
        }
        let mut texts = Vec::with_capacity(sentences.len() + 1);
        texts.push(question.to_string());
        texts.extend(sentences);
        let started = std::time::Instant::now();
        let embedded: Result<EmbedResponse, ApiError> = self.ctx.peers.post_json(ServiceName::Search, "/v1/embed", None, &EmbedRequest { texts }).await;
        let vectors: Option<Vec<Vec<f32>>> = match embedded {
            Ok(answer) => answer.vectors.iter().map(|v| common::wire::decode_vector(v)).collect(),
            Err(error) => {
                tracing::warn!(detail = %error.detail, "the sentences could not be embedded; choosing quotes by their words");
                None
            }
        };
        metrics::histogram!("echo_rag_sentence_embedding_seconds").record(started.elapsed().as_secs_f64());
        let (question, sentences) = vectors?.split_first().map(|(q, s)| (q.clone(), s.to_vec()))?;
        Some(sentences.iter().map(|s| s.iter().zip(&question).map(|(a, b)| a * b).sum()).collect())
    }

    async fn extracted(&self, prepared: &Prepared) -> Answer {
        let similarity = self.sentence_similarity(&prepared.standalone, &prepared.hits).await;
        let extracted = answer::extractive(&prepared.standalone, &prepared.hits, self.ctx.config.rag.max_citations, self.grounding(), similarity.as_deref());
        Answer {
            answer: extracted.text,
            citations: extracted.citations,
            conversation_id: prepared.conversation_id.clone(),
            mode: "extractive".into(),
            not_found: extracted.not_found,
            unsupported: vec![],
            usage: None,
        }
    }

    /// The model's answer, streamed through the citation filter; a failure says whether
    /// part of the answer was already sent.
    async fn written(&self, llm: &Llm, prepared: &Prepared, tx: &mpsc::Sender<AskEvent>) -> Result<Answer, (ApiError, bool)> {
        let config = &self.ctx.config.llm;
        // Invent nothing: when retrieval found nothing related, the model is not asked.
        let probe = answer::extractive(&prepared.standalone, &prepared.hits, 1, self.grounding(), None);
        if probe.not_found {
            let _ = tx.send(AskEvent::Delta(probe.text.clone())).await;
            return Ok(Answer { answer: probe.text, citations: vec![], conversation_id: prepared.conversation_id.clone(), mode: "llm".into(), not_found: true, unsupported: vec![], usage: None });
        }
        let passages = context::pack(&prepared.hits, config.context_tokens.saturating_mul(4));
        let messages = context::prompt(&passages, &prepared.history, &prepared.question);
        let mut pieces = llm.stream(&messages, config.max_answer_tokens).await.map_err(|e| (model_error(e), false))?;
        let mut filter = CitationFilter::new(passages.len());
        let mut text = String::new();
        let mut usage = None;
        while let Some(piece) = pieces.next().await {
            match piece.map_err(|e| (model_error(e), !text.is_empty()))? {
                Piece::Text(piece) => {
                    let shown = filter.push(&piece);
                    if !shown.is_empty() {
                        text.push_str(&shown);
                        if tx.send(AskEvent::Delta(shown)).await.is_err() {
                            return Err((ApiError::unavailable("rag.cancelled", "the asker went away"), true));
                        }
                    }
                }
                Piece::Usage(u) => usage = Some(u),
            }
        }
        let rest = filter.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = tx.send(AskEvent::Delta(rest)).await;
        }
        if filter.dropped() > 0 {
            metrics::counter!("echo_rag_citations_dropped_total").increment(filter.dropped() as u64);
            tracing::warn!(dropped = filter.dropped(), "the model cited passages it was not given; those labels were removed");
        }
        let mut text = context::tidy(&text);
        let mut cited = filter.cited().clone();
        if cited.is_empty() {
            // The model cited nothing: the passages that hold each sentence's words are
            // named instead (the stored answer, shown once the stream ends, carries them).
            (text, cited) = context::attribute(&text, &passages, &prepared.question);
            metrics::counter!("echo_rag_answers_attributed_total").increment(u64::from(!cited.is_empty()));
        }
        let citations: Vec<Citation> = passages.iter().filter(|p| cited.contains(&p.n)).map(context::Passage::citation).collect();
        let unsupported = if config.flag_unsupported { context::unsupported(&text, &passages, &prepared.question) } else { vec![] };
        Ok(Answer { answer: text, citations, conversation_id: prepared.conversation_id.clone(), mode: "llm".into(), not_found: false, unsupported, usage })
    }

    /// Checks the answer's citations against what was retrieved, stores the exchange and
    /// records the audit event.
    async fn finish(&self, prepared: &Prepared, answer: Answer) -> Result<Answer, ApiError> {
        // Defence in depth: a citation names a retrieved (so permitted) chunk, or the
        // answer is not given at all.
        if let Some(stray) = answer.citations.iter().find(|c| !prepared.hits.iter().any(|h| h.chunk_id == c.chunk_id && h.document_id == c.document_id)) {
            return Err(ApiError::internal(anyhow::anyhow!("citation {} names chunk {} that was not retrieved", stray.n, stray.chunk_id)));
        }
        let reply = Reply { content: &answer.answer, citations: &answer.citations, mode: &answer.mode, not_found: answer.not_found };
        self.store.append(&prepared.conversation_id, &prepared.question, reply).await?;
        let config = &self.ctx.config.rag;
        let recorded_question = if config.audit_question == "plain" { prepared.question.clone() } else { common::rand::sha256_hex(prepared.question.as_bytes()) };
        self.ctx
            .audit(
                &prepared.principal.sub,
                "rag.asked",
                &format!("conversation:{}", prepared.conversation_id),
                "success",
                serde_json::json!({
                    "question": recorded_question,
                    "question_form": config.audit_question,
                    "mode": answer.mode,
                    "not_found": answer.not_found,
                    "cited_chunks": answer.citations.iter().map(|c| c.chunk_id.clone()).collect::<Vec<_>>(),
                }),
            )
            .await;
        let outcome = if answer.not_found { "not_found" } else { "answered" };
        metrics::counter!("echo_rag_questions_total", "mode" => answer.mode.clone(), "outcome" => outcome).increment(1);
        Ok(answer)
    }
}

/// A model failure as the asker sees it: the service is unavailable, in plain words.
fn model_error(error: LlmError) -> ApiError {
    let code = match error {
        LlmError::Timeout(_) => "llm.timeout",
        LlmError::CircuitOpen(_) => "llm.circuit_open",
        _ => "llm.unavailable",
    };
    ApiError::unavailable(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> Turn {
        Turn { role: role.into(), content: content.into() }
    }

    #[test]
    fn a_follow_up_carries_the_last_question_and_a_new_topic_does_not() {
        let history = [turn("user", "Which port does the PostgreSQL server listen on?"), turn("assistant", "It listens on 5432 [1].")];
        assert_eq!(carried(&history, "And how do I change it?"), "And how do I change it? (port PostgreSQL server listen)");
        assert_eq!(carried(&history, "How are nightly backups scheduled with cron?"), "How are nightly backups scheduled with cron?");
        assert_eq!(carried(&[], "And how do I change it?"), "And how do I change it?");
    }
}
