//! The event bus as operators see it: per-subscription figures, a poison message in
//! the dead letters with its error, and a redrive (API and page) that delivers it again.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::bus::SubscriptionSpec;
use common::wire::{AuditEvent, events};

use crate::helpers::{TestSystem, password_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_the_bus_and_redrive_dead_letters_others_may_not() {
    let ts = TestSystem::start().await;
    ts.add_user("opal", "infra", "member").await;
    identity::set_operator(&ts.config, "opal", true).await.unwrap();
    ts.add_user("olaf", "acme", "owner").await;
    let opal = ts.sign_in("opal", &password_of("opal")).await.access_token;
    let olaf = ts.sign_in("olaf", &password_of("olaf")).await.access_token;
    let get = |token: String, path: String| {
        let ts = &ts;
        async move { ts.http.get(format!("{}{path}", ts.gateway())).bearer_auth(token).send().await.unwrap() }
    };
    assert_eq!(get(olaf.clone(), "/api/v1/admin/queue".into()).await.status(), StatusCode::FORBIDDEN, "an org owner is not an operator");

    // A consumer that cannot handle a message: two failed deliveries and it is dead.
    let ctx = common::ServiceContext::new(std::sync::Arc::new(ts.config.clone()), common::ServiceName::Gateway, Default::default()).unwrap();
    let bus = ctx.bus.clone();
    bus.subscribe("poison-check", &SubscriptionSpec { topic: events::AUDIT_RECORDED.into(), max_deliveries: Some(2), lease_ms: Some(1000), ordered: None }).await.unwrap();
    let data = AuditEvent { actor: "x".into(), action: "poison.probe".into(), resource: "r".into(), outcome: "success".into(), context: json!({}) };
    let event = bus.event(events::AUDIT_RECORDED, None, data);
    let poison_id = event.id.clone();
    bus.publish_one(event).await.unwrap();
    let mut failures = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while failures < 2 && tokio::time::Instant::now() < deadline {
        for delivery in bus.pull("poison-check", 100, Duration::from_millis(500)).await.unwrap() {
            if delivery.event.id == poison_id {
                bus.nack("poison-check", &delivery, "cannot parse the poison probe").await.unwrap();
                failures += 1;
            } else {
                bus.ack("poison-check", &delivery).await.unwrap();
            }
        }
    }
    let stats: Value = get(opal.clone(), "/api/v1/admin/queue".into()).await.json().await.unwrap();
    let poison = stats["subscriptions"].as_array().unwrap().iter().find(|s| s["subscription"] == "poison-check").cloned().unwrap();
    assert_eq!(poison["dead_letters"], 1, "{stats}");
    assert!(stats["subscriptions"].as_array().unwrap().iter().any(|s| s["subscription"] == "audit"), "Echo's own subscriptions are listed");
    let letters: Value = get(opal.clone(), "/api/v1/admin/queue/poison-check/dead-letters".into()).await.json().await.unwrap();
    assert_eq!(letters["dead_letters"][0]["last_error"], "cannot parse the poison probe");
    assert_eq!(letters["dead_letters"][0]["event"]["id"], poison_id.as_str());
    assert_eq!(get(olaf.clone(), "/api/v1/admin/queue/poison-check/dead-letters".into()).await.status(), StatusCode::FORBIDDEN);

    // The page shows it, and its button redrives it (with the session's CSRF token).
    let (session, csrf) = ts.browser_session("opal").await;
    let page = ts.http.get(format!("{}/admin/queue", ts.gateway())).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("data-dead-letters=\"poison-check\"") && html.contains("cannot parse the poison probe"), "{html}");
    assert!(html.contains("data-backend=\"sqlite\""), "the page names the backend that keeps the messages");
    let seq = letters["dead_letters"][0]["seq"].as_i64().unwrap().to_string();
    let forged = ts.http.post(format!("{}/admin/queue/poison-check/redrive", ts.gateway())).header("cookie", &session).form(&[("csrf", "wrong"), ("seq", seq.as_str())]).send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN, "no CSRF token, no redrive");
    let (other_session, other_csrf) = ts.browser_session("olaf").await;
    let refused = ts
        .http
        .post(format!("{}/admin/queue/poison-check/redrive", ts.gateway()))
        .header("cookie", &other_session)
        .form(&[("csrf", other_csrf.as_str()), ("seq", seq.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "an owner cannot redrive");
    let redriven = ts.http.post(format!("{}/admin/queue/poison-check/redrive", ts.gateway())).header("cookie", &session).form(&[("csrf", csrf.as_str()), ("seq", seq.as_str())]).send().await.unwrap();
    assert_eq!(redriven.status(), StatusCode::OK);
    assert!(redriven.text().await.unwrap().contains("Redelivering 1 message(s) of poison-check."));

    // The fixed consumer now gets it.
    let again = bus.pull("poison-check", 100, Duration::from_secs(3)).await.unwrap();
    let delivery = again.iter().find(|d| d.event.id == poison_id).expect("the redriven message is delivered again");
    bus.ack("poison-check", delivery).await.unwrap();
    let stats: Value = get(opal, "/api/v1/admin/queue".into()).await.json().await.unwrap();
    let poison = stats["subscriptions"].as_array().unwrap().iter().find(|s| s["subscription"] == "poison-check").cloned().unwrap();
    assert_eq!(poison["dead_letters"], 0);
    ts.system.stop().await;
}
