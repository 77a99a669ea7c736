//! The walking skeleton end to end: sign in through OIDC, upload, wait for the job,
//! search, ask with a citation, and try to reach the document from another org.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::helpers::{TestSystem, eventually, hidden_value, password_of};

const HANDBOOK: &str = "# Reactor handbook\n\n## Launch procedure\n\nBefore launch, the operator reads the checklist aloud. The launch code is tangerine-42 and it is rotated every Monday.\n\n## Cooling\n\nThe cooling pumps are inspected every spring by the maintenance crew.\n";

async fn upload(ts: &TestSystem, token: &str, filename: &str, mime: &str, bytes: Vec<u8>, collection: Option<&str>) -> reqwest::Response {
    let mut form = Form::new();
    if let Some(collection) = collection {
        form = form.text("collection", collection.to_string());
    }
    let part = Part::bytes(bytes).file_name(filename.to_string()).mime_str(mime).expect("mime");
    form = form.part("file", part);
    ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(token).multipart(form).send().await.expect("upload")
}

async fn get(ts: &TestSystem, token: &str, path: &str) -> reqwest::Response {
    ts.http.get(format!("{}{}", ts.gateway(), path)).bearer_auth(token).send().await.expect("get")
}

async fn post(ts: &TestSystem, token: &str, path: &str, body: Value) -> reqwest::Response {
    ts.http.post(format!("{}{}", ts.gateway(), path)).bearer_auth(token).json(&body).send().await.expect("post")
}

async fn wait_for_job(ts: &TestSystem, token: &str, job_id: &str) -> Value {
    eventually("the ingest job to finish", Duration::from_secs(60), || async {
        let job: Value = get(ts, token, &format!("/api/v1/jobs/{job_id}")).await.json().await.ok()?;
        matches!(job["status"].as_str(), Some("done" | "failed")).then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_uploads_asks_gets_a_cited_answer_and_other_orgs_see_nothing() {
    journey(TestSystem::start().await).await.system.stop().await;
}

/// The same journey on the scale path's engines: the data of every service in
/// PostgreSQL (`database.url`: identity, authz, gateway sessions, ingest, rag, logs,
/// audit, profile, chat, storage's ledger), the chunks in PostgreSQL with pgvector
/// (`search.url`), the bus on NATS JetStream (`queue.url`) and
/// the uploaded files in an S3 bucket (a real S3-protocol server): the answers are the
/// same, and the data is where the configuration says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journey_holds_on_postgresql_nats_and_s3() {
    let Some(s3) = echod::testing::ScratchS3::start().await else { return };
    let Some(postgres) = echod::testing::ScratchServer::postgres().await else { return };
    let Some(nats) = echod::testing::ScratchServer::nats().await else { return };
    let Some(pgvector) = echod::testing::ScratchPgvector::start().await else { return };
    let (storage, url, bus, index) = (s3.config(), postgres.url.clone(), nats.url.clone(), pgvector.url.clone());
    let ts = TestSystem::start_with(|config| {
        config.database.url = common::config::Secret(url);
        config.search.url = common::config::Secret(index);
        config.queue.url = Some(common::config::Secret(bus));
        config.storage = common::config::StorageConfig { quota_bytes_per_user: config.storage.quota_bytes_per_user, max_blob_bytes: config.storage.max_blob_bytes, ..storage };
    })
    .await;
    let data_dir = ts.system.config.data_dir.clone();
    let ts = journey(ts).await;
    // The journey deleted what it uploaded; one more file stays.
    let ann = ts.sign_in("ann", &password_of("ann")).await;
    let kept = upload(&ts, &ann.access_token, "kept.md", "text/markdown", b"# Kept\n\nThis file stays in the bucket.\n".to_vec(), None).await;
    assert_eq!(kept.status(), StatusCode::ACCEPTED);
    let kept: Value = kept.json().await.unwrap();
    assert_eq!(wait_for_job(&ts, &ann.access_token, kept["job_id"].as_str().unwrap()).await["status"], "done");
    ts.system.stop().await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&postgres.url).await.unwrap();
    let mut count = async |table: &str| -> i64 { sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"))).fetch_one(&mut conn).await.unwrap() };
    // (Log records are left out: in a test process they ship to the first system started.)
    for table in ["audit.records", "rag.messages", "gateway.sessions", "profile.profiles", "authz.collections", "ingest.documents", "identity.users", "identity.signing_keys"] {
        assert!(count(table).await > 0, "{table} is empty");
    }
    let blobs = count("storage.blobs").await;
    assert_eq!(blobs, 1);
    assert_eq!(s3.keys().await.len() as i64, blobs, "the bucket holds exactly the blobs the ledger lists");
    for file in ["audit.db", "rag.db", "gateway.db", "logs.db", "profile.db", "storage.db", "chat.db", "authz.db", "ingest.db", "identity.db"] {
        assert!(!data_dir.join(file).exists(), "{file} was created although database.url is set");
    }
    assert!(!data_dir.join("blobs").exists(), "files went to the bucket, not to the data dir");
    assert!(!data_dir.join("index").exists(), "chunks went to PostgreSQL, not to the data dir");
    drop(conn);
    // The kept file's chunks are in the search schema there.
    use sqlx::Connection as _;
    let mut index = sqlx::PgConnection::connect(&pgvector.url).await.unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM search.chunks c JOIN search.meta m ON c.generation = m.live").fetch_one(&mut index).await.unwrap();
    assert!(chunks > 0, "no chunk in search.chunks");
    postgres.cleanup().await;
    nats.cleanup().await;
}

/// The journey of the first test, on the system given; the system is left running.
async fn journey(ts: TestSystem) -> TestSystem {
    ts.add_user("ann", "acme", "member").await;
    ts.add_user("cat", "acme", "member").await;
    ts.add_user("bob", "globex", "owner").await;
    let ann = ts.sign_in("ann", &password_of("ann")).await;

    // The ID token verifies against the JWKS with the client as audience and our nonce.
    #[derive(serde::Deserialize)]
    struct IdClaims {
        nonce: String,
        preferred_username: String,
        org: String,
    }
    let verifier = common::auth::TokenVerifier::new(&ts.issuer(), &ts.issuer(), reqwest::Client::new());
    let id: IdClaims = verifier.verify_as(&ann.id_token, crate::helpers::CLIENT_ID).await.expect("id token verifies");
    assert_eq!((id.nonce.as_str(), id.preferred_username.as_str(), id.org.as_str()), (ann.nonce.as_str(), "ann", "acme"));

    let me: Value = get(&ts, &ann.access_token, "/api/v1/me").await.json().await.unwrap();
    assert_eq!(me["username"], "ann");
    let collections: Value = get(&ts, &ann.access_token, "/api/v1/collections").await.json().await.unwrap();
    let personal = collections.as_array().unwrap().iter().find(|c| c["personal"] == true).expect("a personal collection")["id"].as_str().unwrap().to_string();

    let created = upload(&ts, &ann.access_token, "handbook.md", "text/markdown", HANDBOOK.as_bytes().to_vec(), None).await;
    assert_eq!(created.status(), StatusCode::ACCEPTED);
    let created: Value = created.json().await.unwrap();
    let document_id = created["id"].as_str().unwrap().to_string();
    let job = wait_for_job(&ts, &ann.access_token, created["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["document_id"], document_id.as_str());

    let document: Value = get(&ts, &ann.access_token, &format!("/api/v1/documents/{document_id}")).await.json().await.unwrap();
    assert_eq!(document["collection"], personal.as_str());
    assert_eq!(document["filename"], "handbook.md");
    assert_eq!(document["status"], "done");
    assert_eq!(document["size"], HANDBOOK.len());

    let content = get(&ts, &ann.access_token, &format!("/api/v1/documents/{document_id}/content")).await;
    assert_eq!(content.status(), StatusCode::OK);
    assert_eq!(content.text().await.unwrap(), HANDBOOK);
    let range = ts.http.get(format!("{}/api/v1/documents/{document_id}/content", ts.gateway())).bearer_auth(&ann.access_token).header("range", "bytes=2-9").send().await.unwrap();
    assert_eq!(range.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.text().await.unwrap(), &HANDBOOK[2..10]);

    let hits: Value = post(&ts, &ann.access_token, "/api/v1/search", json!({"query": "launch code", "k": 5})).await.json().await.unwrap();
    let first = &hits["hits"][0];
    assert_eq!(first["document_id"], document_id.as_str(), "{hits}");
    // Compact hits: `text` is the passage that matched (plain), `snippet` the same marked.
    let text = first["text"].as_str().unwrap();
    assert!(text.contains("tangerine-42") && !text.contains("<mark>"), "hits carry the matching passage as text: {first}");
    let snippet = first["snippet"].as_str().unwrap();
    assert!(snippet.contains("<mark>launch</mark>") && snippet.contains("tangerine-42"), "{snippet}");
    assert_eq!(first["section"], "Reactor handbook > Launch procedure");
    let full: Value = post(&ts, &ann.access_token, "/api/v1/search", json!({"query": "launch code", "k": 5, "full_text": true, "mode": "bm25"})).await.json().await.unwrap();
    assert!(full["hits"][0]["text"].as_str().unwrap().contains("tangerine-42"), "{full}");
    let unknown = post(&ts, &ann.access_token, "/api/v1/search", json!({"query": "launch code", "mode": "telepathy"})).await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST, "an unknown mode is refused, not ignored");

    let answer: Value = post(&ts, &ann.access_token, "/api/v1/ask", json!({"question": "What is the launch code?"})).await.json().await.unwrap();
    assert_eq!(answer["mode"], "extractive");
    assert!(answer["answer"].as_str().unwrap().contains("tangerine-42"), "{answer}");
    let citation = &answer["citations"][0];
    assert_eq!(citation["document_id"], document_id.as_str());
    assert!(citation["text"].as_str().unwrap().contains("tangerine-42"));
    assert!(citation["chunk_id"].as_str().unwrap().starts_with(&document_id));
    assert!(answer["conversation_id"].is_string());

    // Streaming: the same answer as SSE, ending in an event that carries the citations.
    let stream = ts
        .http
        .post(format!("{}/api/v1/ask", ts.gateway()))
        .bearer_auth(&ann.access_token)
        .header("accept", "text/event-stream")
        .json(&json!({"question": "What is the launch code?"}))
        .send()
        .await
        .unwrap();
    assert!(stream.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = stream.text().await.unwrap();
    let last_event = body.split("\n\n").filter(|e| !e.trim().is_empty()).last().unwrap();
    assert!(last_event.starts_with("event: citations"), "{last_event}");
    assert!(last_event.contains(&document_id));

    // Another org: the document does not exist for them, anywhere.
    let bob = ts.sign_in("bob", &password_of("bob")).await;
    let cat = ts.sign_in("cat", &password_of("cat")).await;
    for outsider in [&bob.access_token, &cat.access_token] {
        for path in [
            format!("/api/v1/documents/{document_id}"),
            format!("/api/v1/documents/{document_id}/content"),
            format!("/api/v1/jobs/{}", created["job_id"].as_str().unwrap()),
        ] {
            let response = get(&ts, outsider, &path).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(response.headers()["content-type"], "application/problem+json");
        }
        let listed: Value = get(&ts, outsider, "/api/v1/documents").await.json().await.unwrap();
        assert!(!listed.to_string().contains(&document_id));
        let hits: Value = post(&ts, outsider, "/api/v1/search", json!({"query": "launch code tangerine", "k": 10})).await.json().await.unwrap();
        assert_eq!(hits["hits"].as_array().unwrap().len(), 0, "{hits}");
        let hits: Value = post(&ts, outsider, "/api/v1/search", json!({"query": "launch code", "k": 10, "collections": [personal.clone()]})).await.json().await.unwrap();
        assert_eq!(hits["hits"].as_array().unwrap().len(), 0, "naming someone else's collection finds nothing");
        // Uploading into it: the same answer as for a collection that does not exist.
        for collection in [personal.as_str(), "00000000-0000-0000-0000-000000000000", "not an id"] {
            let refused = upload(&ts, outsider, "x.txt", "text/plain", b"intrusion".to_vec(), Some(collection)).await;
            assert_eq!(refused.status(), StatusCode::NOT_FOUND, "{collection}");
            assert_eq!(refused.json::<Value>().await.unwrap()["code"], "authz.collection_not_found", "{collection}");
        }
        let answer: Value = post(&ts, outsider, "/api/v1/ask", json!({"question": "What is the launch code?"})).await.json().await.unwrap();
        assert!(!answer.to_string().contains("tangerine"), "{answer}");
        assert_eq!(answer["citations"].as_array().unwrap().len(), 0);
        let delete = ts.http.delete(format!("{}/api/v1/documents/{document_id}", ts.gateway())).bearer_auth(outsider).send().await.unwrap();
        assert_eq!(delete.status(), StatusCode::NOT_FOUND);
    }

    // Sharing with a colleague lets them read; unsharing takes effect on the next request.
    let cat_me: Value = get(&ts, &cat.access_token, "/api/v1/me").await.json().await.unwrap();
    let bob_me: Value = get(&ts, &bob.access_token, "/api/v1/me").await.json().await.unwrap();
    let share = |members: Value| {
        let ts = &ts;
        let token = ann.access_token.clone();
        let personal = personal.clone();
        async move { ts.http.put(format!("{}/api/v1/collections/{personal}/members", ts.gateway())).bearer_auth(token).json(&json!({"members": members})).send().await.unwrap() }
    };
    let cross_org = share(json!([{"user": bob_me["id"], "role": "viewer"}])).await;
    assert_eq!(cross_org.status(), StatusCode::BAD_REQUEST, "users of another org cannot be named in a share");
    assert_eq!(share(json!([{"user": cat_me["id"], "role": "viewer"}])).await.status(), StatusCode::OK);
    assert_eq!(get(&ts, &cat.access_token, &format!("/api/v1/documents/{document_id}")).await.status(), StatusCode::OK);
    let answer: Value = post(&ts, &cat.access_token, "/api/v1/ask", json!({"question": "What is the launch code?"})).await.json().await.unwrap();
    assert!(answer["answer"].as_str().unwrap().contains("tangerine-42"));
    assert_eq!(get(&ts, &cat.access_token, &format!("/api/v1/documents/{document_id}/content")).await.status(), StatusCode::OK);
    // "Answers only": usable in answers, not downloadable.
    assert_eq!(share(json!([{"user": cat_me["id"], "role": "answers"}])).await.status(), StatusCode::OK);
    assert_eq!(get(&ts, &cat.access_token, &format!("/api/v1/documents/{document_id}")).await.status(), StatusCode::OK);
    let refused = get(&ts, &cat.access_token, &format!("/api/v1/documents/{document_id}/content")).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], "document.forbidden");
    let answer: Value = post(&ts, &cat.access_token, "/api/v1/ask", json!({"question": "What is the launch code?"})).await.json().await.unwrap();
    assert!(answer["answer"].as_str().unwrap().contains("tangerine-42"));
    assert_eq!(share(json!([])).await.status(), StatusCode::OK);
    assert_eq!(get(&ts, &cat.access_token, &format!("/api/v1/documents/{document_id}")).await.status(), StatusCode::NOT_FOUND);

    // Deleting removes the document from search.
    let delete = ts.http.delete(format!("{}/api/v1/documents/{document_id}", ts.gateway())).bearer_auth(&ann.access_token).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    assert_eq!(get(&ts, &ann.access_token, &format!("/api/v1/documents/{document_id}")).await.status(), StatusCode::NOT_FOUND);
    eventually("the deleted document to leave the index", Duration::from_secs(20), || async {
        let hits: Value = post(&ts, &ann.access_token, "/api/v1/search", json!({"query": "launch code", "k": 5})).await.json().await.ok()?;
        hits["hits"].as_array()?.is_empty().then_some(())
    })
    .await;

    // Audit: uploads, asks, deletes and logins reached the chain, and it verifies.
    ts.add_user("root", "acme", "admin").await;
    let admin = ts.sign_in("root", &password_of("root")).await;
    let actions: Vec<String> = eventually("audit records", Duration::from_secs(20), || async {
        let records: Value = get(&ts, &admin.access_token, "/api/v1/audit?limit=500").await.json().await.ok()?;
        let actions: Vec<String> = records["records"].as_array()?.iter().filter_map(|r| r["action"].as_str().map(str::to_string)).collect();
        let wanted = ["document.uploaded", "rag.asked", "document.deleted", "identity.login_succeeded", "identity.token_issued", "identity.user_created"];
        wanted.iter().all(|w| actions.iter().any(|a| a == w)).then_some(actions)
    })
    .await;
    assert!(actions.iter().any(|a| a == "collection.shared"));
    let verified: Value = get(&ts, &admin.access_token, "/api/v1/audit/verify").await.json().await.unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    // Exported (as `echod audit export` does) and verified offline from the file alone;
    // one record changed in the file is caught and named.
    let mut exported = Vec::new();
    let written = audit::export(&ts.config, &mut exported).await.unwrap();
    assert!(written >= 6);
    let offline = audit::verify_file(&exported[..], None).unwrap();
    assert!(offline.chain.ok && offline.signed_head, "{offline:?}");
    assert_eq!(offline.chain.n_records as usize, written);
    let text = String::from_utf8(exported).unwrap();
    let victim = text.lines().find(|l| l.contains("\"action\":\"document.uploaded\"")).unwrap();
    let seq: Value = serde_json::from_str(victim).unwrap();
    let tampered = text.replacen(victim, &victim.replace("document.uploaded", "document.viewed"), 1);
    let caught = audit::verify_file(tampered.as_bytes(), None).unwrap();
    assert!(!caught.chain.ok);
    assert_eq!(caught.chain.first_bad, seq["seq"].as_i64(), "{:?}", caught.chain.reason);
    // The audit page: filtered by action, and the chain verified from the page.
    let (session, _) = ts.browser_session("root").await;
    let page = ts.http.get(format!("{}/admin/audit?action=document.uploaded&verify=1", ts.gateway())).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("data-chain=\"intact\""), "the page verifies the chain");
    assert!(html.contains(">document.uploaded</a>") && !html.contains(">rag.asked</a>"), "the action filter holds");
    assert!(html.contains(">ann</a>"), "the uploader is named, not only by id");
    let forbidden = get(&ts, &ann.access_token, "/api/v1/audit").await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN, "members may not read the audit log");
    ts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_and_bad_tokens_get_clear_errors() {
    let ts = TestSystem::start().await;
    ts.add_user("dan", "acme", "member").await;
    let dan = ts.sign_in("dan", &password_of("dan")).await;

    let empty = upload(&ts, &dan.access_token, "empty.txt", "text/plain", vec![], None).await;
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
    let problem: Value = empty.json().await.unwrap();
    assert_eq!(problem["code"], "document.empty");

    let binary = upload(&ts, &dan.access_token, "tool.exe", "application/x-msdownload", b"MZ\x90\x00\x03\x00\x00\x00".to_vec(), None).await;
    assert_eq!(binary.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(binary.json::<Value>().await.unwrap()["code"], "document.unsupported_type");

    let corrupt = upload(&ts, &dan.access_token, "broken.pdf", "application/pdf", b"%PDF-1.7\n this is not really a pdf".to_vec(), None).await;
    assert_eq!(corrupt.status(), StatusCode::ACCEPTED);
    let created: Value = corrupt.json().await.unwrap();
    let job = wait_for_job(&ts, &dan.access_token, created["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error"].as_str().unwrap().contains("corrupt"), "{job}");

    let unknown_collection = upload(&ts, &dan.access_token, "a.txt", "text/plain", b"hello".to_vec(), Some("0190f1e6-3b7a-7c2e-9d8f-1a2b3c4d5e6f")).await;
    assert_eq!(unknown_collection.status(), StatusCode::NOT_FOUND);

    let duplicate_a = upload(&ts, &dan.access_token, "a.txt", "text/plain", b"same bytes".to_vec(), None).await;
    let duplicate_b = upload(&ts, &dan.access_token, "b.txt", "text/plain", b"same bytes".to_vec(), None).await;
    assert_eq!(duplicate_a.status(), StatusCode::ACCEPTED);
    assert_eq!(duplicate_b.status(), StatusCode::OK, "the same content in the same collection is detected");
    let (a, b): (Value, Value) = (duplicate_a.json().await.unwrap(), duplicate_b.json().await.unwrap());
    assert_eq!(a["id"], b["id"]);

    let oversized = post(&ts, &dan.access_token, "/api/v1/search", json!({"query": "x".repeat(300 * 1024)})).await;
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(oversized.json::<Value>().await.unwrap()["code"], "request.too_large");
    let malformed = ts.http.post(format!("{}/api/v1/search", ts.gateway())).bearer_auth(&dan.access_token).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(malformed.json::<Value>().await.unwrap()["code"], "request.invalid_json");

    let anonymous = ts.http.get(format!("{}/api/v1/documents", ts.gateway())).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    assert_eq!(anonymous.json::<Value>().await.unwrap()["code"], "auth.unauthenticated");

    // A tampered payload, `alg: none`, and an ID token used as an access token are refused.
    let parts: Vec<&str> = dan.access_token.split('.').collect();
    let mut payload: Value = serde_json::from_slice(&base64_decode(parts[1])).unwrap();
    payload["org"] = json!("globex");
    let tampered = format!("{}.{}.{}", parts[0], base64_encode(payload.to_string().as_bytes()), parts[2]);
    let none = format!("{}.{}.", base64_encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    for (token, what) in [(tampered, "tampered"), (none, "alg none"), (dan.id_token.clone(), "id token")] {
        let response = get(&ts, &token, "/api/v1/documents").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    }

    // A code is single-use.
    let replay = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[("grant_type", "authorization_code"), ("code", dan.code.as_str()), ("redirect_uri", crate::helpers::REDIRECT_URI), ("client_id", crate::helpers::CLIENT_ID), ("code_verifier", dan.verifier.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::BAD_REQUEST);
    assert_eq!(replay.json::<Value>().await.unwrap()["error"], "invalid_grant");
    // …and what the code was exchanged for is revoked (the code may have leaked).
    let leaked = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", dan.refresh_token.clone().unwrap().as_str()), ("client_id", crate::helpers::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(leaked.status(), StatusCode::BAD_REQUEST, "the refresh token issued from a replayed code is revoked");
    let userinfo = ts.http.get(format!("{}/userinfo", ts.issuer())).bearer_auth(&dan.access_token).send().await.unwrap();
    assert_eq!(userinfo.status(), StatusCode::UNAUTHORIZED, "so is the access token");

    // Refresh tokens rotate; presenting a spent one revokes the family.
    let dan = ts.sign_in("dan", &password_of("dan")).await;
    let refresh = dan.refresh_token.clone().expect("offline_access yields a refresh token");
    let refresh_with = |token: String| {
        let ts = &ts;
        async move {
            ts.http
                .post(format!("{}/token", ts.issuer()))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str()), ("client_id", crate::helpers::CLIENT_ID)])
                .send()
                .await
                .unwrap()
        }
    };
    let rotated: Value = refresh_with(refresh.clone()).await.json().await.unwrap();
    let next = rotated["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(next, refresh);
    assert_eq!(refresh_with(refresh).await.status(), StatusCode::BAD_REQUEST, "a spent refresh token is refused");
    assert_eq!(refresh_with(next).await.status(), StatusCode::BAD_REQUEST, "and its whole family is revoked");

    // Unregistered redirect URIs get an error page, never a redirect.
    let hostile = ts
        .http
        .get(format!("{}/authorize", ts.issuer()))
        .query(&[("response_type", "code"), ("client_id", crate::helpers::CLIENT_ID), ("redirect_uri", "https://evil.example/cb"), ("code_challenge", "x".repeat(43).as_str()), ("code_challenge_method", "S256")])
        .send()
        .await
        .unwrap();
    assert_eq!(hostile.status(), StatusCode::BAD_REQUEST);
    assert!(!hostile.headers().contains_key("location"));

    // Wrong password: the form again, with an error, and no code.
    let page = ts.http.get(format!("{}/authorize", ts.issuer())).query(&[("response_type", "code"), ("client_id", crate::helpers::CLIENT_ID), ("redirect_uri", crate::helpers::REDIRECT_URI), ("scope", "openid"), ("code_challenge", "y".repeat(43).as_str()), ("code_challenge_method", "S256")]).send().await.unwrap().text().await.unwrap();
    let form_token = hidden_value(&page, "form_token").unwrap();
    let wrong = ts
        .http
        .post(format!("{}/login", ts.issuer()))
        .form(&[("response_type", "code"), ("client_id", crate::helpers::CLIENT_ID), ("redirect_uri", crate::helpers::REDIRECT_URI), ("scope", "openid"), ("code_challenge", "y".repeat(43).as_str()), ("code_challenge_method", "S256"), ("username", "dan"), ("password", "wrong password"), ("form_token", form_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.text().await.unwrap().contains("Invalid username or password"));
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_signs_in_through_identity_and_writes_need_the_csrf_token() {
    let ts = TestSystem::start().await;
    ts.add_user("eve", "acme", "member").await;
    let start = ts.http.get(format!("{}/documents", ts.gateway())).send().await.unwrap();
    assert_eq!(start.status(), StatusCode::SEE_OTHER);
    let login = ts.http.get(format!("{}{}", ts.gateway(), start.headers()["location"].to_str().unwrap())).send().await.unwrap();
    let login_cookie = crate::helpers::cookie_named(&login, "echo_login").unwrap();
    let authorize = login.headers()["location"].to_str().unwrap().to_string();
    assert!(authorize.starts_with(&format!("{}/authorize?", ts.issuer())), "{authorize}");
    let page = ts.http.get(&authorize).send().await.unwrap();
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    let html = page.text().await.unwrap();
    let mut form: Vec<(String, String)> = ["response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "form_token"]
        .iter()
        .map(|name| (name.to_string(), hidden_value(&html, name).unwrap_or_else(|| panic!("hidden {name}"))))
        .collect();
    form.push(("username".into(), "eve".into()));
    form.push(("password".into(), password_of("eve")));
    let back = ts.http.post(format!("{}/login", ts.issuer())).form(&form).send().await.unwrap();
    assert_eq!(back.status(), StatusCode::SEE_OTHER);
    let callback = back.headers()["location"].to_str().unwrap().to_string();
    assert!(callback.starts_with(&format!("{}/auth/callback?", ts.gateway())));
    let landed = ts.http.get(&callback).header("cookie", &login_cookie).send().await.unwrap();
    assert_eq!(landed.status(), StatusCode::SEE_OTHER);
    let cookie = landed.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).find(|v| v.starts_with("echo_session=")).unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
    let session = cookie.split(';').next().unwrap().to_string();
    assert_eq!(landed.headers()["location"], "/documents");

    let documents = ts.http.get(format!("{}/documents", ts.gateway())).header("cookie", &session).send().await.unwrap();
    assert_eq!(documents.status(), StatusCode::OK);
    let html = documents.text().await.unwrap();
    assert!(html.contains("eve"));
    let csrf = {
        let marker = "name=\"csrf-token\" content=\"";
        let start = html.find(marker).unwrap() + marker.len();
        html[start..start + html[start..].find('"').unwrap()].to_string()
    };
    let me: Value = ts.http.get(format!("{}/api/v1/me", ts.gateway())).header("cookie", &session).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["username"], "eve");

    let without = ts.http.post(format!("{}/api/v1/collections", ts.gateway())).header("cookie", &session).json(&json!({"name": "Team"})).send().await.unwrap();
    assert_eq!(without.status(), StatusCode::FORBIDDEN);
    assert_eq!(without.json::<Value>().await.unwrap()["code"], "auth.csrf");
    let with = ts.http.post(format!("{}/api/v1/collections", ts.gateway())).header("cookie", &session).header("x-csrf-token", &csrf).json(&json!({"name": "Team"})).send().await.unwrap();
    assert_eq!(with.status(), StatusCode::CREATED);

    // The ask page answers with citations that link to their passages.
    let part = Part::bytes(HANDBOOK.as_bytes().to_vec()).file_name("handbook.md").mime_str("text/markdown").unwrap();
    let uploaded = ts
        .http
        .post(format!("{}/documents/upload", ts.gateway()))
        .header("cookie", &session)
        .multipart(Form::new().text("csrf", csrf.clone()).part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), StatusCode::SEE_OTHER);
    eventually("the page upload to be indexed", Duration::from_secs(60), || async {
        let page = ts.http.get(format!("{}/documents", ts.gateway())).header("cookie", &session).send().await.ok()?.text().await.ok()?;
        page.contains("class=\"status status-done\"").then_some(())
    })
    .await;
    // POST → redirect → GET: the answer has its own address, and Back never resubmits.
    let answer = ts.http.post(format!("{}/ask", ts.gateway())).header("cookie", &session).form(&[("csrf", csrf.as_str()), ("question", "What is the launch code?")]).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    let location = answer.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/ask/") && location.ends_with("#latest"), "{location}");
    let html = ts.http.get(format!("{}{}", ts.gateway(), location.trim_end_matches("#latest"))).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("href=\"#cite-1-1\""), "{html}");
    assert!(html.contains("<mark>") && html.contains("tangerine-42"), "the quoted words are highlighted in the passage");
    assert_eq!(html.matches("Quoted from your documents").count(), 1, "the mode is said once");
    let forged = ts.http.post(format!("{}/ask", ts.gateway())).header("cookie", &session).form(&[("csrf", "forged"), ("question", "x")]).send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(forged.text().await.unwrap().contains("<html"), "browsers get an HTML error page");
    ts.system.stop().await;
}

fn base64_decode(part: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_keeps_users_documents_and_the_index() {
    let ts = TestSystem::start().await;
    assert!(ts.system.admin_password.is_some(), "the first start creates the admin");
    ts.add_user("fay", "acme", "member").await;
    let fay = ts.sign_in("fay", &password_of("fay")).await;
    let created: Value = upload(&ts, &fay.access_token, "handbook.md", "text/markdown", HANDBOOK.as_bytes().to_vec(), None).await.json().await.unwrap();
    let document_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(wait_for_job(&ts, &fay.access_token, created["job_id"].as_str().unwrap()).await["status"], "done");

    let ts = ts.restart().await;
    assert!(ts.system.admin_password.is_none(), "the admin is created once");
    let fay = ts.sign_in("fay", &password_of("fay")).await;
    let document: Value = get(&ts, &fay.access_token, &format!("/api/v1/documents/{document_id}")).await.json().await.unwrap();
    assert_eq!(document["status"], "done");
    let hits: Value = post(&ts, &fay.access_token, "/api/v1/search", json!({"query": "launch code"})).await.json().await.unwrap();
    assert_eq!(hits["hits"][0]["document_id"], document_id.as_str());
    let content = get(&ts, &fay.access_token, &format!("/api/v1/documents/{document_id}/content")).await.text().await.unwrap();
    assert_eq!(content, HANDBOOK);
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_size_limit_are_refused_and_nothing_is_stored() {
    let ts = TestSystem::start_with(|config| config.gateway.max_upload_bytes = 4096).await;
    ts.add_user("gus", "acme", "member").await;
    let gus = ts.sign_in("gus", &password_of("gus")).await;
    let huge = upload(&ts, &gus.access_token, "huge.txt", "text/plain", vec![b'a'; 200_000], None).await;
    assert_eq!(huge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(huge.json::<Value>().await.unwrap()["code"], "document.too_large");
    let listed: Value = get(&ts, &gus.access_token, "/api/v1/documents").await.json().await.unwrap();
    assert_eq!(listed["total"], 0);
    let blobs = std::fs::read_dir(ts.config.data_dir.join("blobs")).unwrap().filter_map(Result::ok).filter(|e| e.file_name() != "tmp").count();
    assert_eq!(blobs, 0, "no blob was kept");
    let small = upload(&ts, &gus.access_token, "small.txt", "text/plain", vec![b'a'; 1000], None).await;
    assert_eq!(small.status(), StatusCode::ACCEPTED);
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_passwords_slow_the_account_down() {
    let ts = TestSystem::start().await;
    ts.add_user("hal", "acme", "member").await;
    let challenge = "z".repeat(43);
    let params = [
        ("response_type", "code"),
        ("client_id", crate::helpers::CLIENT_ID),
        ("redirect_uri", crate::helpers::REDIRECT_URI),
        ("scope", "openid"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let attempt = |password: String| {
        let ts = &ts;
        async move {
            let page = ts.http.get(format!("{}/authorize", ts.issuer())).query(&params).send().await.unwrap().text().await.unwrap();
            let form_token = hidden_value(&page, "form_token").unwrap();
            let mut form: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
            form.extend([("username", "hal".to_string()), ("password", password), ("form_token", form_token)]);
            ts.http.post(format!("{}/login", ts.issuer())).form(&form).send().await.unwrap()
        }
    };
    for _ in 0..5 {
        assert_eq!(attempt("wrong password".into()).await.status(), StatusCode::UNAUTHORIZED);
    }
    let throttled = attempt(password_of("hal")).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS, "even the right password waits after five failures");
    assert!(throttled.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(attempt(password_of("hal")).await.status(), StatusCode::SEE_OTHER, "after the delay the right password works");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_admins_manage_their_own_users_and_users_change_their_password() {
    let ts = TestSystem::start().await;
    ts.add_user("ada", "acme", "admin").await;
    ts.add_user("max", "acme", "member").await;
    ts.add_user("zed", "globex", "member").await;
    let ada = ts.sign_in("ada", &password_of("ada")).await;
    let max = ts.sign_in("max", &password_of("max")).await;
    let zed = ts.sign_in("zed", &password_of("zed")).await;

    let listed: Value = get(&ts, &ada.access_token, "/api/v1/admin/users").await.json().await.unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert!(names.contains(&"max") && !names.contains(&"zed"), "admins see their org only: {names:?}");
    assert_eq!(get(&ts, &max.access_token, "/api/v1/admin/users").await.status(), StatusCode::FORBIDDEN);

    let created = post(&ts, &ada.access_token, "/api/v1/admin/users", json!({"username": "new", "password": password_of("new"), "role": "member"})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["org"], "acme", "created in the admin's org, whatever was asked");
    let owner = post(&ts, &ada.access_token, "/api/v1/admin/users", json!({"username": "boss", "password": password_of("boss"), "role": "owner"})).await;
    assert_eq!(owner.status(), StatusCode::FORBIDDEN, "admins cannot mint owners");

    let zed_me: Value = get(&ts, &zed.access_token, "/api/v1/me").await.json().await.unwrap();
    let cross = post(&ts, &ada.access_token, &format!("/api/v1/admin/users/{}/disable", zed_me["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(cross.status(), StatusCode::NOT_FOUND, "users of another org are not found");

    let new_token = ts.sign_in("new", &password_of("new")).await;
    let disabled = post(&ts, &ada.access_token, &format!("/api/v1/admin/users/{}/disable", created["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(disabled.status(), StatusCode::OK);
    let refresh = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", new_token.refresh_token.unwrap().as_str()), ("client_id", crate::helpers::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), StatusCode::BAD_REQUEST, "a disabled user's refresh tokens are revoked");
    let userinfo = ts.http.get(format!("{}/userinfo", ts.issuer())).bearer_auth(&new_token.access_token).send().await.unwrap();
    assert_eq!(userinfo.status(), StatusCode::UNAUTHORIZED);
    eventually("the gateway to refuse the disabled user's unexpired access token", Duration::from_secs(10), || async {
        (get(&ts, &new_token.access_token, "/api/v1/me").await.status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;

    let wrong = post(&ts, &max.access_token, "/api/v1/me/password", json!({"current_password": "not it", "new_password": "a-brand-new-password"})).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let changed = post(&ts, &max.access_token, "/api/v1/me/password", json!({"current_password": password_of("max"), "new_password": "a-brand-new-password"})).await;
    assert_eq!(changed.status(), StatusCode::NO_CONTENT);
    ts.sign_in("max", "a-brand-new-password").await;
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_password_is_reset_once_through_the_mailed_link() {
    let ts = TestSystem::start().await;
    identity::add_user(&ts.config, "liv", &password_of("liv"), "acme", "member", Some("liv@example.org".into())).await.unwrap();
    let before = ts.sign_in("liv", &password_of("liv")).await;
    for username in ["liv", "nobody-at-all"] {
        let answer = ts.http.post(format!("{}/forgot", ts.issuer())).form(&[("username", username)]).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert!(answer.text().await.unwrap().contains("If that account exists"), "the same answer for known and unknown users");
    }
    let outbox = ts.config.data_dir.join("outbox");
    // Mail leaves in the background, so the answer's timing says nothing either.
    // Messages are `*.eml` (written under a hidden name first, then renamed).
    let mails = || -> Vec<std::fs::DirEntry> { std::fs::read_dir(&outbox).map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".eml")).collect()).unwrap_or_default() };
    let count = || mails().len();
    crate::helpers::eventually("the reset mail", std::time::Duration::from_secs(10), || async { (count() > 0).then_some(()) }).await;
    // Time for a second (wrong) mail to show up if one were sent.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mails = mails();
    assert_eq!(mails.len(), 1, "one mail, for the account that exists");
    let mail = std::fs::read_to_string(mails[0].path()).unwrap();
    assert!(mail.contains("To: liv@example.org"));
    let start = mail.find("token=").unwrap() + "token=".len();
    let token: String = mail[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();

    let reset = |token: String, password: &'static str| {
        let ts = &ts;
        async move { ts.http.post(format!("{}/reset", ts.issuer())).form(&[("token", token.as_str()), ("password", password)]).send().await.unwrap() }
    };
    assert_eq!(reset(token.clone(), "short").await.status(), StatusCode::BAD_REQUEST, "the password policy applies");
    assert_eq!(reset(token.clone(), "liv-new-password-2026").await.status(), StatusCode::OK);
    assert_eq!(reset(token, "liv-another-password").await.status(), StatusCode::BAD_REQUEST, "the link works once");
    ts.sign_in("liv", "liv-new-password-2026").await;
    let refresh = ts
        .http
        .post(format!("{}/token", ts.issuer()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", before.refresh_token.unwrap().as_str()), ("client_id", crate::helpers::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), StatusCode::BAD_REQUEST, "a reset ends the old refresh tokens");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_in_progress_is_cancelled_and_retried_by_whoever_may_delete_it() {
    let ts = TestSystem::start().await;
    ts.add_user("ana", "acme", "member").await;
    ts.add_user("eve", "umbrella", "member").await;
    let ana = ts.sign_in("ana", &password_of("ana")).await.access_token;
    let eve = ts.sign_in("eve", &password_of("eve")).await.access_token;
    let text = format!("# Ledger\n\nledgermarker7 once.\n\n{}", "The ledger records each rotation of the keys. ".repeat(40_000));
    let created = ts.upload(&ana, "ledger.md", "text/markdown", text.into_bytes()).await;
    let id = created["id"].as_str().unwrap().to_string();
    // Someone of another org cannot even see it, let alone stop it.
    let refused = post(&ts, &eve, &format!("/api/v1/documents/{id}/cancel"), json!({})).await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    let cancelled = post(&ts, &ana, &format!("/api/v1/documents/{id}/cancel"), json!({})).await;
    assert_eq!(cancelled.status(), StatusCode::OK, "{}", cancelled.text().await.unwrap());
    // It stays cancelled: the worker stops at its next stage and indexes nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let document: Value = get(&ts, &ana, &format!("/api/v1/documents/{id}")).await.json().await.unwrap();
    assert_eq!(document["status"], "cancelled", "{document}");
    let found: Value = post(&ts, &ana, "/api/v1/search", json!({"query": "ledgermarker7"})).await.json().await.unwrap();
    assert!(found["hits"].as_array().unwrap().is_empty(), "nothing of it is searchable: {found}");
    let again = post(&ts, &ana, &format!("/api/v1/documents/{id}/cancel"), json!({})).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    // Retried, it is processed from the start.
    let retried = post(&ts, &ana, &format!("/api/v1/documents/{id}/retry"), json!({})).await;
    assert_eq!(retried.status(), StatusCode::OK);
    ts.wait_indexed(&ana, &created).await;
    let found: Value = post(&ts, &ana, "/api/v1/search", json!({"query": "ledgermarker7"})).await.json().await.unwrap();
    assert_eq!(found["hits"][0]["document_id"], id.as_str(), "{found}");
    let done_again = post(&ts, &ana, &format!("/api/v1/documents/{id}/retry"), json!({})).await;
    assert_eq!(done_again.status(), StatusCode::CONFLICT, "a finished job is not retried");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_status_streams_over_server_sent_events() {
    use futures_util::StreamExt;
    let ts = TestSystem::start().await;
    ts.add_user("ana", "acme", "member").await;
    let ana = ts.sign_in("ana", &password_of("ana")).await.access_token;
    let response = ts.http.get(format!("{}/api/v1/documents/events", ts.gateway())).bearer_auth(&ana).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut events = Box::pin(common::sse::events(response.bytes_stream()));
    let first = events.next().await.unwrap().unwrap();
    assert_eq!((first.event.as_str(), first.data.as_str()), ("documents", "[]"), "no documents yet");
    let created = ts.upload(&ana, "notes.md", "text/markdown", b"# Notes\n\nStreamed status.".to_vec()).await;
    let id = created["id"].as_str().unwrap();
    let mut statuses: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while statuses.last().map(String::as_str) != Some("done") {
        let event = tokio::time::timeout_at(deadline, events.next()).await.expect("the news comes").unwrap().unwrap();
        let news: Vec<Value> = serde_json::from_str(&event.data).unwrap();
        for document in news.iter().filter(|d| d["id"] == id) {
            statuses.push(document["status"].as_str().unwrap().to_string());
        }
    }
    assert!(!statuses.is_empty() && statuses.windows(2).all(|w| w[0] != w[1]), "each event is a change: {statuses:?}");
    // Someone else's stream says nothing of it.
    ts.add_user("eve", "umbrella", "member").await;
    let eve = ts.sign_in("eve", &password_of("eve")).await.access_token;
    let response = ts.http.get(format!("{}/api/v1/documents/events", ts.gateway())).bearer_auth(&eve).send().await.unwrap();
    let mut events = Box::pin(common::sse::events(response.bytes_stream()));
    assert_eq!(events.next().await.unwrap().unwrap().data, "[]");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_filter_and_a_document_page_shows_its_text_its_stages_and_only_permitted_actions() {
    let ts = TestSystem::start().await;
    for name in ["olivia", "andy"] {
        ts.add_user(name, "acme", "member").await;
    }
    let users = identity::list_users(&ts.config).await.unwrap();
    let andy_id = users.iter().find(|u| u.username == "andy").unwrap().id.clone();
    let olivia = ts.sign_in("olivia", &password_of("olivia")).await.access_token;
    let collection: Value = post(&ts, &olivia, "/api/v1/collections", json!({"name": "Board"})).await.json().await.unwrap();
    let collection = collection["id"].as_str().unwrap().to_string();
    let shared = ts
        .http
        .put(format!("{}/api/v1/collections/{collection}/members", ts.gateway()))
        .bearer_auth(&olivia)
        .json(&json!({"members": [{"user": andy_id, "role": "answers"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(shared.status(), StatusCode::OK);
    let minutes = upload(&ts, &olivia, "Minutes-2026.md", "text/markdown", b"# Minutes\n\n## Budget\n\nThe board approved the budget of 4.2 million.".to_vec(), Some(&collection)).await;
    let minutes: Value = minutes.json().await.unwrap();
    let budget = upload(&ts, &olivia, "budget.csv", "text/csv", b"Team,Budget\nResearch,1.2M\nSupport,0.4M\n".to_vec(), Some(&collection)).await;
    let budget: Value = budget.json().await.unwrap();
    for created in [&minutes, &budget] {
        assert_eq!(wait_for_job(&ts, &olivia, created["job_id"].as_str().unwrap()).await["status"], "done");
    }

    // Filters: a part of the name in any case, a type, a status; bad values are refused.
    let names = |query: &'static str| {
        let (ts, olivia) = (&ts, olivia.clone());
        async move {
            let page: Value = get(ts, &olivia, &format!("/api/v1/documents?{query}")).await.json().await.unwrap();
            page["documents"].as_array().unwrap().iter().map(|d| d["filename"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(names("q=minutes").await, ["Minutes-2026.md"]);
    assert_eq!(names("type=CSV").await, ["budget.csv"]);
    assert_eq!(names("status=done").await.len(), 2);
    assert!(names("status=failed").await.is_empty());
    assert!(names("q=minutes&type=csv").await.is_empty());
    for bad in ["status=bogus", "type=..%2Fx"] {
        let refused = get(&ts, &olivia, &format!("/api/v1/documents?{bad}")).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(refused.json::<Value>().await.unwrap()["code"], "request.invalid_filter");
    }

    // The job's stages, in order, each with how long it took.
    let job: Value = get(&ts, &olivia, &format!("/api/v1/jobs/{}", minutes["job_id"].as_str().unwrap())).await.json().await.unwrap();
    let stages: Vec<&str> = job["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages.first(), Some(&"queued"), "{job}");
    assert_eq!(stages.last(), Some(&"done"), "{job}");
    assert!(stages.contains(&"parsing") && stages.contains(&"indexing"), "{job}");
    let timed = job["stages"].as_array().unwrap();
    assert!(timed[..timed.len() - 1].iter().all(|s| s["seconds"].as_f64().is_some_and(|t| t >= 0.0)), "{job}");

    // How far each document came: chunks made (and embedded, when embeddings are on),
    // in the document and in the documents page's live events.
    let document: Value = get(&ts, &olivia, &format!("/api/v1/documents/{}", minutes["id"].as_str().unwrap())).await.json().await.unwrap();
    let n_chunks = document["chunks"].as_u64().unwrap();
    assert!(n_chunks >= 1, "{document}");
    assert_eq!(document["embedded"], 0, "no embedding model in this system: {document}");
    assert!(document.get("pages").is_none(), "Markdown has no pages: {document}");
    let mut events = ts.http.get(format!("{}/api/v1/documents/events", ts.gateway())).bearer_auth(&olivia).send().await.unwrap();
    let mut first = String::new();
    while !first.contains("\n\n") {
        let piece = tokio::time::timeout(std::time::Duration::from_secs(10), events.chunk()).await.unwrap().unwrap().unwrap();
        first.push_str(&String::from_utf8_lossy(&piece));
    }
    let data: Value = serde_json::from_str(first.lines().find_map(|l| l.strip_prefix("data:")).unwrap().trim()).unwrap();
    let news = data.as_array().unwrap().iter().find(|d| d["id"] == minutes["id"]).unwrap();
    assert_eq!((news["status"].as_str(), news["chunks"].as_u64(), news["embedded"].as_u64()), (Some("done"), Some(n_chunks), Some(0)), "{news}");
    drop(events);

    // The document page: its text as chunks with their sections, its stages, its actions.
    let id = minutes["id"].as_str().unwrap();
    let (session, _) = ts.browser_session("olivia").await;
    let page = ts.http.get(format!("{}/documents/{id}", ts.gateway())).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("The board approved the budget of 4.2 million."), "{page}");
    assert!(page.contains("Minutes &gt; Budget") || page.contains("Minutes &#62; Budget") || page.contains("Minutes > Budget"), "the section is shown: {page}");
    assert!(page.contains("Board"), "the collection by name");
    assert!(page.contains(">parsing<") && page.contains(">indexing<"), "the stages: {page}");
    assert!(page.contains("/content\"") && page.contains("Delete for good"), "the owner may download and delete");
    let filtered = ts.http.get(format!("{}/documents?q=budget", ts.gateway())).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    assert!(filtered.contains("budget.csv") && !filtered.contains("Minutes-2026.md"), "the page filters too");
    // Someone who may only have answers from the collection sees neither action.
    let (andys, _) = ts.browser_session("andy").await;
    let page = ts.http.get(format!("{}/documents/{id}", ts.gateway())).header("cookie", &andys).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(!page.contains("/content\"") && !page.contains("Delete for good"), "no Download or Delete for an answers-only share: {page}");
    ts.system.stop().await;
}
