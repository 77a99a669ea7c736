//! Collections as their owners manage them: members listed only to those who may
//! share, deletion only by the owner, and a deleted collection leaving nothing behind
//! in documents, search or answers.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::helpers::{TestSystem, eventually, password_of};

async fn call(ts: &TestSystem, method: reqwest::Method, token: &str, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = ts.http.request(method, format!("{}{path}", ts.gateway())).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_see_members_and_delete_collections_and_nothing_of_them_remains() {
    let ts = TestSystem::start().await;
    for (name, org) in [("nora", "acme"), ("ben", "acme"), ("zed", "globex")] {
        ts.add_user(name, org, "member").await;
    }
    let users = identity::list_users(&ts.config).await.unwrap();
    let id_of = |name: &str| users.iter().find(|u| u.username == name).unwrap().id.clone();
    let nora = ts.sign_in("nora", &password_of("nora")).await.access_token;
    let ben = ts.sign_in("ben", &password_of("ben")).await.access_token;
    let zed = ts.sign_in("zed", &password_of("zed")).await.access_token;

    let created = call(&ts, reqwest::Method::POST, &nora, "/api/v1/collections", Some(json!({"name": "Project Kestrel"}))).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let collection = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let form = Form::new().text("collection", collection.clone()).part(
        "file",
        Part::bytes(b"# Kestrel\n\nThe kestrel rendezvous word is quillfeather.\n".to_vec()).file_name("kestrel.md").mime_str("text/markdown").unwrap(),
    );
    let uploaded: Value = ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&nora).multipart(form).send().await.unwrap().json().await.unwrap();
    let document = uploaded["id"].as_str().unwrap().to_string();
    let job = uploaded["job_id"].as_str().unwrap().to_string();
    eventually("indexing", Duration::from_secs(60), || async {
        let job: Value = call(&ts, reqwest::Method::GET, &nora, &format!("/api/v1/jobs/{job}"), None).await.json().await.ok()?;
        (job["status"] == "done").then_some(())
    })
    .await;
    let shared = call(&ts, reqwest::Method::PUT, &nora, &format!("/api/v1/collections/{collection}/members"), Some(json!({"members": [{"user": id_of("ben"), "role": "viewer"}]}))).await;
    assert_eq!(shared.status(), StatusCode::OK);

    // Members: the owner sees them; a viewer may not; another org cannot even find it.
    let members: Value = call(&ts, reqwest::Method::GET, &nora, &format!("/api/v1/collections/{collection}/members"), None).await.json().await.unwrap();
    assert_eq!(members["members"], json!([{"user": id_of("ben"), "role": "viewer"}]));
    assert_eq!(call(&ts, reqwest::Method::GET, &ben, &format!("/api/v1/collections/{collection}/members"), None).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(call(&ts, reqwest::Method::GET, &zed, &format!("/api/v1/collections/{collection}/members"), None).await.status(), StatusCode::NOT_FOUND);

    // Deleting: not by a viewer, not by another org, never a personal collection.
    let search = |token: String| {
        let ts = &ts;
        async move {
            let hits: Value = call(ts, reqwest::Method::POST, &token, "/api/v1/search", Some(json!({"query": "quillfeather rendezvous", "k": 10}))).await.json().await.unwrap();
            hits["hits"].as_array().unwrap().iter().filter_map(|h| h["document_id"].as_str().map(str::to_string)).collect::<Vec<_>>()
        }
    };
    assert_eq!(search(ben.clone()).await, vec![document.clone()], "the viewer finds it while it exists");
    let refused = call(&ts, reqwest::Method::DELETE, &ben, &format!("/api/v1/collections/{collection}"), None).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], "collection.forbidden");
    assert_eq!(call(&ts, reqwest::Method::DELETE, &zed, &format!("/api/v1/collections/{collection}"), None).await.status(), StatusCode::NOT_FOUND);
    let collections: Vec<Value> = call(&ts, reqwest::Method::GET, &nora, "/api/v1/collections", None).await.json().await.unwrap();
    let personal = collections.iter().find(|c| c["personal"] == true).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(call(&ts, reqwest::Method::DELETE, &nora, &format!("/api/v1/collections/{personal}"), None).await.status(), StatusCode::CONFLICT);
    assert_eq!(call(&ts, reqwest::Method::GET, &ben, &format!("/api/v1/documents/{document}"), None).await.status(), StatusCode::OK, "refusals changed nothing");

    let deleted = call(&ts, reqwest::Method::DELETE, &nora, &format!("/api/v1/collections/{collection}"), None).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    for token in [&nora, &ben] {
        assert_eq!(call(&ts, reqwest::Method::GET, token, &format!("/api/v1/documents/{document}"), None).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(call(&ts, reqwest::Method::GET, token, &format!("/api/v1/collections/{collection}/members"), None).await.status(), StatusCode::NOT_FOUND);
        let listed: Vec<Value> = call(&ts, reqwest::Method::GET, token, "/api/v1/collections", None).await.json().await.unwrap();
        assert!(listed.iter().all(|c| c["id"] != collection.as_str()));
    }
    assert!(search(nora.clone()).await.is_empty());
    // Behind the access check, the index itself lets go of the chunks (the deletion
    // events reach search).
    let peers = common::ServiceContext::new(std::sync::Arc::new(ts.config.clone()), common::ServiceName::Gateway, Default::default()).unwrap().peers;
    eventually("the chunks leave the index", Duration::from_secs(20), || async {
        let held: Value = peers.get_json(common::ServiceName::Search, &format!("/v1/documents/{document}"), None).await.ok()?;
        (held["chunks"] == 0).then_some(())
    })
    .await;
    let answer: Value = call(&ts, reqwest::Method::POST, &nora, "/api/v1/ask", Some(json!({"question": "What is the kestrel rendezvous word?"}))).await.json().await.unwrap();
    assert!(!answer.to_string().contains("quillfeather"), "no answer cites a deleted collection: {answer}");
    assert_eq!(call(&ts, reqwest::Method::DELETE, &nora, &format!("/api/v1/collections/{collection}"), None).await.status(), StatusCode::NOT_FOUND);
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifications_decide_who_finds_reads_and_downloads_each_document() {
    let ts = TestSystem::start().await;
    for name in ["olivia", "vera", "andy", "eddie"] {
        ts.add_user(name, "acme", "member").await;
    }
    let users = identity::list_users(&ts.config).await.unwrap();
    let id_of = |name: &str| users.iter().find(|u| u.username == name).unwrap().id.clone();
    let token = |name: &'static str| {
        let ts = &ts;
        async move { ts.sign_in(name, &password_of(name)).await.access_token }
    };
    let olivia = token("olivia").await;
    let collection = call(&ts, reqwest::Method::POST, &olivia, "/api/v1/collections", Some(json!({"name": "Board"}))).await.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let members = json!({"members": [
        {"user": id_of("vera"), "role": "viewer"}, {"user": id_of("andy"), "role": "answers"}, {"user": id_of("eddie"), "role": "editor"}
    ]});
    assert_eq!(call(&ts, reqwest::Method::PUT, &olivia, &format!("/api/v1/collections/{collection}/members"), Some(members)).await.status(), StatusCode::OK);

    let upload = |classification: &'static str, marker: &'static str| {
        let (ts, olivia, collection) = (&ts, olivia.clone(), collection.clone());
        async move {
            let text = format!("# Minutes\n\nThe {classification} codeword is {marker}.\n");
            let form = Form::new()
                .text("collection", collection)
                .text("classification", classification)
                .part("file", Part::bytes(text.into_bytes()).file_name(format!("{marker}.md")).mime_str("text/markdown").unwrap());
            ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(olivia).multipart(form).send().await.unwrap()
        }
    };
    let refused = upload("top-secret", "nope").await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], "document.invalid_classification");
    let mut documents = Vec::new();
    for (classification, marker) in [("public", "azurefox"), ("internal", "bronzeowl"), ("confidential", "cobaltelk"), ("restricted", "dunmoth")] {
        let created: Value = upload(classification, marker).await.json().await.unwrap();
        let job = created["job_id"].as_str().unwrap().to_string();
        eventually("indexing", Duration::from_secs(60), || async {
            let job: Value = call(&ts, reqwest::Method::GET, &olivia, &format!("/api/v1/jobs/{job}"), None).await.json().await.ok()?;
            (job["status"] == "done").then_some(())
        })
        .await;
        documents.push((classification, marker, created["id"].as_str().unwrap().to_string()));
    }

    // (user, may find and read per classification, may download per classification)
    let expectations: [(&str, [bool; 4], [bool; 4]); 4] = [
        ("olivia", [true, true, true, true], [true, true, true, true]),
        ("eddie", [true, true, true, true], [true, true, true, true]),
        ("vera", [true, true, true, false], [true, true, false, false]),
        ("andy", [true, true, true, false], [false, false, false, false]),
    ];
    for (name, reads, downloads) in expectations {
        let token = ts.sign_in(name, &password_of(name)).await.access_token;
        let listed: Value = call(&ts, reqwest::Method::GET, &token, "/api/v1/documents", None).await.json().await.unwrap();
        let listed: Vec<String> = listed["documents"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
        for (i, (classification, marker, id)) in documents.iter().enumerate() {
            let hits: Value = call(&ts, reqwest::Method::POST, &token, "/api/v1/search", Some(json!({"query": marker, "k": 10}))).await.json().await.unwrap();
            let found = hits["hits"].as_array().unwrap().iter().any(|h| h["document_id"] == id.as_str());
            assert_eq!(found, reads[i], "{name} searching a {classification} document");
            assert_eq!(listed.contains(id), reads[i], "{name} listing a {classification} document");
            let fetched = call(&ts, reqwest::Method::GET, &token, &format!("/api/v1/documents/{id}"), None).await.status();
            assert_eq!(fetched, if reads[i] { StatusCode::OK } else { StatusCode::NOT_FOUND }, "{name} fetching a {classification} document");
            let content = call(&ts, reqwest::Method::GET, &token, &format!("/api/v1/documents/{id}/content"), None).await.status();
            let expected = match (reads[i], downloads[i]) {
                (false, _) => StatusCode::NOT_FOUND,
                (true, true) => StatusCode::OK,
                (true, false) => StatusCode::FORBIDDEN,
            };
            assert_eq!(content, expected, "{name} downloading a {classification} document");
            let answer: Value =
                call(&ts, reqwest::Method::POST, &token, "/api/v1/ask", Some(json!({"question": format!("What is the {classification} codeword {marker}?")}))).await.json().await.unwrap();
            assert_eq!(answer["answer"].as_str().unwrap().contains(marker), reads[i], "{name} asking about a {classification} document: {answer}");
        }
    }
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_history_withdraws_answers_from_documents_no_longer_readable() {
    let ts = TestSystem::start().await;
    ts.add_user("hal", "acme", "member").await;
    ts.add_user("ria", "acme", "member").await;
    let users = identity::list_users(&ts.config).await.unwrap();
    let ria_id = users.iter().find(|u| u.username == "ria").unwrap().id.clone();
    let hal = ts.sign_in("hal", &password_of("hal")).await.access_token;
    let ria = ts.sign_in("ria", &password_of("ria")).await.access_token;
    let collection = call(&ts, reqwest::Method::POST, &hal, "/api/v1/collections", Some(json!({"name": "Ops"}))).await.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let form = Form::new().text("collection", collection.clone()).part(
        "file",
        Part::bytes(b"# Ops\n\nThe vault combination is marigold-7731.\n".to_vec()).file_name("ops.md").mime_str("text/markdown").unwrap(),
    );
    let uploaded: Value = ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&hal).multipart(form).send().await.unwrap().json().await.unwrap();
    let job = uploaded["job_id"].as_str().unwrap().to_string();
    eventually("indexing", Duration::from_secs(60), || async {
        let job: Value = call(&ts, reqwest::Method::GET, &hal, &format!("/api/v1/jobs/{job}"), None).await.json().await.ok()?;
        (job["status"] == "done").then_some(())
    })
    .await;
    let share = |members: Value| {
        let (ts, hal, path) = (&ts, hal.clone(), format!("/api/v1/collections/{collection}/members"));
        async move { call(ts, reqwest::Method::PUT, &hal, &path, Some(json!({"members": members}))).await.status() }
    };
    assert_eq!(share(json!([{"user": ria_id, "role": "viewer"}])).await, StatusCode::OK);
    let answer: Value = call(&ts, reqwest::Method::POST, &ria, "/api/v1/ask", Some(json!({"question": "What is the vault combination?"}))).await.json().await.unwrap();
    assert!(answer["answer"].as_str().unwrap().contains("marigold-7731"), "{answer}");
    let conversation = answer["conversation_id"].as_str().unwrap().to_string();
    let history = |token: String| {
        let (ts, path) = (&ts, format!("/api/v1/conversations/{conversation}"));
        async move { call(ts, reqwest::Method::GET, &token, &path, None).await.json::<Value>().await.unwrap() }
    };
    let before = history(ria.clone()).await;
    assert!(before.to_string().contains("marigold-7731"), "the history shows the answer while the document is readable");
    assert_eq!(before["messages"][1]["withdrawn"], false);

    // The share is taken back: the history no longer quotes the document.
    assert_eq!(share(json!([])).await, StatusCode::OK);
    let after = history(ria.clone()).await;
    assert!(!after.to_string().contains("marigold-7731"), "nothing of it remains in the history: {after}");
    assert_eq!(after["messages"][1]["withdrawn"], true);
    assert_eq!(after["messages"][1]["citations"], json!([]));
    assert_eq!(after["messages"][0]["content"], "What is the vault combination?", "the question itself stays");
    // Shared again, the answer comes back; deleted, it goes for good.
    assert_eq!(share(json!([{"user": ria_id, "role": "viewer"}])).await, StatusCode::OK);
    assert!(history(ria.clone()).await.to_string().contains("marigold-7731"));
    let document = uploaded["id"].as_str().unwrap();
    assert_eq!(call(&ts, reqwest::Method::DELETE, &hal, &format!("/api/v1/documents/{document}"), None).await.status(), StatusCode::NO_CONTENT);
    assert!(!history(ria).await.to_string().contains("marigold-7731"), "a deleted document is not quoted either");
    ts.system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_owned_by_the_org_are_managed_by_its_admins_only() {
    let ts = TestSystem::start().await;
    for (name, org, role) in [("ada", "acme", "admin"), ("oz", "acme", "owner"), ("mo", "acme", "member"), ("gus", "globex", "admin")] {
        ts.add_user(name, org, role).await;
    }
    let users = identity::list_users(&ts.config).await.unwrap();
    let mo_id = users.iter().find(|u| u.username == "mo").unwrap().id.clone();
    let token = |name: &'static str| {
        let ts = &ts;
        async move { ts.sign_in(name, &password_of(name)).await.access_token }
    };
    let (ada, oz, mo, gus) = (token("ada").await, token("oz").await, token("mo").await, token("gus").await);
    let refused = call(&ts, reqwest::Method::POST, &mo, "/api/v1/collections", Some(json!({"name": "Handbook", "org_owned": true}))).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "members create their own collections, not the org's");
    let created: Value = call(&ts, reqwest::Method::POST, &ada, "/api/v1/collections", Some(json!({"name": "Handbook", "org_owned": true}))).await.json().await.unwrap();
    assert_eq!(created["org_owned"], true);
    assert_eq!(created["owner"], "org:acme", "owned by the org, not by its creator");
    let id = created["id"].as_str().unwrap().to_string();
    let form = Form::new().text("collection", id.clone()).text("classification", "restricted").part(
        "file",
        Part::bytes(b"# Handbook\n\nThe org-wide passphrase is heliotrope-88.\n".to_vec()).file_name("handbook.md").mime_str("text/markdown").unwrap(),
    );
    let uploaded: Value = ts.http.post(format!("{}/api/v1/documents", ts.gateway())).bearer_auth(&ada).multipart(form).send().await.unwrap().json().await.unwrap();
    let job = uploaded["job_id"].as_str().unwrap_or_else(|| panic!("{uploaded}")).to_string();
    eventually("indexing", Duration::from_secs(60), || async {
        let job: Value = call(&ts, reqwest::Method::GET, &ada, &format!("/api/v1/jobs/{job}"), None).await.json().await.ok()?;
        (job["status"] == "done").then_some(())
    })
    .await;
    let finds = |token: String| {
        let ts = &ts;
        async move {
            let hits: Value = call(ts, reqwest::Method::POST, &token, "/api/v1/search", Some(json!({"query": "heliotrope passphrase", "k": 5}))).await.json().await.unwrap();
            !hits["hits"].as_array().unwrap().is_empty()
        }
    };
    assert!(finds(oz.clone()).await, "another admin of the org manages it too (even a restricted document)");
    assert!(!finds(mo.clone()).await, "a member sees nothing until it is shared");
    assert!(!finds(gus.clone()).await, "another org's admin never does");
    let shared = call(&ts, reqwest::Method::PUT, &oz, &format!("/api/v1/collections/{id}/members"), Some(json!({"members": [{"user": mo_id, "role": "editor"}]}))).await;
    assert_eq!(shared.status(), StatusCode::OK);
    assert!(finds(mo.clone()).await, "shared as editor, the member finds the restricted document");
    assert_eq!(call(&ts, reqwest::Method::DELETE, &mo, &format!("/api/v1/collections/{id}"), None).await.status(), StatusCode::FORBIDDEN, "an editor cannot delete the org's collection");
    assert_eq!(call(&ts, reqwest::Method::DELETE, &gus, &format!("/api/v1/collections/{id}"), None).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(call(&ts, reqwest::Method::DELETE, &oz, &format!("/api/v1/collections/{id}"), None).await.status(), StatusCode::NO_CONTENT, "the org's owner deletes it");
    assert!(!finds(ada).await);
    ts.system.stop().await;
}
